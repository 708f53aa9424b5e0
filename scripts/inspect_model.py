"""Alias of `mypt inspect`: see `python scripts/inspect_model.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))  # works before `pip install` too

from mypt.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("inspect", sys.argv[1:], prog="python scripts/inspect_model.py"))
