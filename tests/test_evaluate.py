"""Evaluation metrics on hand-made completions, and the real plumbing on the GSM8K test file."""

import json
import subprocess
import sys

import pytest
from conftest import SERVER_TOKEN

from pipeline.data import Example
from pipeline.evaluate import lenient_answer, majority_answer, score_example, summarise

EX = Example(question="q", answer="18", solution="#### 18", source="t:1")
STRICT_OK = "<reasoning>\n9 * 2 = 18\n</reasoning>\n<answer>\n18\n</answer>"


def greedy(text, tokens=10, reason="stop"):
    return {"text": text, "token_ids": list(range(tokens)), "finish_reason": reason}


def test_lenient_answer_and_majority():
    assert lenient_answer(STRICT_OK) == "18"
    assert lenient_answer("so the total is $1,200.") == "$1,200"
    assert lenient_answer("<answer></answer> 7 then 9") == "9"
    assert lenient_answer("no numbers") is None
    assert majority_answer(["<answer>18</answer>", "18.0", "<answer>5</answer>", "x"]) == "18"
    assert majority_answer(["a 5", "b 7", "c 7"]) == "7"
    assert majority_answer(["a 5", "b 7"]) == "5"  # tie: first seen
    assert majority_answer(["none", ""]) is None


def test_score_example_by_hand():
    row = score_example(EX, greedy(STRICT_OK), [STRICT_OK, "18", "17"])
    assert row["strict_format"] and row["soft_format"] and row["strict_correct"] and row["lenient_correct"]
    assert row["majority_correct"] and row["length"] == 10 and not row["truncated"]
    loose = score_example(EX, greedy("I think it is 18", reason="length"), ["17", "17", "18"])
    assert not loose["strict_format"] and not loose["strict_correct"] and loose["lenient_correct"]
    assert loose["truncated"] and not loose["majority_correct"]
    wrong_format = score_example(EX, greedy("<reasoning>x</reasoning><answer>18</answer>"), [])
    assert wrong_format["soft_format"] and not wrong_format["strict_format"] and not wrong_format["strict_correct"]


def test_summarise_arithmetic():
    rows = [score_example(EX, greedy(STRICT_OK, 10), [STRICT_OK]),
            score_example(EX, greedy("it is 18", 20, "length"), ["5"]),
            score_example(EX, greedy("nothing", 30), ["nothing"]),
            score_example(EX, greedy(STRICT_OK.replace("18\n</answer>", "17\n</answer>"), 40), ["17"])]
    s = summarise(rows, maj_k=1)
    assert s["examples"] == 4
    assert s["pass@1/strict_accuracy"] == 0.25
    assert s["pass@1/lenient_accuracy"] == 0.5
    assert s["format/strict_rate"] == 0.5
    assert s["format/soft_rate"] == 0.5
    assert s["completion_len/mean"] == 25
    assert s["completions/truncated_rate"] == 0.25
    assert s["maj@1/accuracy"] == 0.25


def test_eval_cli_on_real_gsm8k(server, gsm8k_dir, tmp_path):
    out = tmp_path / "eval"
    env = {**__import__("os").environ, "GRPO_SERVER_TOKEN": SERVER_TOKEN}
    proc = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--server-url", server.client.base_url,
                           "--data-file", str(gsm8k_dir / "test.jsonl"), "--limit", "12", "--maj-k", "3",
                           "--max-tokens", "16", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "eval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert summary["examples"] == len(rows) == 12
    assert rows[0]["source"].endswith("test.jsonl:1") and rows[0]["reference"] == "18"
    assert all(r["length"] <= 16 for r in rows)
    assert summary["completion_len/mean"] == pytest.approx(sum(r["length"] for r in rows) / 12)
    assert summary["maj@3/accuracy"] == pytest.approx(sum(r["majority_correct"] for r in rows) / 12)
    assert "pass@1/strict_accuracy" in proc.stdout  # the printed table
