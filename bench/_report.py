"""Shared helpers for benchmark scripts: print a table, write it into docs/benchmarks.md.

Each benchmark owns one section of ``docs/benchmarks.md`` between the markers
``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` and replaces only that
section, so benchmarks can be re-run independently. Raw results also go to
``bench/results/NAME.json``.
"""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "bench" / "results"


def machine_line() -> str:
    """One line describing where the numbers were measured."""
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    text = [headers, *[[str(c) for c in r] for r in rows]]
    lines = ["| " + " | ".join(map(str, r)) + " |" for r in text]
    lines.insert(1, "|" + "|".join("---" for _ in headers) + "|")
    return "\n".join(lines)


def publish(name: str, title: str, body: str, raw: dict[str, Any]) -> None:
    """Print ``body`` and write it into this benchmark's section of docs/benchmarks.md."""
    print(body)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    section = f"{start}\n## {title}\n\n{body.strip()}\n{end}"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    intro = "# Benchmarks\n\nEvery number here was produced by a script under `bench/`; each section names its command.\n"
    text = DOC.read_text() if DOC.exists() else intro
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    DOC.write_text(text)
