"""Per-step metrics: the row of metrics.jsonl (a pure function of the step's sums, unit-tested), and
the writers (metrics.jsonl, TensorBoard) on rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline import options


def group_stats(group_totals: list[list[float]]) -> dict[str, float]:
    """Diagnostics of the step's groups (one row of G rewards per prompt): the mean within-group std,
    and the fraction of groups whose completions all scored the same, which teach nothing (zero
    advantage for every completion)."""
    stds = torch.tensor(group_totals, dtype=torch.float64).std(dim=1)
    return {
        "reward/std_within_group": float(stds.mean()),
        "frac_zero_std_groups": float((stds < 1e-9).double().mean()),
    }


def metrics_row(
    step: int, s: dict[str, float], mx: dict[str, float], reward_names: list[str], extra: dict[str, float]
) -> dict:
    """The metrics.jsonl row of one step. `s`: sums over every rank's completions (count, tokens,
    reward sums `r_<name>`, loss, ...); `mx`: maxima over ranks; `extra`: values known on rank 0 as
    they are (learning rate, timings, sync figures, group diagnostics)."""
    n, tokens = max(s["count"], 1.0), max(s["tokens"], 1.0)
    row = {
        "step": step,
        "loss": s["loss"],
        "reward/total": s["reward_total"] / n,
        **{f"reward/{name}": s[f"r_{name}"] / n for name in reward_names},
        "format/strict_rate": s["strict"] / n,
        "accuracy": s["correct"] / n,
        "completion_len/mean": s["length"] / n,
        "completion_len/max": mx["length_max"],
        "completions/truncated_rate": s["truncated"] / n,
        "reasoning/step_accuracy": s["reasoning_correct"] / max(s["reasoning_steps"], 1.0),
        "entropy": s["entropy_sum"] / tokens,
        "grad_norm": mx["grad_norm"],
        "clip_ratio": s["clipped_tokens"] / tokens,
        "is_ratio/mean": s["ratio_sum"] / tokens,
        "is_ratio/max": mx["ratio_max"],
        "is_ratio/capped_frac": s["capped_tokens"] / tokens,
    }
    if "kl_sum" in s:  # beta > 0 only
        row["kl"] = s["kl_sum"] / tokens
    if "sampler_weight_sum" in s:  # train.vllm_importance_sampling_correction, with TRL's names
        row["sampling/importance_sampling_ratio/mean"] = s["sampler_weight_sum"] / tokens
        row["sampling/importance_sampling_ratio/max"] = mx["sampler_weight_max"]
        row["sampling/importance_sampling_masked_frac"] = s["sampler_masked_tokens"] / tokens
    row.update(extra)
    return row


def missing_trackers(report_to: list[str]) -> list[str]:
    """The trackers in `report_to` whose package (of the same name) is not installed, checked before start."""
    import importlib.util

    return [name for name in report_to if importlib.util.find_spec(name) is None]


class _TensorBoard:
    """A resumed run (`resumed_at` = the checkpoint's step) purges the events a killed session wrote past
    the checkpoint: TensorBoard hides every event of the run's directory from step resumed_at + 1 on that
    came before this writer's (SummaryWriter's purge_step), so each step's values are the resumed ones."""

    def __init__(self, run_dir: Path, resumed_at: int | None = None, **_):
        from torch.utils.tensorboard import SummaryWriter

        purge = None if resumed_at is None else resumed_at + 1  # rows are logged at step + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, row: dict, step: int) -> None:
        for key, value in row.items():
            self.writer.add_scalar(key, value, step)

    def table(self, name: str, columns: list[str], data: list[list], step: int) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += [
            "| " + " | ".join(str(v).replace("\n", "<br>").replace("|", "\\|") for v in r) + " |"
            for r in data
        ]
        self.writer.add_text(name, "\n".join(lines), step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """Offline with WANDB_MODE=offline (the run lands in <run_dir>/wandb, `wandb sync` uploads it). Each
    session is a wandb run of its own: a resumed one logs from the checkpoint's step on, and what a killed
    session logged past it stays in that session's run (wandb cannot rewind an offline run)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, resumed_at: int | None = None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project=project, name=name, dir=str(run_dir), config=config, reinit="finish_previous"
        )

    def log(self, row: dict, step: int) -> None:
        self.run.log(row, step=step)

    def table(self, name: str, columns: list[str], data: list[list], step: int) -> None:
        self.run.log({name: self.wandb.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    """trackio's local store: <run_dir>/trackio unless TRACKIO_DIR says otherwise (`trackio show` reads it).
    Each session is a trackio run of its own (trackio has no way to drop logged steps): a resumed one
    logs from the checkpoint's step on, and what a killed session logged past it stays in its run."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, resumed_at: int | None = None):
        import os

        os.environ.setdefault("TRACKIO_DIR", str(run_dir / "trackio"))  # read when trackio is imported
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=project, name=name, config=config, embed=False, auto_log_gpu=False, auto_log_cpu=False
        )

    def log(self, row: dict, step: int) -> None:
        self.trackio.log(row, step=step)

    def table(self, name: str, columns: list[str], data: list[list], step: int) -> None:
        self.trackio.log({name: self.trackio.Table(columns=columns, data=data)}, step=step)

    def close(self) -> None:
        self.trackio.finish()


# train.report_to: each tracker's writer
TRACKERS = {"tensorboard": _TensorBoard, "wandb": _WandB, "trackio": _Trackio}
options.check_implements(__name__, "TRACKERS", TRACKERS)


class Metrics:
    """Sums over this rank's share of a step, reduced over ranks, written by rank 0: metrics.jsonl
    (the record every report reads) and each tracker in train.report_to. Sampled completions go to
    completions.jsonl and to the trackers as a table."""

    def __init__(
        self,
        run_dir: Path,
        is_writer: bool,
        report_to: list[str] = ("tensorboard",),
        project: str = "grpo-pipeline",
        run_name: str = "",
        config: dict | None = None,
        resumed_at: int | None = None,
    ):
        """`resumed_at`: the checkpoint's step when the run resumed (the caller trimmed the .jsonl files
        to it; the trackers are told, see each)."""
        self.is_writer = is_writer
        self.file = open(run_dir / "metrics.jsonl", "a") if is_writer else None  # noqa: SIM115
        self.samples = open(run_dir / "completions.jsonl", "a") if is_writer else None  # noqa: SIM115
        self.trackers = (
            [
                TRACKERS[name](
                    run_dir,
                    project=project,
                    name=run_name or run_dir.name,
                    config=config or {},
                    resumed_at=resumed_at,
                )
                for name in report_to
            ]
            if is_writer
            else []
        )

    @staticmethod
    def reduce(sums: dict[str, float], maxima: dict[str, float], device) -> tuple[dict, dict]:
        keys, mkeys = sorted(sums), sorted(maxima)
        s = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
        m = torch.tensor([maxima[k] for k in mkeys] or [0.0], dtype=torch.float64, device=device)
        dist.all_reduce(s, op=dist.ReduceOp.SUM)
        dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return dict(zip(keys, s.tolist(), strict=True)), dict(zip(mkeys, m.tolist(), strict=False))

    def write(self, row: dict) -> None:
        if not self.is_writer:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, int | float)}
        for tracker in self.trackers:
            tracker.log(scalars, row["step"])

    def write_completions(self, step: int, samples: list[dict]) -> None:
        """One row per sampled completion: prompt, completion, reference, each reward, total, advantage."""
        if not self.is_writer or not samples:
            return
        for sample in samples:
            self.samples.write(json.dumps({"step": step, **sample}) + "\n")
        self.samples.flush()
        columns = list(samples[0])
        data = [[s[c] for c in columns] for s in samples]
        for tracker in self.trackers:
            tracker.table("completions", columns, data, step)

    def close(self) -> None:
        if self.is_writer:
            self.file.close()
            self.samples.close()
            for tracker in self.trackers:
                tracker.close()
