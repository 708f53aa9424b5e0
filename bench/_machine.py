"""What every benchmark prints first: the machine, the versions, the command and the date."""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def header(title: str) -> str:
    import torch

    try:
        import transformers

        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"# {title}  {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
            f"machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
            f"load average at start {load:.2f}; no GPU used\n"
            f"versions: torch {torch.__version__}{hf}, python {platform.python_version()}\n"
            f"command: python {' '.join(sys.argv)}")
