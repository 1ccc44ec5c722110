"""The SFT-for-the-same-time control of a GRPO run on the embedded default.

    python launch/sft_control.py runs/<name>     (or python -m launch.sft_control, grpo-sft-control)

Does GRPO earn its time? This spends the run's GRPO wall time (the sum of its step times) on more
supervised warm start instead: the same recipe (model.build=tiny, same seed, data and schedule
shape) trained for build_sft_steps + N steps, N sized by the warm start's own measured speed. Then
it evaluates that model on the same held-out problems, greedy, and writes <run>/sft_control.json
(and .jsonl) next to eval_before.json / eval_after.json; the run's report shows it when present.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_config


def grpo_seconds(run_dir: Path) -> float:
    """The run's GRPO wall time: the sum of its step times (rollouts, rewards, update, sync)."""
    from pipeline.report.card import read_rows  # skips a line torn by a kill, as the report does

    rows = read_rows(run_dir / "metrics.jsonl")
    if not rows:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'}: no steps recorded")
    return sum(r["time/step"] for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="launch/sft_control.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run of the embedded default (runs/<name>)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        config = load_config(str(run_dir / "config.yaml"))
        build = json.loads((Path(config.model.path) / "build.json").read_text())
    except FileNotFoundError as e:
        print(
            f"error: {e.filename}: not found (expected a finished run of the embedded default, model.build=tiny)",
            file=sys.stderr,
        )
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "sft_seconds" not in build or not build["sft_steps"]:
        print(
            f"error: {config.model.path}/build.json: no warm-start timing (built by an older version; "
            "delete the model from the cache and rerun)",
            file=sys.stderr,
        )
        return 2
    seconds = grpo_seconds(run_dir)
    extra = round(seconds * build["sft_steps"] / build["sft_seconds"])
    config.model.build = "tiny"
    config.model.build_sft_steps = build["sft_steps"] + extra
    print(
        f"GRPO took {seconds:.0f} s; the warm start runs {build['sft_steps'] / build['sft_seconds']:.2f} steps/s: "
        f"building the same warm start with {build['sft_steps']} + {extra} steps...",
        flush=True,
    )

    from pipeline.embedded.default_model import build_default_model

    model = build_default_model(config)
    spent = json.loads((model / "build.json").read_text())["sft_seconds"]
    from pipeline.report import evaluate

    out = run_dir / "sft_control"
    code = evaluate.main(
        ["--model", str(model), "--config", str(run_dir / "config.yaml"), "--maj-k", "0", "--out", str(out)]
    )
    if code:
        return code
    summary = json.loads(out.with_suffix(".json").read_text())
    summary.update(
        {
            "control/grpo_seconds": round(seconds, 1),
            "control/extra_sft_steps": extra,
            "control/extra_sft_seconds": round(spent - build["sft_seconds"], 1),
            "control/model": str(model),
        }
    )
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"-> {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
