# Sourced by demo.sh and test.sh: create (once) and fill the virtual environment from the
# project's own files; sets VENV. Pinned CPU torch and tools in requirements-dev.txt.
VENV="${TI_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements-dev.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
