"""The metrics row is a pure function of a step's sums: checked by hand."""

import math

import pytest

from pipeline.trainer.metrics import group_stats, metrics_row


def test_group_stats_by_hand():
    stats = group_stats([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 0.0, 2.0]])
    assert stats["frac_zero_std_groups"] == 0.5  # the first group teaches nothing
    assert stats["reward/std_within_group"] == pytest.approx((0 + math.sqrt(4 / 3)) / 2)  # unbiased std


def test_metrics_row_by_hand():
    sums = {
        "count": 4.0,
        "tokens": 40.0,
        "loss": 0.25,
        "reward_total": 6.0,
        "r_correctness": 4.0,
        "r_mine": 1.0,
        "strict": 3.0,
        "correct": 2.0,
        "length": 48.0,
        "truncated": 1.0,
        "reasoning_steps": 4.0,
        "reasoning_correct": 3.0,
        "entropy_sum": 20.0,
        "clipped_tokens": 4.0,
        "ratio_sum": 40.0,
        "capped_tokens": 0.0,
    }
    row = metrics_row(
        7,
        sums,
        {"length_max": 20.0, "ratio_max": 1.5, "grad_norm": 0.8},
        ["correctness", "mine"],
        {"lr": 1e-5},
    )
    assert row == {
        "step": 7,
        "loss": 0.25,
        "reward/total": 1.5,
        "reward/correctness": 1.0,
        "reward/mine": 0.25,
        "format/strict_rate": 0.75,
        "accuracy": 0.5,
        "completion_len/mean": 12.0,
        "completion_len/max": 20.0,
        "completions/truncated_rate": 0.25,
        "reasoning/step_accuracy": 0.75,
        "entropy": 0.5,
        "grad_norm": 0.8,
        "clip_ratio": 0.1,
        "is_ratio/mean": 1.0,
        "is_ratio/max": 1.5,
        "is_ratio/capped_frac": 0.0,
        "lr": 1e-5,
    }
    assert "kl" not in row  # only with beta > 0, when the trainer sums it
    assert (
        metrics_row(7, {**sums, "kl_sum": 2.0}, {"length_max": 1, "ratio_max": 1, "grad_norm": 1}, [], {})[
            "kl"
        ]
        == 0.05
    )
