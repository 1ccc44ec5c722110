"""Evaluation metrics on hand-made completions, and the real plumbing on the GSM8K test file."""

import json
import subprocess
import sys

import pytest
from support.constants import SERVER_TOKEN

from pipeline.rollout.completion import Completion
from pipeline.rollout.evaluate import lenient_answer, majority_answer, score_example, summarise
from pipeline.task.data import Example

EX = Example(question="q", answer="18", solution="#### 18", source="t:1")
STRICT_OK = "<reasoning>\n9 * 2 = 18\n</reasoning>\n<answer>\n18\n</answer>"


def greedy(text, tokens=10, reason="stop"):
    return Completion([], list(range(tokens)), [], text, reason == "length", EX)


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
    assert (
        wrong_format["soft_format"]
        and not wrong_format["strict_format"]
        and not wrong_format["strict_correct"]
    )


def test_summarise_arithmetic():
    rows = [
        score_example(EX, greedy(STRICT_OK, 10), [STRICT_OK]),
        score_example(EX, greedy("it is 18", 20, "length"), ["5"]),
        score_example(EX, greedy("nothing", 30), ["nothing"]),
        score_example(EX, greedy(STRICT_OK.replace("18\n</answer>", "17\n</answer>"), 40), ["17"]),
    ]
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
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.report.evaluate",
            "--server-url",
            server.client.base_url,
            "--data-file",
            str(gsm8k_dir / "test.jsonl"),
            "--limit",
            "12",
            "--maj-k",
            "3",
            "--max-tokens",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "eval.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert summary["examples"] == len(rows) == 12
    assert rows[0]["source"].endswith("test.jsonl:1") and rows[0]["reference"] == "18"
    assert all(r["length"] <= 16 for r in rows)
    assert summary["completion_len/mean"] == pytest.approx(sum(r["length"] for r in rows) / 12)
    assert summary["maj@3/accuracy"] == pytest.approx(sum(r["majority_correct"] for r in rows) / 12)
    assert "pass@1/strict_accuracy" in proc.stdout  # the printed table


def test_eval_cli_scores_known_completions_exactly(tiny_model_dir, tmp_path):
    """The CLI against a scripted server whose completions are written by hand: every number of the
    summary is known in advance (not derived from the CLI's own rows)."""
    import http.server
    import threading

    data = tmp_path / "test.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"Question {i}?", "answer": f"Work.\n#### {a}"}) + "\n"
            for i, a in enumerate(["18", "1,200", "7", "42"])
        )
    )
    strict = "<reasoning>\nr\n</reasoning>\n<answer>\n{}\n</answer>"
    greedy_texts = [
        strict.format(18),  # strict format, correct
        "the total is $1,200.",  # no format; lenient answer correct
        strict.format(8),  # strict format, wrong
        "<answer>42</answer>",
    ]  # no reasoning block: not strict; lenient correct
    sampled_texts = [
        ["18", "17", strict.format(18)],
        ["5", "5", "1200"],
        ["7", "7", strict.format(8)],
        ["41", strict.format(42), "40"],
    ]

    class Scripted(http.server.BaseHTTPRequestHandler):
        def _reply(self, body):
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self):  # /model
            self._reply({"model": str(tiny_model_dir)})

        def do_POST(self):  # /generate: greedy (n=1) or maj@3 sampling, four prompts in order
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            assert len(req["prompt_token_ids"]) == 4
            texts = [[t] for t in greedy_texts] if req["n"] == 1 else sampled_texts
            self._reply(
                {
                    "version": 0,
                    "results": [
                        {
                            "completions": [
                                {
                                    "text": t,
                                    "token_ids": [1] * (10 + i),
                                    "logprobs": [-1.0] * (10 + i),
                                    "finish_reason": "stop",
                                }
                                for t in group
                            ]
                        }
                        for i, group in enumerate(texts)
                    ],
                }
            )

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "eval"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pipeline.report.evaluate",
                "--server-url",
                f"http://127.0.0.1:{httpd.server_address[1]}",
                "--data-file",
                str(data),
                "--maj-k",
                "3",
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        httpd.shutdown()
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["examples"] == 4
    assert summary["pass@1/strict_accuracy"] == 0.25  # only the first: strict format and right
    assert summary["pass@1/lenient_accuracy"] == 0.75  # 18, 1200 and 42 found anywhere in the text
    assert summary["format/strict_rate"] == 0.5
    assert summary["maj@3/accuracy"] == 0.5  # 18 and 7 win their votes; 5 and a 3-way tie do not
    assert summary["pass@3/strict_accuracy"] == 0.5  # a strict, right sample for 18 and 42 (not for 7: 8)
    assert summary["completion_len/mean"] == 11.5  # 10, 11, 12, 13 tokens
