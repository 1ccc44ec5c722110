"""`make gpu-check` (after the GPU test suite): a 20-step bf16 run of the real launcher on this GPU box,
then a table for the README: step-time split, sync GB/s, generation tokens/s, peak memory per GPU.

    python bench/gpu_check.py [--config configs/tiny-cpu.yaml] [--steps 20] [--set KEY=VALUE ...]

Writes bench/results-gpu.json. Needs CUDA; exits 2 with a one-line message without it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from peaks import PeakSampler  # bench/peaks.py, beside this script

from launch.gpus import nvidia_smi

REPO = Path(__file__).resolve().parents[1]


def gpu_memory_used() -> dict[str, float]:
    """Used memory (GiB) per GPU, by index."""
    return {row[0]: int(row[1]) / 1024 for row in nvidia_smi("index,memory.used")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny-cpu.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--out", default=str(REPO / "bench" / "results-gpu.json"))
    args = parser.parse_args()
    names = [row[0] for row in nvidia_smi("name")]
    if not names:
        print("error: make gpu-check needs CUDA GPUs (nvidia-smi lists none)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        args.config,
        "--name",
        "check",
        "--set",
        f"run.root={root}",
        "--set",
        "model.dtype=bfloat16",
        "--set",
        f"train.max_steps={args.steps}",
        "--set",
        "eval.enabled=false",
        *sum((["--set", s] for s in args.set), []),
    ]
    memory = PeakSampler(gpu_memory_used)
    run = subprocess.run(cmd, cwd=REPO)
    peaks = memory.stop()
    if run.returncode != 0:
        print(
            f"error: the {args.steps}-step run failed (code {run.returncode}); see {root / 'check'}",
            file=sys.stderr,
        )
        return 1
    rows = [json.loads(line) for line in (root / "check" / "metrics.jsonl").read_text().splitlines()][
        2:
    ]  # warm-up
    info = json.loads((root / "check" / "run_info.json").read_text())
    config = yaml.safe_load((root / "check" / "config.yaml").read_text())

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    completions = (
        config["train"]["micro_batch_size"] * config["train"]["gradient_accumulation_steps"] * info["ranks"]
    )
    result = {
        "gpus": names,
        "ranks": info["ranks"],
        "transport": info["transport"],
        "steps": args.steps,
        "time/step": med("time/step"),
        "time/generate": med("time/generate"),
        "time/train": med("time/train"),
        "time/sync": med("time/sync"),
        "sync/gb_per_s": med("sync/gb_per_s"),
        "generate_tokens_per_s": statistics.median(
            r["completion_len/mean"] * completions / r["time/generate"] for r in rows
        ),
        "sync/logprob_max_abs_diff": max(r["sync/logprob_max_abs_diff"] for r in rows),
        "sync/verified_tensors": min(r["sync/verified_tensors"] for r in rows),
        "peak_memory_gib": dict(sorted(peaks.items())),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\n| GPUs | ranks | sync | step s | generate s | train s | sync s | sync GB/s | gen tokens/s |"
        f" peak GiB per GPU |\n|---|---|---|---|---|---|---|---|---|---|\n"
        f"| {len(names)}x {names[0]} | {info['ranks']} | {info['transport']} | {result['time/step']:.2f} | "
        f"{result['time/generate']:.2f} | {result['time/train']:.2f} | {result['time/sync']:.3f} | "
        f"{result['sync/gb_per_s']:.2f} | {result['generate_tokens_per_s']:.0f} | "
        f"{', '.join(f'{k}: {v}' for k, v in result['peak_memory_gib'].items())} |"
    )
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
