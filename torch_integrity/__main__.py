"""``python -m torch_integrity`` runs the command-line interface."""

from torch_integrity.cli import main

raise SystemExit(main())
