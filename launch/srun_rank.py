"""One trainer rank under SLURM: `srun ... python -u launch/srun_rank.py --config ... --run-dir ...`.

srun starts this once per task. It maps SLURM's task variables to the ones torch.distributed and
DeepSpeed read, then runs `pipeline.trainer` as a module with the remaining arguments:

    RANK             <- SLURM_PROCID
    WORLD_SIZE       <- SLURM_NTASKS
    LOCAL_RANK       <- SLURM_LOCALID            (the GPU this rank takes)
    LOCAL_WORLD_SIZE <- this node's task count    (SLURM_STEP_TASKS_PER_NODE or SLURM_TASKS_PER_NODE,
                                                  e.g. "2(x3),1", at SLURM_NODEID; else SLURM_NTASKS_PER_NODE)
    LOCAL_SIZE       <- the same                  (DeepSpeed's CPU shared-memory all-reduce reads it)
    CROSS_RANK       <- SLURM_NODEID              (as DeepSpeed's own launcher sets them)
    CROSS_SIZE       <- SLURM_STEP_NUM_NODES, else SLURM_NNODES
    MASTER_ADDR      <- the step's first node     (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST)
    MASTER_PORT      <- 20000 + SLURM_JOB_ID % 20000

A variable already set wins (launch/plan.py sets MASTER_ADDR and MASTER_PORT; srun --export=ALL
passes them on). Why not DeepSpeed's own SLURM runner: it starts `python -u <script>` without `-m`
and exports none of these, so `deepspeed.init_distributed` falls back to MPI discovery (no mpi4py)
and every rank takes LOCAL_RANK 0. Pure Python and quick: nothing heavy is imported before the
variables are set.
"""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = "pipeline.trainer"


def expand_hostnames(nodelist: str) -> list[str]:
    """SLURM's compressed host list (`node[01-03,7],gpu5`) as host names: `scontrol show hostnames`
    when it is there, else a small parser for one bracket per name (enough for common clusters)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        pass
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for n in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{n:0{len(first)}d}{suffix}")
    return hosts


def tasks_on_node(tasks_per_node: str, node: int) -> int | None:
    """SLURM's `2(x3),1` (2 tasks on each of 3 nodes, then 1) at node index `node`."""
    counts: list[int] = []
    for item in tasks_per_node.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            return None
        counts += [int(match[1])] * int(match[2] or 1)
    return counts[node] if node < len(counts) else None


def torch_env(
    env: Mapping[str, str], expand: Callable[[str], list[str]] = expand_hostnames
) -> dict[str, str]:
    """The torch.distributed variables this SLURM task lacks (those already in `env` are left out)."""
    out: dict[str, str] = {}
    missing = [name for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID") if name not in env]
    if missing:
        raise SystemExit(f"error: launch/srun_rank.py runs under srun (missing {', '.join(missing)})")
    out["RANK"], out["WORLD_SIZE"], out["LOCAL_RANK"] = (
        env["SLURM_PROCID"],
        env["SLURM_NTASKS"],
        env["SLURM_LOCALID"],
    )
    node = int(env.get("SLURM_NODEID", "0"))
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        # SLURM_NTASKS_PER_NODE is one number for every node
        count = (
            tasks_on_node(env[name], 0 if name == "SLURM_NTASKS_PER_NODE" else node)
            if env.get(name)
            else None
        )
        if count:
            out["LOCAL_WORLD_SIZE"] = out["LOCAL_SIZE"] = str(count)
            break
    out["CROSS_RANK"] = str(node)
    if env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES"):
        out["CROSS_SIZE"] = env.get("SLURM_STEP_NUM_NODES") or env["SLURM_NNODES"]
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise SystemExit(
                "error: launch/srun_rank.py: no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST to find "
                "the first node (or set MASTER_ADDR)"
            )
        out["MASTER_ADDR"] = expand(nodelist)[0]
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return {k: v for k, v in out.items() if k not in env}


def main(argv: list[str]) -> None:
    added = torch_env(os.environ)
    os.environ.update(added)
    e = os.environ
    print(
        f"srun_rank: rank {e['RANK']} of {e['WORLD_SIZE']} (local {e['LOCAL_RANK']}) on "
        f"{os.uname().nodename}, master {e['MASTER_ADDR']}:{e['MASTER_PORT']}",
        file=sys.stderr,
        flush=True,
    )
    sys.path[0] = str(REPO)  # as `python -m` from the repo root would have it (not launch/)
    sys.argv = [MODULE, *argv]
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
