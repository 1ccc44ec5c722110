"""The run report: training curves (PNG), before/after evaluation, and a model card README.md.

    python -m pipeline.report runs/<name>        (make report RUN=runs/<name>)

The card imitates the prem-1B-grpo model card (../shared/seeds) section by section, filled in with
this run's configuration and measured numbers instead of claims.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from pipeline.task.reward_functions import BUILTIN_REWARDS
from pipeline.task.xml_format import format_completion

EVAL_KEYS = [
    "pass@1/strict_accuracy",
    "pass@1/lenient_accuracy",
    "format/strict_rate",
    "format/soft_rate",
    "reasoning/step_accuracy",
    "reasoning/no_step_rate",
    "reasoning/final_consistent_rate",
    "completion_len/mean",
    "completions/truncated_rate",
]


REPO = Path(__file__).resolve().parents[2]


def repo_relative(path: str) -> str:
    """A path inside the repository as the repository names it (configs/ds_zero2.json), not as the
    machine that trained spelled it; any other path as given."""
    try:
        return str(Path(path).relative_to(REPO))
    except ValueError:
        return path


def read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write: the rest of the file is still good
    return rows


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def window_means(rows: list[dict], key: str, fraction: float = 0.2) -> tuple[float, float]:
    """Mean of `key` over the first and the last `fraction` of steps."""
    values = [r[key] for r in rows if key in r]
    if not values:
        return float("nan"), float("nan")
    k = max(1, int(len(values) * fraction))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(rows: list[dict], run_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    window = max(1, len(rows) // 20)
    written = []
    # the built-ins in the card's order, then plugins (any other reward/<name> column) by name
    logged = {k[len("reward/") :] for r in rows for k in r if k.startswith("reward/")} - {
        "total",
        "std_within_group",
    }
    reward_names = [n for n in BUILTIN_REWARDS if n in logged] + sorted(logged - set(BUILTIN_REWARDS))
    panels = {
        "reward_curves.png": ["reward/total"] + [f"reward/{n}" for n in reward_names],
        "format_curves.png": [
            "format/strict_rate",
            "accuracy",
            "reasoning/step_accuracy",
            "completion_len/mean",
            "completions/truncated_rate",
        ],
        "health_curves.png": [
            "grad_norm",
            "entropy",
            "reward/std_within_group",
            "frac_zero_std_groups",
            "completion_len/max",
            "clip_ratio",
        ],
    }
    present = {k for r in rows for k in r if k.startswith("eval/")}
    evals = [
        k
        for k in ("eval/pass@1/strict_accuracy", "eval/pass@1/lenient_accuracy", "eval/format/strict_rate")
        if k in present
    ] + sorted(k for k in present if k.startswith("eval/maj@") and k.endswith("/accuracy"))
    if evals:  # eval.every: sparse rows, plotted as points joined by lines
        panels["eval_curves.png"] = evals
    for filename, keys in panels.items():
        fig, axes = plt.subplots(
            2, (len(keys) + 1) // 2, figsize=(4 * ((len(keys) + 1) // 2), 6.5), squeeze=False
        )
        for ax, key in zip(axes.flat, keys, strict=False):
            if key.startswith("eval/"):  # evaluated every eval.every steps: the points themselves
                ax.plot(
                    [r["step"] for r in rows if key in r],
                    [r[key] for r in rows if key in r],
                    "o-",
                    color="tab:green",
                )
            else:
                values = [r.get(key, float("nan")) for r in rows]
                ax.plot(steps, values, alpha=0.3, color="tab:blue")
                ax.plot(steps, _smooth(values, window), color="tab:blue")
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.suptitle(f"{run_dir.name}: raw and {window}-step moving average")
        fig.tight_layout()
        fig.savefig(run_dir / filename, dpi=90)
        plt.close(fig)
        written.append(filename)
    return written


def eval_table(before: dict | None, after: dict | None, control: dict | None = None) -> str:
    """Before vs after GRPO, plus (launch/sft_control.py) more SFT for the same time instead."""
    if not before and not after:
        return "_No evaluation was run._"
    columns = [before, after] + ([control] if control else [])
    head = "| metric | before GRPO | after GRPO |" + (" more SFT instead (same time) |" if control else "")
    lines = [head, "|---" * len(columns) + "|---|"]
    keys = EVAL_KEYS + sorted(
        k for k in (after or before) if k.startswith(("maj@", "pass@")) and k not in EVAL_KEYS
    )
    for key in keys:
        cells = [f"{d[key]:.3f}" if d and key in d else "–" for d in columns]
        lines.append(f"| {key} | {' | '.join(cells)} |")
    n = (after or before).get("examples")
    text = "\n".join(lines) + f"\n\nOn {n} held-out test problems (greedy decoding for pass@1)."
    if control:
        text += (
            f" The last column spends GRPO's {control['control/grpo_seconds']:.0f} s on "
            f"{control['control/extra_sft_steps']} more warm-start steps instead (`launch/sft_control.py`)."
        )
    return text


def before_after_samples(run_dir: Path, count: int = 12) -> Path | None:
    """The same held-out problems answered before and after GRPO, side by side, as markdown."""
    if not (run_dir / "eval_before.jsonl").exists() or not (run_dir / "eval_after.jsonl").exists():
        return None
    before, after = read_rows(run_dir / "eval_before.jsonl"), read_rows(run_dir / "eval_after.jsonl")
    if not before or not after:
        return None
    out = ["# The same held-out problems before and after GRPO (greedy)", ""]
    for b, a in list(zip(before, after, strict=False))[:count]:
        out += [f"## {b['source']}: {b['question']}", f"Reference: **{b['reference']}**", ""]
        for label, r in (("before", b), ("after", a)):
            mark = "correct" if r["strict_correct"] else "wrong"
            out += [f"{label} ({mark}):", "```", r["completion"], "```"]
        out.append("")
    path = run_dir / "samples_before_after.md"
    path.write_text("\n".join(out))
    return path


def describe_data(config: dict) -> tuple[str | None, str]:
    """(Hub dataset id for the card's metadata, or None for generated data; prose)."""
    data = config["data"]
    if data["source"] == "hub":
        return data[
            "hub_name"
        ], f"`{data['hub_name']}` (config `{data['hub_config']}`) from the Hugging Face Hub."
    if data["source"] == "jsonl":
        return (
            "openai/gsm8k",
            f"GSM8K-format JSONL: `{data['train_file']}` (train), `{data['test_file']}` (test).",
        )
    return None, (
        f"GSM8K-style word problems generated by this project (`pipeline/task/synthetic.py`: seeded templates, "
        f"1-{data.get('synthetic_levels', 3)} arithmetic steps, numbers up to {data.get('synthetic_max_operand', 10)}, "
        f"exact answers): {data['synthetic_train']} for "
        f"training, {data['synthetic_test']} held out for evaluation (disjoint question texts). Same fields "
        "and loader as GSM8K."
    )


def model_card(
    run_dir: Path,
    config: dict,
    rows: list[dict],
    before: dict | None,
    after: dict | None,
    info: dict,
    plots: list[str],
    control: dict | None = None,
) -> str:
    t, m = config["train"], config["model"]
    base = m["path"]
    built = read_json(Path(base) / "build.json") if base and Path(base).exists() else None
    dataset_id, dataset_text = describe_data(config)
    plugins = config.get("reward_functions") or {}
    weights = {
        name: config.get("rewards", {}).get(
            name, BUILTIN_REWARDS[name].weight if name in BUILTIN_REWARDS else 1.0
        )
        for name in [*BUILTIN_REWARDS, *plugins]
    }
    first_r, last_r = window_means(rows, "reward/total")
    first_s, last_s = window_means(rows, "format/strict_rate")
    first_a, last_a = window_means(rows, "accuracy")
    first_q, last_q = window_means(rows, "reasoning/step_accuracy")
    times = {
        k: window_means(rows, f"time/{k}", 1.0)[0] for k in ("generate", "reward", "train", "sync", "step")
    }
    meta = {
        "language": ["en"],
        "tags": ["math", "reasoning", "grpo", "gsm8k", "reinforcement-learning"],
        "license": "apache-2.0",
        "datasets": [dataset_id],
        "metrics": ["accuracy", "format_adherence"],
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "base_model": base,
    }
    # The Hub validates these as repo ids: a model built here or a local directory has none to name.
    if dataset_id is None:
        del meta["datasets"]
    if built or Path(base).exists():
        del meta["base_model"]
    reward_lines = "\n".join(
        [
            f"| `{name}` | {r.points:g}{' (up to)' if name == 'xml_count' else ''} | {weights[name]:g} | {r.about} |"
            for name, r in BUILTIN_REWARDS.items()
        ]
        + [f"| `{name}` | - | {weights[name]:g} | your own: `{spec}` |" for name, spec in plugins.items()]
    )
    if built:
        kinds = []  # what is special about the warm start's solutions
        if built.get("early_answers"):
            kinds.append(
                f"{built['early_answers']:.0%} of them from a sloppy teacher whose working is right but whose "
                "answer is one step early (what GRPO's correctness reward has to unlearn)"
            )
        if built.get("tool_demos"):
            kinds.append(
                f"{built['tool_demos']:.0%} of them asking the built-in calculator for each step first (calls "
                "and results as a multi-turn conversation; the rest compute in the working)"
            )
        base_text = (
            f"A Qwen2-architecture causal LM built by this project with no download: byte-level BPE "
            f"tokenizer trained on the training problems, hidden size {built['hidden']}, {built['layers']} "
            f"layers, then {built['sft_steps']} steps of supervised warm start (TRL `SFTTrainer`) on "
            f"formatted solutions" + "".join(f", {kind}" for kind in kinds) + "."
        )
    else:
        base_text = f"Started from `{base}`."
    wall = info.get("wall_time_s")
    floor = f" down to {t['min_lr_ratio']:g} x the peak" if t.get("min_lr_ratio") else ""
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# GRPO-trained math reasoning model: `{run_dir.name}`

## Model Description

Fine-tuned with GRPO (Group Relative Policy Optimization): for each prompt {t["num_generations"]}
completions are sampled, scored by five rule-based rewards, and the policy is pushed towards the
completions that beat their group's mean. The rewards teach both a strict output format and correct
answers. Trained with this repository's pipeline (a vLLM generation server + DeepSpeed ZeRO trainer
ranks, weights pushed into the server every step).

## Base Model

- {base_text}
- Attention: `{m["attn_implementation"]}` (Flash Attention 2 on GPUs when `auto`), precision `{m["dtype"]}`.
- Model architecture: Causal Language Model (CLM).

## GRPO Training Details

The model is taught to answer as:

```
{format_completion("[step-by-step solution]", "[numerical answer]")}
```

| reward | points | weight in this run | what it checks |
|---|---|---|---|
{reward_lines}

## Training Configuration

- Learning rate: {t["learning_rate"]:g} ({t["lr_scheduler"]} schedule{floor}, warmup ratio {t["warmup_ratio"]:g})
- Batch size: {t["micro_batch_size"]} completions per device, gradient accumulation {t["gradient_accumulation_steps"]}, {info.get("ranks", "?")} trainer ranks
- Steps: {len(rows)} optimizer steps ({t["epochs"]} epoch{"s" if t["epochs"] != 1 else ""} cap, `max_steps` {t["max_steps"] or "unset"})
- Generations per prompt: {t["num_generations"]}; temperature {t["temperature"]:g}, top-p {t["top_p"]:g}
- Maximum prompt length: {config["data"]["max_prompt_tokens"]} tokens; maximum completion length: {t["max_completion_tokens"]} tokens
- Loss: clipped surrogate (epsilon {t["epsilon"]:g}{f", epsilon_high {t['epsilon_high']:g}" if t.get("epsilon_high") else ""}), loss type `{t.get("loss_type", "grpo")}`, advantages scaled by `{t["advantage_scaling"]}`, KL beta {t["beta"]:g}
- Gradient clipping (max norm): {t["max_grad_norm"]:g}; DeepSpeed config `{repo_relative(t["deepspeed_config"])}`
- Seed: {config["run"]["seed"]}

## Dataset

{dataset_text}

## Results

Training curves (means over the first vs the last 20% of steps):

| | first 20% | last 20% |
|---|---|---|
| reward/total | {first_r:.3f} | {last_r:.3f} |
| format/strict_rate | {first_s:.3f} | {last_s:.3f} |
| accuracy (correct answers among samples) | {first_a:.3f} | {last_a:.3f} |
| reasoning/step_accuracy (correct arithmetic claims) | {first_q:.3f} | {last_q:.3f} |

{"".join(f"![{p}]({p})" + chr(10) for p in plots)}
Evaluation before vs after GRPO:

{eval_table(before, after, control)}

## Intended Use

- Solving grade-school math word problems with step-by-step reasoning
- A reproducible reference run for this GRPO pipeline (what the recipe does at this scale)

## Limitations

- Limited to the complexity of its training problems; {"a model this small hardly improves its arithmetic under GRPO: what GRPO fixes here is which number it answers with, and nothing rewards the working, which can drift" if built else "may struggle with problems beyond GSM8K"}
- The rewards check format and the final answer only, not whether the reasoning is sound
- Performance depends on the prompt using the same system prompt and chat template

## Training Infrastructure

- Hardware: {info.get("hardware", "unknown")}
- {info.get("ranks", "?")} DeepSpeed trainer ranks ({info.get("device", "?")}), one vLLM generation server process; weights synced every step over {info.get("transport", "?")}
- Wall time: {f"{wall / 60:.1f} min" if wall else "unknown"} for the whole run (model build, server start, evaluation, training)
- Mean step time {times["step"]:.2f} s: generate {times["generate"]:.2f} s, reward {times["reward"]:.3f} s, train {times["train"]:.2f} s, weight sync {times["sync"]:.3f} s
- Gradient clipping (max norm {t["max_grad_norm"]:g}); {"NCCL" if info.get("device") == "cuda" else "gloo"} for distributed training

## Evaluation

Measured on held-out problems: format adherence (strict and soft XML), mathematical accuracy
(strict: correct and in format; lenient: correct answer anywhere sensible; maj@k over samples),
quality of step-by-step reasoning (`reasoning/step_accuracy`: the fraction of arithmetic claims
`expression = value` inside `<reasoning>` that are correct, evaluated by a safe parser; completions
with no checkable step are counted apart in `reasoning/no_step_rate`; `final_consistent_rate`: the
answer equals the last computed value), completion length and truncation. Per-example completions
are in `eval_before.jsonl` and `eval_after.jsonl`; `samples_before_after.md` puts the same problems side by side.

## Citation

If you use this model, please cite DeepSeekMath (GRPO) and GSM8K (Cobbe et al., 2021).
"""


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").exists():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (not a run directory, or no step finished)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = read_rows(run_dir / "metrics.jsonl")
    plots = plot_curves(rows, run_dir) if rows else []
    card = model_card(
        run_dir,
        config,
        rows,
        read_json(run_dir / "eval_before.json"),
        read_json(run_dir / "eval_after.json"),
        read_json(run_dir / "run_info.json") or {},
        plots,
        read_json(run_dir / "sft_control.json"),
    )
    before_after_samples(run_dir)
    (run_dir / "README.md").write_text(card)
    return run_dir / "README.md"


def main(argv=None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m pipeline.report RUN_DIR", file=sys.stderr)
        return 2
    try:
        print(write_report(args[0]))
    except (FileNotFoundError, KeyError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
