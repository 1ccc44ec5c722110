"""Whether a run's checkpoints may be loaded. DeepSpeed's checkpoints are pickles (`torch.load` with
`weights_only=False`): loading one runs whatever code its writer put in it. So `--resume` loads only
checkpoints that nobody but you could have written: the run directory, its `checkpoints/` and everything
in them owned by you and not group- or world-writable, no symbolic link inside. Standard library only:
the launcher refuses with it before anything starts, and each rank checks again before it loads."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def untrusted_checkpoints(run_dir: str | Path) -> str:
    """'' if run_dir/checkpoints may be loaded, else why not: one line naming the first path at fault."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    # the two directories may be reached through a link (a run directory on a bigger disk): their targets
    if not ckpt_dir.is_dir():
        return ""  # nothing to load: the caller says there is no checkpoint
    for path in (run_dir, ckpt_dir):
        if why := _fault(path, os.stat(path)):
            return why
    for top, dirs, files in os.walk(ckpt_dir):  # links are not followed, and refused below
        for name in sorted(dirs) + sorted(files):
            path = Path(top) / name
            if why := _fault(path, os.lstat(path)):
                return why
    return ""


def _fault(path: Path, st: os.stat_result) -> str:
    uid = os.getuid()
    advice = "checkpoints are pickles that run code when loaded"
    if stat.S_ISLNK(st.st_mode):
        return f"{path} is a symbolic link ({advice}: resume only from files written in place)"
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by you (uid {uid}); {advice}"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (
            f"{path} is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); {advice}: if nobody else wrote to it, "
            f"chmod -R go-w {path}"
        )
    return ""
