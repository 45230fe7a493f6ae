"""What produced a result: the machine, the library versions and the commit, recorded in every result JSON."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch


def machine_description() -> dict:
    try:
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=5).stdout.strip() or None
        # a copy with edits on top of HEAD (a device's working tree, a benchmark of uncommitted code) must not pass
        # for HEAD itself
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                                 capture_output=True, text=True, cwd=here, timeout=5).stdout.strip()
        if commit and changed:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "commit": commit}


def device_name(device: str) -> str:
    """'cpu', or e.g. 'cuda (NVIDIA H100 80GB HBM3)': benchmark JSON says which chip gave its timings."""
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return device
