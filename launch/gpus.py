"""The one place this project asks nvidia-smi about the host's GPUs (the launcher's inventory and the
report's hardware line; bench/gpu_check.py's memory samples)."""

from __future__ import annotations

import subprocess


def nvidia_smi(fields: str) -> list[list[str]]:
    """`nvidia-smi --query-gpu=FIELDS` as one row of stripped values per GPU, in nvidia-smi's order; []
    where there is no nvidia-smi, no GPU, or it fails."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [[value.strip() for value in line.split(",")] for line in out.stdout.splitlines() if line.strip()]
