"""`make bench`: this pipeline (synchronous and overlapped) against TRL's GRPOTrainer, one machine,
one model, equal settings (G=16, 1 prompt per step, 200-token completions, same data, same steps,
fp32 on CPU). Warm-up steps are excluded. Writes bench/results.json and prints a table.

    python bench/run.py            # ~100M-parameter Qwen2 built locally, plus the tiny default
    python bench/run.py --quick    # tiny model, few steps: checks the benchmark itself still runs (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from peaks import PeakSampler  # noqa: E402 - bench/peaks.py, beside this script

from pipeline.generation.client import free_port  # noqa: E402

PY = sys.executable


ROLES = (
    ("EngineCore", "server engine core"),
    ("VLLM::Worker", "server worker"),
    ("Worker", "server worker"),
    ("pipeline.generation.serve", "server API"),
    ("pipeline.trainer", "trainer rank"),
    ("trl_baseline", "TRL process"),
)


def rss_by_role() -> dict[str, float]:
    """The resident memory (GiB) of every process below the benchmark, the largest of each role."""
    peaks: dict[str, float] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            text = " ".join(proc.cmdline()) + " " + proc.name()
            rss = proc.memory_info().rss / 2**30
        except psutil.Error:
            continue
        role = next((role for needle, role in ROLES if needle in text), None)
        if role:
            peaks[role] = max(peaks.get(role, 0.0), rss)
    return peaks


def build_model(out: Path, hidden: int, layers: int) -> Path:
    if (out / "config.json").exists():
        return out
    from pipeline.embedded.tiny_model import build_tiny_model
    from pipeline.embedded.warmstart import formatted_completion
    from pipeline.task.synthetic import generate
    from pipeline.task.xml_format import SYSTEM_PROMPT

    corpus = [SYSTEM_PROMPT] + [e.question + "\n" + formatted_completion(e) for e in generate(2000, 0)]
    return build_tiny_model(
        out,
        corpus,
        vocab_size=1024,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        num_kv_heads=max(1, hidden // 256),
        tie_word_embeddings=False,
    )


def model_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def inprocess_copy_gbps(nbytes: int) -> float:
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / min(times) / 1e9


def run_ours(
    name: str,
    model: Path,
    steps: int,
    max_tokens: int,
    staleness: int,
    root: Path,
    rss: PeakSampler,
    engines: int = 1,
    env: dict[str, str] | None = None,
) -> dict:
    cmd = [
        PY,
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        "--name",
        name,
        "--set",
        f"run.root={root}",
        "--set",
        f"model.path={model}",
        "--set",
        "model.build=",
        "--set",
        "train.micro_batch_size=4",
        "--set",
        "train.gradient_accumulation_steps=2",
        "--set",
        f"train.max_steps={steps}",
        "--set",
        f"train.max_completion_tokens={max_tokens}",
        "--set",
        "server.max_model_len=512",
        "--set",
        "data.max_prompt_tokens=256",
        "--set",
        "eval.enabled=false",
        "--set",
        f"train.max_staleness={staleness}",
        "--set",
        "train.learning_rate=1e-5",
        "--set",
        "sync.bucket_mb=256",
        "--set",
        f"server.data_parallel_size={engines}",
        "--set",
        f"server.port={free_port('127.0.0.1')}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=3600, cwd=REPO, env={**os.environ, **(env or {})}
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        return {
            "ok": False,
            "error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:300],
            "peak_rss_gib": rss.take(),
        }
    rows = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]
    return {"ok": True, "rows": rows, "wall_s": wall, "peak_rss_gib": rss.take()}


def step_phases(rows: list[dict], overlap: bool) -> dict[str, float]:
    """Where the trainer's step goes, phase by phase (medians over the measured steps; they add up to the
    median step, the remainder as `other`). Synchronous: the wait for rollouts split into the server's
    engine (prefill, decode), HTTP and (de)serialisation, and the broadcast of the rollouts to the ranks.
    Overlapped: generation runs beside training, so the trainer's view shows only its wait for it."""
    med = statistics.median

    def m(key: str) -> float:
        return med(r.get(key, 0.0) for r in rows)

    if overlap:
        phases = {"waiting for rollouts": m("time/generate") + m("time/wait_rollouts")}
    else:
        phases = {
            "engine prefill": m("time/engine_prefill"),
            "engine decode": m("time/engine_decode"),
            "engine other": max(0.0, m("time/engine") - m("time/engine_prefill") - m("time/engine_decode")),
            "HTTP + (de)serialisation": m("time/http"),
            "rollout broadcast": m("time/broadcast_rollouts"),
        }
        phases["waiting for rollouts, other"] = max(
            0.0, m("time/generate") + m("time/wait_rollouts") - sum(phases.values())
        )
    phases.update(
        {
            "reward": m("time/reward"),
            "forward": m("time/forward"),
            "backward": m("time/backward"),
            "optimizer": m("time/optimizer"),
            "push": max(0.0, m("time/sync") - m("time/verify")),
            "verify": m("time/verify"),
            "probe": m("time/probe"),
        }
    )
    phases["other"] = max(0.0, med(r["time/step"] for r in rows) - sum(phases.values()))
    return {k: round(v, 4) for k, v in phases.items()}


def summarise_ours(result: dict, warmup: int, nbytes: int, overlap: bool = False, drain: int = 0) -> dict:
    """The run's steady state: the first `warmup` steps left out, and the last `drain` (with
    train.max_staleness k, the last k steps have nothing left to generate beside them: training alone,
    faster than any step of a longer run; run_ours is given k more steps for them)."""
    if not result["ok"]:
        return result
    rows = result["rows"][warmup : len(result["rows"]) - drain] or result["rows"]
    step = [r["time/step"] for r in rows]
    med = statistics.median
    idle = [r["time/generate"] + r.get("time/wait_rollouts", 0.0) for r in rows]
    tokens = [r["completion_len/mean"] * 16 for r in rows]
    return {
        "ok": True,
        "steps_measured": len(rows),
        "s_per_step_median": med(step),
        "s_per_step_min": min(step),
        "s_per_step_max": max(step),
        "rollout_tokens_per_s": sum(tokens) / sum(step),
        "split_s": {
            "generate_wait": med(r["time/generate"] for r in rows),
            "reward": med(r["time/reward"] for r in rows),
            "train": med(r["time/train"] for r in rows),
            "sync": med(r["time/sync"] for r in rows),
            "wait_rollouts": med(r.get("time/wait_rollouts", 0.0) for r in rows),
        },
        "trainer_idle_fraction": sum(idle) / sum(step),
        "phases_s": step_phases(rows, overlap),
        "sync_gb_per_s": nbytes / med(r["time/sync"] for r in rows) / 1e9,
        "sync_fraction_of_step": med(r["time/sync"] / r["time/step"] for r in rows),
        "max_staleness_seen": max(r.get("rollout/staleness_max", 0) for r in result["rows"]),
        "staleness_mean": med(r.get("rollout/staleness_mean", 0.0) for r in rows),
        "version_span_max": max(r.get("rollout/version_span_max", 0.0) for r in rows),
        "generation_idle_fraction": med(r.get("time/generation_idle_frac", 0.0) for r in rows),
        **(
            {"engine_imbalance_median": med(r["rollout/engine_imbalance"] for r in rows)}
            if "rollout/engine_imbalance" in rows[0]
            else {}
        ),
        "wall_s": result["wall_s"],
        "peak_rss_gib": result["peak_rss_gib"],
    }


def run_trl(
    name: str,
    model: Path,
    steps: int,
    max_tokens: int,
    use_vllm: bool,
    root: Path,
    rss: PeakSampler,
    warmup: int,
) -> dict:
    out = root / f"{name}.json"
    cmd = [
        PY,
        str(REPO / "bench" / "trl_baseline.py"),
        "--model",
        str(model),
        "--steps",
        str(steps),
        "--max-completion",
        str(max_tokens),
        "--out",
        str(out),
    ] + (["--use-vllm"] if use_vllm else [])
    try:
        subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=1800,
            cwd=REPO,
            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timed out", "peak_rss_gib": rss.take()}
    data = json.loads(out.read_text()) if out.exists() else {"ok": False, "error": "no result written"}
    if not data.get("ok"):
        return {"ok": False, "error": data.get("error", "?"), "peak_rss_gib": rss.take()}
    times = data["step_times"][warmup:] or data["step_times"]
    tokens = data["completion_tokens"][warmup:] or data["completion_tokens"] or [0]
    return {
        "ok": True,
        "steps_measured": len(times),
        "s_per_step_median": statistics.median(times),
        "s_per_step_min": min(times),
        "s_per_step_max": max(times),
        "rollout_tokens_per_s": sum(tokens[: len(times)]) / sum(times),
        "peak_rss_gib": rss.take(),
    }


def table(results: dict) -> str:
    lines = [
        f"{'run':<38}{'s/step (median, min-max)':>28}{'tokens/s':>10}{'idle':>7}{'gen idle':>10}{'sync GB/s':>11}",
        "-" * 104,
    ]
    for name, r in results["runs"].items():
        if not r.get("ok"):
            lines.append(f"{name:<38}  FAILED: {r.get('error', '?')[:80]}")
            continue
        spread = f"{r['s_per_step_median']:.2f} ({r['s_per_step_min']:.2f}-{r['s_per_step_max']:.2f})"
        idle = f"{r['trainer_idle_fraction']:.0%}" if "trainer_idle_fraction" in r else "-"
        sync = f"{r['sync_gb_per_s']:.2f}" if "sync_gb_per_s" in r else "-"
        gen = f"{r['generation_idle_fraction']:.0%}" if "generation_idle_fraction" in r else "-"
        lines.append(f"{name:<38}{spread:>28}{r['rollout_tokens_per_s']:>10.0f}{idle:>7}{gen:>10}{sync:>11}")
    lines.append("")
    for key, value in results["ratios"].items():
        lines.append(f"{key}: {value:.2f}x" if value else f"{key}: n/a")
    lines.append(f"in-process copy of the model's bytes: {results['inprocess_copy_gb_per_s']:.2f} GB/s")
    for name, r in results["runs"].items():
        if r.get("phases_s"):
            lines.append(f"\n{name}: where a step's {r['s_per_step_median']:.2f} s go (median per phase)")
            lines += [
                f"  {phase:<30}{seconds:>8.3f} s {seconds / r['s_per_step_median']:>6.0%}"
                for phase, seconds in r["phases_s"].items()
            ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Step time per run, stacked by phase (TRL's steps are not split: one bar each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {name: r for name, r in results["runs"].items() if r.get("ok")}
    phases = list(dict.fromkeys(p for r in runs.values() for p in r.get("phases_s", {})))
    colors = dict(zip(phases, plt.cm.tab20.colors, strict=False))
    fig, ax = plt.subplots(figsize=(10, 0.55 * len(runs) + 2.5))
    for y, r in enumerate(runs.values()):
        left = 0.0
        for phase, seconds in (
            r.get("phases_s") or {"whole step (not split)": r["s_per_step_median"]}
        ).items():
            ax.barh(
                y,
                seconds,
                left=left,
                color=colors.get(phase, "0.6"),
                label=phase if phase not in ax.get_legend_handles_labels()[1] else None,
            )
            left += seconds
        ax.text(left, y, f" {r['s_per_step_median']:.2f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(runs)), list(runs))
    ax.invert_yaxis()
    ax.set_xlabel("seconds per optimizer step (median)")
    ax.set_title(f"Where a GRPO step's time goes ({results['settings']['machine']}, {results['date']})")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="tiny model, 3 steps: checks that the benchmark runs"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 6, quick 3)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results.json"))
    args = parser.parse_args()
    steps = args.steps or (3 if args.quick else 6)
    warmup = 1 if args.quick else 2
    max_tokens = 32 if args.quick else 200
    root = REPO / "bench" / "runs" / time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    models = {"tiny": build_model(REPO / "bench" / "models" / "tiny", 64, 2)}
    if not args.quick:
        models["100M"] = build_model(REPO / "bench" / "models" / "qwen2-100M", 1024, 8)
    rss = PeakSampler(rss_by_role)
    runs: dict[str, dict] = {}
    for label, model in reversed(models.items()):  # the main model first
        nbytes = model_bytes(model)
        print(f"[{label}] ours, synchronous ...", flush=True)
        runs[f"{label} ours sync"] = summarise_ours(
            run_ours(f"{label}-sync", model, steps, max_tokens, 0, root, rss), warmup, nbytes
        )
        print(f"[{label}] ours, overlapped ...", flush=True)
        runs[f"{label} ours overlap"] = summarise_ours(
            run_ours(f"{label}-overlap", model, steps + 1, max_tokens, 1, root, rss),
            warmup,
            nbytes,
            overlap=True,
            drain=1,
        )
        # train.max_staleness k >= 2: k steps generated ahead, each push landing mid-generation
        for k in (2,) if args.quick else (2, 4):
            print(f"[{label}] ours, async k={k} ...", flush=True)
            runs[f"{label} ours async k={k}"] = summarise_ours(
                run_ours(f"{label}-async-k{k}", model, steps + k, max_tokens, k, root, rss),
                warmup,
                nbytes,
                overlap=True,
                drain=k,
            )
        if label == "tiny" and not args.quick:
            # Side by side with the row above: vLLM's own 1 s idle spin (our plugin that shortens it to
            # 5 ms left out; VLLM_PLUGINS is vLLM's allow-list of plugins).
            print(f"[{label}] ours, synchronous, vLLM's 1 s idle spin ...", flush=True)
            runs[f"{label} ours sync, vLLM's idle spin"] = summarise_ours(
                run_ours(
                    f"{label}-sync-spin",
                    model,
                    steps,
                    max_tokens,
                    0,
                    root,
                    rss,
                    env={"VLLM_PLUGINS": "grpo_gloo_transfer"},
                ),
                warmup,
                nbytes,
            )
        # Generation on both cores while the ranks wait: two engines (each pinned to its own core by the
        # launcher) or one engine whose worker may use both (vLLM-CPU's own thread binding).
        print(f"[{label}] ours, synchronous, 2 engines ...", flush=True)
        runs[f"{label} ours sync, 2 engines"] = summarise_ours(
            run_ours(f"{label}-sync-2e", model, steps, max_tokens, 0, root, rss, engines=2),
            warmup,
            nbytes,
        )
        if not args.quick:
            print(f"[{label}] ours, overlapped, 2 engines ...", flush=True)
            runs[f"{label} ours overlap, 2 engines"] = summarise_ours(
                run_ours(f"{label}-overlap-2e", model, steps + 1, max_tokens, 1, root, rss, engines=2),
                warmup,
                nbytes,
                overlap=True,
                drain=1,
            )
            print(f"[{label}] ours, synchronous, 1 engine on both cores ...", flush=True)
            runs[f"{label} ours sync, 1 engine x 2 cores"] = summarise_ours(
                run_ours(
                    f"{label}-sync-2c",
                    model,
                    steps,
                    max_tokens,
                    0,
                    root,
                    rss,
                    env={"VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}"},
                ),
                warmup,
                nbytes,
            )
        print(f"[{label}] TRL GRPOTrainer use_vllm=False ...", flush=True)
        runs[f"{label} TRL (HF generate)"] = run_trl(
            f"{label}-trl", model, steps, max_tokens, False, root, rss, warmup
        )
        if label == next(reversed(models)):
            print(f"[{label}] TRL GRPOTrainer use_vllm=True (colocate) ...", flush=True)
            runs[f"{label} TRL (vLLM colocate)"] = run_trl(
                f"{label}-trl-vllm", model, steps, max_tokens, True, root, rss, warmup
            )
    rss.stop()
    main_label = next(reversed(models))

    def ratio(a: str, b: str) -> float | None:
        ra, rb = runs.get(f"{main_label} {a}", {}), runs.get(f"{main_label} {b}", {})
        return rb["s_per_step_median"] / ra["s_per_step_median"] if ra.get("ok") and rb.get("ok") else None

    main_bytes = model_bytes(models[main_label])
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "model": main_label,
        "params_bytes_fp32": main_bytes,
        "steps": steps,
        "warmup_excluded": warmup,
        "settings": {
            "G": 16,
            "prompts_per_step": 1,
            "max_completion_tokens": max_tokens,
            "dtype": "float32",
            "trainer_ranks": 2,
            "machine": f"{os.cpu_count()} cores",
        },
        "runs": runs,
        "ratios": {
            "sync speed-up vs TRL (HF generate)": ratio("ours sync", "TRL (HF generate)"),
            "overlap speed-up vs TRL (HF generate)": ratio("ours overlap", "TRL (HF generate)"),
            "overlap speed-up vs sync": ratio("ours overlap", "ours sync"),
            "sync speed-up vs TRL (vLLM)": ratio("ours sync", "TRL (vLLM colocate)"),
            "overlap speed-up vs TRL (vLLM)": ratio("ours overlap", "TRL (vLLM colocate)"),
            "async k=2 speed-up vs TRL (vLLM)": ratio("ours async k=2", "TRL (vLLM colocate)"),
            "async k=4 speed-up vs TRL (vLLM)": ratio("ours async k=4", "TRL (vLLM colocate)"),
            "async k=2 speed-up vs TRL (HF generate)": ratio("ours async k=2", "TRL (HF generate)"),
            "async k=4 speed-up vs TRL (HF generate)": ratio("ours async k=4", "TRL (HF generate)"),
            "async k=2 speed-up vs overlap": ratio("ours async k=2", "ours overlap"),
            "sync 2 engines speed-up vs TRL (HF generate)": ratio(
                "ours sync, 2 engines", "TRL (HF generate)"
            ),
            "overlap 2 engines speed-up vs TRL (HF generate)": ratio(
                "ours overlap, 2 engines", "TRL (HF generate)"
            ),
            "sync 2 engines speed-up vs TRL (vLLM)": ratio("ours sync, 2 engines", "TRL (vLLM colocate)"),
            "overlap 2 engines speed-up vs TRL (vLLM)": ratio(
                "ours overlap, 2 engines", "TRL (vLLM colocate)"
            ),
            "sync 1 engine x 2 cores speed-up vs TRL (vLLM)": ratio(
                "ours sync, 1 engine x 2 cores", "TRL (vLLM colocate)"
            ),
            "sync 2 engines speed-up vs sync 1 engine": ratio("ours sync, 2 engines", "ours sync"),
        },
        "inprocess_copy_gb_per_s": inprocess_copy_gbps(main_bytes),
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    plot(results, Path(args.out).with_suffix(".png"))
    print("\n" + table(results))
    print(f"-> {args.out}, {Path(args.out).with_suffix('.png')}")
    failed = [n for n, r in runs.items() if not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
