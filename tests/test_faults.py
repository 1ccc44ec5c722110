"""Faults with real processes: kill -9 of the whole run and --resume; a killed trainer rank."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SERVER_TOKEN
from test_train import _processes_mentioning, launch, read_metrics

REPO = Path(__file__).resolve().parents[1]


def start_launch(*args, server, root):
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(REPO / "configs" / "tiny-cpu.yaml"),
           "--set", f"run.root={root}", "--server-url", server.client.base_url, *args]
    env = {**os.environ, "GRPO_SERVER_TOKEN": SERVER_TOKEN}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_step(path: Path, step: int, proc, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and sum(1 for _ in path.open()) >= step:
            return
        assert proc.poll() is None, "the run ended before the step to kill it at"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def wait_gone(text: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while _processes_mentioning(text) and time.monotonic() < end:
        time.sleep(0.5)
    assert not _processes_mentioning(text), _processes_mentioning(text)


@pytest.mark.slow
def test_kill_9_whole_run_then_resume(server, warm_model_dir, tmp_path):
    common = ["--name", "k", "--set", f"model.path={warm_model_dir}", "--set", "model.build=",
              "--set", "eval.enabled=false", "--set", "train.save_every=2"]
    proc = start_launch(*common, "--set", "train.max_steps=12", server=server, root=tmp_path)
    wait_for_step(tmp_path / "k" / "metrics.jsonl", 5, proc)
    os.kill(proc.pid, signal.SIGKILL)  # no clean-up code runs in the launcher
    proc.wait(30)
    wait_gone(str(tmp_path))  # the trainer ranks follow their launcher (PR_SET_PDEATHSIG)
    latest = (tmp_path / "k" / "checkpoints" / "latest").read_text()
    saved = int(latest.split("-")[1])
    assert saved >= 4 and (tmp_path / "k" / "checkpoints" / latest).is_dir()

    resumed = launch(*common, "--resume", "--set", "train.max_steps=8", server=server, root=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = read_metrics(tmp_path / "k")
    lines = (tmp_path / "k" / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in rows] == list(range(1, 9)) and len(lines) == 8  # continuous, no duplicates
    assert all(json.loads(line) for line in lines)  # no line torn

    from transformers import AutoTokenizer

    from pipeline.config import load_config
    from pipeline.data import drop_long_prompts, load_examples
    from pipeline.train import StepData

    config = load_config(tmp_path / "k" / "config.yaml")
    examples = load_examples("synthetic", "train", synthetic_sizes={"train": config.data.synthetic_train},
                             seed=config.run.seed)
    examples, _ = drop_long_prompts(examples, AutoTokenizer.from_pretrained(warm_model_dir),
                                    config.data.max_prompt_tokens)
    expected = StepData(examples, 2, config.run.seed)
    assert [r["data/first_index"] for r in rows] == [expected.indices(s)[0] for s in range(8)]


@pytest.mark.slow
def test_killed_rank_stops_run_and_keeps_checkpoint(server, warm_model_dir, tmp_path):
    proc = start_launch("--name", "rk", "--set", f"model.path={warm_model_dir}", "--set", "model.build=",
                        "--set", "eval.enabled=false", "--set", "train.save_every=2", "--set", "train.max_steps=40",
                        server=server, root=tmp_path)
    wait_for_step(tmp_path / "rk" / "metrics.jsonl", 3, proc)
    ranks = [line.split()[0] for line in _processes_mentioning(str(tmp_path)) if "pipeline.train" in line
             and "--local_rank=1" in line]
    assert ranks, "rank 1 not found"
    os.kill(int(ranks[0]), signal.SIGKILL)
    assert proc.wait(120) != 0
    wait_gone(str(tmp_path))
    latest = (tmp_path / "rk" / "checkpoints" / "latest").read_text()
    from transformers import AutoModelForCausalLM  # noqa: F401  (the checkpoint must load)

    assert (tmp_path / "rk" / "checkpoints" / latest).is_dir()
    resumed = launch("--name", "rk", "--resume", "--set", f"model.path={warm_model_dir}", "--set", "model.build=",
                     "--set", "eval.enabled=false", "--set", f"train.max_steps={int(latest.split('-')[1]) + 1}",
                     server=server, root=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
