"""Report writing: curves as PNG and a model card whose numbers are the run's."""

import json
import subprocess
import sys

import yaml
from support.processes import one_line_error
from support.runs import fake_run

from pipeline.report.card import window_means, write_report


def test_report_card_and_curves(tmp_path):
    run, rows = fake_run(tmp_path)
    card = write_report(run).read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "premai-io/prem-1B-chat"
    assert "datasets" not in meta  # generated data has no Hub id
    assert meta["pipeline_tag"] == "text-generation" and meta["license"] == "apache-2.0"
    first, last = window_means(rows, "reward/total")
    assert (first, last) == (sum(0.1 * s for s in range(1, 5)) / 4, sum(0.1 * s for s in range(17, 21)) / 4)
    assert f"| reward/total | {first:.3f} | {last:.3f} |" in card
    assert "| format/strict_rate | 0.300 | 0.900 |" in card
    assert "| maj@8/accuracy | 0.250 | 0.250 |" in card
    assert "Wall time: 10.0 min" in card
    assert "Learning rate: 0.0002 (cosine schedule down to 0.1 x the peak, warmup ratio 0.1)" in card
    for png in ("reward_curves.png", "format_curves.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in card


def test_report_cli(tmp_path):
    run, _ = fake_run(tmp_path)
    ok = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(run)], capture_output=True, text=True, timeout=120
    )
    assert ok.returncode == 0 and (run / "README.md").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "pipeline.report", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1 and "no metrics.jsonl" in one_line_error(bad)


def test_the_same_problems_before_and_after_side_by_side(tmp_path):
    from pipeline.report.card import before_after_samples

    assert before_after_samples(tmp_path) is None  # no evaluation: nothing to write, no error
    rows = [
        {
            "source": f"synthetic[test]:{i}",
            "question": f"Q{i}?",
            "reference": str(i),
            "completion": f"<answer>{i + 1}</answer>",
            "strict_correct": False,
        }
        for i in range(20)
    ]
    after = [dict(r, completion=f"<answer>{i}</answer>", strict_correct=True) for i, r in enumerate(rows)]
    (tmp_path / "eval_before.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval_after.jsonl").write_text("".join(json.dumps(r) + "\n" for r in after))
    text = before_after_samples(tmp_path, count=3).read_text()
    assert text.count("## synthetic[test]:") == 3 and "Q2?" in text and "Q3?" not in text
    assert "before (wrong):\n```\n<answer>3</answer>\n```\nafter (correct):\n```\n<answer>2</answer>" in text
