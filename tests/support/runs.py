"""A run directory: its metrics, its logs, waiting for its steps; a fake one for the report's tests."""

import json
import time
from pathlib import Path

import yaml


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(path: Path, step: int, proc, timeout: float = 300) -> None:
    """Until metrics.jsonl (`path`) has `step` rows; fails with the run's own log if it ends first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and sum(1 for _ in path.open()) >= step:
            return
        assert proc.poll() is None, (
            f"the run ended (rc {proc.returncode}) before step {step}:\n{run_log(path.parent)}"
        )
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached in {timeout}s:\n{run_log(path.parent)}")


def run_log(run_dir: Path, chars: int = 4000) -> str:
    """The tail of what a run printed: the launcher's console (root/launch.log) and the ranks' train.log."""
    logs = [run_dir.parent / "launch.log", run_dir / "train.log", run_dir / "server.log"]
    return "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-chars:]}" for p in logs if p.exists())


def fake_run(tmp_path, steps=20, overrides=()):
    """A finished run's directory as the report reads it (config, metrics with a torn last line,
    evaluations, run info), without running anything; (the directory, its metric rows)."""
    from pipeline.config import load_config, to_dict

    run = tmp_path / "run"
    run.mkdir()
    config = to_dict(
        load_config(
            "configs/tiny-cpu.yaml", ["model.path=premai-io/prem-1B-chat", "model.build=", *overrides]
        )
    )
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [
        {
            "step": s,
            "reward/total": 0.1 * s,
            "format/strict_rate": s / steps,
            "accuracy": 0.01 * s,
            "completion_len/mean": 30.0,
            "completions/truncated_rate": 0.0,
            **{
                f"reward/{n}": 0.01 * s
                for n in ("strict_format", "soft_format", "int_answer", "xml_count", "correctness")
            },
            **{f"time/{k}": 1.0 for k in ("generate", "reward", "train", "sync", "step")},
        }
        for s in range(1, steps + 1)
    ]
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 21, "rew'
    )  # torn line
    summary = {
        "examples": 50,
        "pass@1/strict_accuracy": 0.1,
        "pass@1/lenient_accuracy": 0.2,
        "format/strict_rate": 0.3,
        "format/soft_rate": 0.4,
        "completion_len/mean": 33.0,
        "completions/truncated_rate": 0.0,
        "maj@8/accuracy": 0.25,
    }
    (run / "eval_before.json").write_text(json.dumps(summary))
    (run / "eval_after.json").write_text(json.dumps({**summary, "format/strict_rate": 0.9}))
    (run / "run_info.json").write_text(
        json.dumps(
            {
                "wall_time_s": 600,
                "hardware": "x86_64 2 cores",
                "ranks": 2,
                "device": "cpu",
                "transport": "gloo",
            }
        )
    )
    return run, rows
