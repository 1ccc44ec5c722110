"""Multi-turn rollouts with tools against the real server (pipeline/rollout/multi_turn.py): a tiny
model SFT-taught to call the calculator, its calls run, the results joined as tool messages, and the
trainer's view of the whole conversation lines up token by token with what the server generated."""

import json
import textwrap

import psutil
import pytest
import torch
from support.constants import REPO, SERVER_TOKEN
from support.models import tiny_corpus
from support.processes import one_line_error
from support.reference import hf_logprobs
from support.servers import local_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.rollout.multi_turn import generate_with_tools
from pipeline.task.data import prompt_token_ids
from pipeline.task.tools import CALL_CLOSE, ToolTurns, load_toolbox

CALL = '<tool_call>{"name": "calculator", "arguments": {"expression": "2 + 3"}}</tool_call>'


@pytest.fixture(scope="module")
def tool_model_dir(tmp_path_factory):
    """A small model SFT-taught to answer every question with the same calculator call. Its tokenizer
    has the call tags as tokens of their own, as tool-calling tokenizers do (Qwen2.5's); a fixed
    string is what a model this small learns reliably (copying the question's numbers it does not)."""
    from pipeline.embedded.tiny_model import build_tiny_model
    from pipeline.embedded.warmstart import sft_warm_start
    from pipeline.task.synthetic import generate

    base = build_tiny_model(
        tmp_path_factory.mktemp("tool-base"),
        tiny_corpus(),
        hidden_size=128,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    examples = generate(1000, 0)
    return sft_warm_start(
        base,
        examples,
        tmp_path_factory.mktemp("tool-model"),
        max_steps=300,
        completions=[CALL] * len(examples),
    )


@pytest.fixture(scope="module")
def tool_server(tool_model_dir, tmp_path_factory):
    proc = local_server(tool_model_dir, tmp_path_factory.mktemp("tool-server"))
    yield proc
    proc.stop()


def test_the_chat_template_says_how_a_tool_result_is_wrapped(tool_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    turns = ToolTurns.of(tokenizer)
    assert (
        turns.before == "<|im_end|>\n<|im_start|>tool\n"
        and turns.after == "<|im_end|>\n<|im_start|>assistant\n"
    )


COUNTING_ENV = '''
class CountingCalculator:
    """A scripted environment: its calculator answers how many calls this rollout has made."""

    def __init__(self):
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0

    def calculator(self, expression: str) -> str:
        """Count the calls.

        Args:
            expression: ignored
        """
        self.calls += 1
        return f"call {self.calls}"
'''


def test_turns_run_the_calls_and_line_up_with_the_servers_tokens(
    tool_server, tool_model_dir, tmp_path, monkeypatch
):
    """Two rollouts of up to two tool calls each: every call runs in the rollout's own environment
    (state across its turns), its result sits between the model's turns exactly as the template wraps
    it, masked out; and on the model's tokens the server's logprobs are the trainer's (HF's) over the
    whole multi-turn sequence, so the loss sees what the behaviour policy saw."""
    from pipeline.task.synthetic import generate

    (tmp_path / "counting_env.py").write_text(textwrap.dedent(COUNTING_ENV))
    monkeypatch.syspath_prepend(str(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(tool_model_dir)
    toolbox = load_toolbox([], "counting_env:CountingCalculator")
    turns = ToolTurns.of(tokenizer, toolbox.schemas)
    prompt = prompt_token_ids(tokenizer, generate(3, 5)[0])  # a question like those it was taught on
    groups, info = generate_with_tools(
        tool_server.client,
        [prompt, prompt],
        n=1,
        max_tokens=160,
        seed=3,
        params={"temperature": 0.0},
        toolbox=toolbox,
        tokenizer=tokenizer,
        turns=turns,
        max_iterations=2,
        timeout_s=5,
        max_prompts=1,
    )
    group = [c for g in groups for c in g]  # greedy: the same prompt twice, two rollouts of their own
    # max_prompts=1: each later turn of the two rollouts is a request of its own (as a turn of more
    # rollouts than the server takes in one request is split)
    assert len(group) == 2 and info["requests"] == 1 + sum(len(c.results) for c in group)
    model = AutoModelForCausalLM.from_pretrained(tool_model_dir, dtype=torch.float32)
    for conversation in group:
        assert len(conversation.token_ids) == len(conversation.logprobs) == len(conversation.loss_mask) <= 160
        assert conversation.calls, "the taught model made no tool call"
        # the environment is the rollout's own: its calls are counted from 1 in every rollout
        # each tool turn is the result the loop recorded, wrapped as the template wraps a tool message
        tool_turns = [
            tokenizer.decode(conversation.token_ids[a:b]) for a, b in runs(conversation.loss_mask, 0)
        ]
        assert tool_turns == [f"{turns.before}{r}{turns.after}" for r in conversation.results]
        assert 1 <= len(conversation.results) <= len(conversation.calls) <= 2
        assert conversation.results[0] == "call 1"  # the taught call, in this rollout's own environment
        # later calls are the model's own (a call it garbles is an error result, not a count)
        answered = [r for r in conversation.results if not r.startswith("error: ")]
        assert answered == [f"call {k}" for k in range(1, len(answered) + 1)]
        model_text = tokenizer.decode(
            [t for t, m in zip(conversation.token_ids, conversation.loss_mask, strict=True) if m]
        )
        # each call ended a model turn; at the cap the last call gets no result
        assert model_text.count(CALL_CLOSE) == len(conversation.calls) + (
            conversation.finish_reason == "tool_calls"
        )
        # alignment over turns: HF on the whole sequence, at the model's tokens, is the server's logprob
        mine = hf_logprobs(model, prompt, conversation.token_ids)
        own = torch.tensor(conversation.loss_mask, dtype=torch.bool)
        served = torch.tensor(conversation.logprobs)
        assert (mine[own] - served[own]).abs().max() <= 1e-3
        assert (served[~own] == 0).all()


def runs(mask: list[int], value: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of `value` in `mask`."""
    out, start = [], None
    for i, m in enumerate([*mask, None]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            out.append((start, i))
            start = None
    return out


TOOL_PLUGIN = '''
import os
from pathlib import Path


def calculator(expression: str) -> str:
    """A user's calculator, replacing the built-in one: answers 7 whatever it is asked.

    Args:
        expression: the arithmetic to do
    """
    print(f"calculator asked {expression!r}")  # into the run's tools.log
    with open(Path(__file__).with_name("tool_pids.txt"), "a") as f:  # the worker processes, seen after
        f.write(f"{os.getpid()}\\n")
    return "7"


def read_a_seven(prompts=None, completions=(), **kwargs):
    """1 when a tool message in the conversation says 7 (a reward written for TRL's tool mode)."""
    return [float(any(m["role"] == "tool" and m["content"] == "7" for m in c)) for c in completions]
'''


@pytest.mark.e2e
def test_a_users_tool_plugin_trains_end_to_end(tool_model_dir, tmp_path):
    """`make train` with a user's tool, overlapped, evaluated during training, on two generation
    engines (each turn's rollouts split between them, one push to both): the launcher checks it, the
    rollouts call it, the loss trains only the model's tokens, a user's reward reads TRL's
    message-list completions, and metrics.jsonl shows the calls."""
    import os
    import subprocess
    import sys

    from pipeline.generation.client import free_port

    (tmp_path / "my_tools.py").write_text(textwrap.dedent(TOOL_PLUGIN))
    env = {
        **os.environ,
        "GRPO_SERVER_TOKEN": SERVER_TOKEN,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        "--config",
        str(REPO / "configs" / "tiny-cpu.yaml"),
        "--name",
        "tools",
        "--set",
        f"run.root={tmp_path / 'runs'}",
        "--set",
        f"model.path={tool_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "eval.limit=4",
        "--set",
        "eval.maj_k=2",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.max_completion_tokens=96",
        "--set",
        f"server.port={free_port('127.0.0.1')}",
        "--set",
        "reward_functions.seven=my_tools:read_a_seven",
        "--set",
        "train.overlap=true",
        "--set",
        "eval.every=2",
        "--set",
        "server.data_parallel_size=2",
        "--set",
        "rollout.tools=[my_tools:calculator]",
        "--set",
        "rollout.max_tool_calling_iterations=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [
        json.loads(line) for line in (tmp_path / "runs" / "tools" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["server/engines"] == 2 and r["sync/engines_verified"] == 2 for r in rows), rows
    assert all(r["tools/calls_per_completion"] > 0 and r["tools/calls/calculator"] > 0 for r in rows), rows
    assert all(r["reward/seven"] > 0 for r in rows)  # the user's reward saw the tool messages
    assert 0 <= rows[1]["eval/tools/call_rate"] <= 1  # evaluation during training runs the tool loop too
    assert all(r["tools/failure_rate"] <= 1 and r["sync/logprob_max_abs_diff"] <= 1e-3 for r in rows)
    # the launcher's evaluation goes through the same multi-turn loop: the user's tool answered there too
    evaluated = [
        json.loads(line)
        for line in (tmp_path / "runs" / "tools" / "eval_after.jsonl").read_text().splitlines()
    ]
    assert len(evaluated) == 4 and any(
        "<|im_start|>tool\n7<|im_end|>" in row["completion"] for row in evaluated
    )
    summary = json.loads((tmp_path / "runs" / "tools" / "eval_after.json").read_text())
    assert summary["tools/call_rate"] == sum(row["tool_calls"] > 0 for row in evaluated) / 4
    # the tool ran in worker processes (the rank's, the launcher's evaluations'), its output in the run's
    # tools.log and not the trainer's; no worker outlived the run
    assert "calculator asked" in (tmp_path / "runs" / "tools" / "tools.log").read_text()
    assert "calculator asked" not in proc.stdout + proc.stderr
    workers = {int(pid) for pid in (tmp_path / "tool_pids.txt").read_text().split()}
    assert workers and not [pid for pid in workers if alive(pid)], workers

    bad_cmd = [*cmd[:-4], "--set", "rollout.tools=[my_tools:nothing_here]"]
    bad_cmd[bad_cmd.index("--name") + 1] = "tools-bad"
    bad = subprocess.run(bad_cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert "rollout.tools[0]: module 'my_tools' has no 'nothing_here'" in one_line_error(bad)
    assert not (tmp_path / "runs" / "tools-bad").exists()  # refused before anything was written


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
