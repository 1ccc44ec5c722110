"""launch/train.py as the tests run it: waited for (`launch`), in the background (`start_launch`), or as
a dry run that writes its plan (`dry_run`); the recipe's config and plan without the launcher."""

import json
import os
import subprocess
import sys
from pathlib import Path

from launch.plan import Plan
from support import tiers
from support.constants import REPO, RUN_TAG, SERVER_TOKEN, TEST_SCALE

RECIPE = "configs/prem-1b-gsm8k.yaml"


def _command(*args: str, root, server, recipe: bool = True) -> list[str]:
    """configs/tiny-cpu.yaml at the suite's scale (TEST_SCALE) under `root`, then `args`; with `server`
    (a ServerProcess) the run uses it instead of starting its own. recipe=False: neither (a `--resume`
    that continues with the run's own config), only run.root."""
    recipe_args = ["--config", str(REPO / "configs" / "tiny-cpu.yaml")] if recipe else []
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        *recipe_args,
        "--set",
        f"run.root={root}",
        *(TEST_SCALE if recipe else []),
        *args,
    ]
    if server is not None:
        cmd += ["--server-url", server.client.base_url]
    return cmd


def launch(*args, timeout=600, server=None, root, env=None, recipe=True) -> subprocess.CompletedProcess:
    """The launcher, waited for (its output captured); the shared server's token and the run's tag
    (RUN_TAG=root) in its environment, then `env`. In an integration test it may only refuse (exit 2).
    recipe=False: without the recipe and the suite's scale (see `_command`)."""
    tiers.require("integration", "runs the launcher (launch/train.py)")
    cmd = _command(*args, root=root, server=server, recipe=recipe)
    env = {**os.environ, "GRPO_SERVER_TOKEN": SERVER_TOKEN, RUN_TAG: str(root), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    tiers.launcher_ran(proc)
    return proc


def start_launch(*args, server, root, token=SERVER_TOKEN) -> subprocess.Popen:
    """The launcher in the background; with `server` it uses the session's server, else starts its own.
    Its output goes to root/launch.log. token=None: no GRPO_SERVER_TOKEN at all (the launcher makes one)."""
    tiers.require("e2e", "starts a training run")
    cmd = _command(*args, root=root, server=server)
    if server is None:
        from pipeline.generation.client import free_port

        cmd += ["--set", f"server.port={free_port('127.0.0.1')}"]
    env = (
        {**os.environ, "GRPO_SERVER_TOKEN": token}
        if token
        else {k: v for k, v in os.environ.items() if k != "GRPO_SERVER_TOKEN"}
    )
    env[RUN_TAG] = str(root)
    with open(Path(root) / "launch.log", "ab") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def warm_run(name: str, *extra: str, warm_model_dir) -> list[str]:
    """A run named `name` from the warm model (as is, not built), without the launcher's evaluations."""
    return [
        "--name",
        name,
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "eval.enabled=false",
        *extra,
    ]


SECRET = "plan-test-secret"  # the token a dry run is given: it must appear nowhere in its plan or output


def dry_run(
    *args: str,
    tmp_path: Path,
    config: str = "configs/tiny-cpu.yaml",
    env: dict | None = None,
    cwd: Path = REPO,
    root: str | None = None,
):
    """A dry run on no GPU inventory but the one `env` gives (GRPO_GPU_INVENTORY; none = `--gpus N` of
    80 GiB) and no inherited CUDA_VISIBLE_DEVICES, whatever host runs the tests; (the process, its plan
    or None)."""
    tiers.require("integration", "runs the launcher (launch/train.py)")
    out = tmp_path / "plan.json"
    inherited = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "train.py"),
            "--config",
            config,
            "--dry-run",
            "--plan-json",
            str(out),
            "--set",
            f"run.root={root or tmp_path / 'runs'}",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**inherited, "GRPO_SERVER_TOKEN": SECRET, "GRPO_GPU_INVENTORY": "", **(env or {})},
    )
    plan = (
        Plan.from_json(json.loads(out.read_text())) if out.exists() else None
    )  # every key one the Plan knows
    return proc, plan


def recipe(*overrides: str):
    """The recipe's config (configs/prem-1b-gsm8k.yaml) with `overrides`."""
    from pipeline.config import load_config

    return load_config(REPO / RECIPE, list(overrides))


def plan_for(
    gpus: int,
    tp: int = 1,
    num_ranks: int = 0,
    completions: int = 16,
    micro: int = 2,
    ids=None,
    dp: int = 1,
    **kwargs,
) -> Plan:
    """launch/plan.py's plan in-process, for a launch on one host with these numbers."""
    from launch.plan import Layout, make_plan

    return make_plan(
        Layout(
            gpus=gpus,
            gpu_ids=ids,
            tp=tp,
            dp=dp,
            num_ranks=num_ranks,
            micro_batch_size=micro,
            gradient_accumulation_steps=2,
            completions_per_step=completions,
            run_dir="/r",
            master_port=29501,
            token="t",
            **kwargs,
        )
    )
