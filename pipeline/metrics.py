"""Per-step metrics: the row of metrics.jsonl (a pure function of the step's sums, unit-tested), and
the writers (metrics.jsonl, TensorBoard) on rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist


def group_stats(group_totals: list[list[float]]) -> dict[str, float]:
    """Diagnostics of the step's groups (one row of G rewards per prompt): the mean within-group std,
    and the fraction of groups whose completions all scored the same, which teach nothing (zero
    advantage for every completion)."""
    stds = torch.tensor(group_totals, dtype=torch.float64).std(dim=1)
    return {"reward/std_within_group": float(stds.mean()), "frac_zero_std_groups": float((stds < 1e-9).double().mean())}


def metrics_row(step: int, s: dict[str, float], mx: dict[str, float], reward_names: list[str],
                extra: dict[str, float]) -> dict:
    """The metrics.jsonl row of one step. `s`: sums over every rank's completions (count, tokens,
    reward sums `r_<name>`, loss, ...); `mx`: maxima over ranks; `extra`: values known on rank 0 as
    they are (learning rate, timings, sync figures, group diagnostics)."""
    n, tokens = max(s["count"], 1.0), max(s["tokens"], 1.0)
    row = {
        "step": step, "loss": s["loss"], "reward/total": s["reward_total"] / n,
        **{f"reward/{name}": s[f"r_{name}"] / n for name in reward_names},
        "format/strict_rate": s["strict"] / n, "accuracy": s["correct"] / n,
        "completion_len/mean": s["length"] / n, "completion_len/max": mx["length_max"],
        "completions/truncated_rate": s["truncated"] / n,
        "reasoning/step_accuracy": s["reasoning_correct"] / max(s["reasoning_steps"], 1.0),
        "entropy": s["entropy_sum"] / tokens, "grad_norm": mx["grad_norm"],
        "clip_ratio": s["clipped_tokens"] / tokens, "is_ratio/mean": s["ratio_sum"] / tokens,
        "is_ratio/max": mx["ratio_max"], "is_ratio/capped_frac": s["capped_tokens"] / tokens,
    }
    if "kl_sum" in s:  # beta > 0 only
        row["kl"] = s["kl_sum"] / tokens
    row.update(extra)
    return row


class Metrics:
    """Sums over this rank's share of a step, reduced over ranks, written by rank 0."""

    def __init__(self, run_dir: Path, is_writer: bool):
        self.is_writer = is_writer
        self.file = open(run_dir / "metrics.jsonl", "a") if is_writer else None  # noqa: SIM115
        self.tb = None
        if is_writer:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

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
        for key, value in row.items():
            if key != "step" and isinstance(value, int | float):
                self.tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.tb.close()
