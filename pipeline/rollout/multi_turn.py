"""Multi-turn generation, where the model calls tools while it reasons (training and evaluation alike).

Each turn is a generate request that stops at the end of a tool call (`</tool_call>`, kept in the
output). The call is parsed and run (pipeline/task/tools.py: every failure is an error result), its
result is wrapped the way the tokenizer's chat template wraps a tool message (`ToolTurns`), and
generation goes on from the whole conversation's token ids, which the engine's prefix cache mostly
holds already. A rollout ends when the model stops without a call, at `max_iterations` calls, or
when its tokens (the model's and the tools') reach `max_tokens` in total.

A `Conversation` is how one such rollout is built, turn by turn; finished, it becomes a `Completion`
(pipeline/rollout/completion.py) like any other. The trainer scores exactly its token ids: the model's
tokens carry the server's logprobs and a loss mask of 1; a tool's result and the template tokens around
it carry 0 (in the sequence the model reads, out of the loss, the KL and the length normalisers:
pipeline/trainer/grpo.py `make_batch`). A rollout's turns are one call of `generate_with_tools`, which
the weight push waits for with train.max_staleness <= 1, so all of a rollout's turns come from one
weights version; with k >= 2 a push can land between or within turns, and `versions` keeps, token by
token, the version that sampled each.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.task.tools import (
    CALL_CLOSE,
    Toolbox,
    ToolResult,
    ToolTurns,
    WorkerSettings,
    load_toolbox,
    parse_tool_calls,
    strip_tool_calls,
)

MAX_PARALLEL_CALLS = 32
TURN_SEED_STRIDE = (
    2**40
)  # turn k's seeds: the step's + k * stride (the server samples prompt i with seed + i)


@dataclass
class Conversation:
    """One rollout: the prompt, then the model's and the tools' tokens as the model reads them."""

    prompt_ids: list[int]
    tools: Toolbox
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    finish_reason: str = ""
    engine: int = 0
    version: int | None = None  # the oldest weights version of its turns
    versions: list[tuple[int, int, int]] = field(default_factory=list)  # as Completion.versions
    calls: list[tuple[str, bool]] = field(default_factory=list)  # (tool name, succeeded), in order
    turn_texts: list[str] = field(default_factory=list)  # the model's turns as text
    tool_messages: list[list[dict]] = field(default_factory=list)  # each tool turn: a tool message per call
    last_text: str = ""
    wants_tool: bool = False

    def add_model_turn(self, completion: dict, tokenizer) -> None:
        ids = completion["token_ids"]
        offset = len(self.token_ids)
        for v, start, end in completion.get("versions", ()):
            self.versions.append((v, offset + start, offset + end))
        self.token_ids += ids
        self.logprobs += completion["logprobs"]
        self.loss_mask += [1] * len(ids)
        self.finish_reason = completion["finish_reason"]
        self.engine = completion.get("engine", self.engine)
        version = completion.get("version")
        if version is not None:
            self.version = version if self.version is None else min(self.version, version)
        # decoded here, not the server's text: the tokens are what the model wrote, whatever the
        # detokenizer does with the stop string or special tokens
        self.last_text = tokenizer.decode(ids, skip_special_tokens=False)
        self.turn_texts.append(tokenizer.decode(ids, skip_special_tokens=True))
        self.wants_tool = self.finish_reason == "stop" and self.last_text.rstrip().endswith(CALL_CLOSE)

    def add_tool_turn(self, ids: list[int], results: list[ToolResult]) -> None:
        self.token_ids += ids
        self.logprobs += [0.0] * len(ids)
        self.loss_mask += [0] * len(ids)
        self.tool_messages.append([{"role": "tool", "name": r.name, "content": r.text} for r in results])

    @property
    def results(self) -> list[str]:
        """What the model read back, turn by turn (a turn's results joined as its tool turn holds them)."""
        return ["\n".join(m["content"] for m in turn) for turn in self.tool_messages]

    def messages(self) -> list[dict]:
        """The rollout as TRL's message-list completion: each model turn an assistant message whose call
        text is parsed out into `tool_calls` (as transformers' `parse_response` does), each tool turn a
        tool message per call. Rewards read it; the built-in ones score the last assistant message."""
        out = []
        for turn, text in enumerate(self.turn_texts):
            calls = [c for c in parse_tool_calls(text) if not c.error]
            message = {"role": "assistant", "content": strip_tool_calls(text).strip()}
            if calls:
                message["tool_calls"] = [
                    {"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls
                ]
            out.append(message)
            out += self.tool_messages[turn] if turn < len(self.tool_messages) else []
        return out


def run_calls(
    conversation: Conversation, timeout_s: float, start_by: float | None = None
) -> list[ToolResult]:
    """The calls in the model's last turn, run in order (an error result for text that holds none);
    a call not started by `start_by` (time.monotonic(): its turn's start + timeout_s) is not run."""
    calls = parse_tool_calls(conversation.last_text)
    if not calls:
        return [ToolResult("?", "error: no tool call found", ok=False)]
    return [conversation.tools.call(call, timeout_s, start_by) for call in calls]


def generate_with_tools(
    engines,
    prompt_ids: list[list[int]],
    *,
    n: int,
    max_tokens: int,
    seed: int | None,
    params: dict,
    toolbox: Toolbox,
    tokenizer,
    turns: ToolTurns,
    max_iterations: int,
    timeout_s: float,
    max_prompts: int,
) -> tuple[list[list[Conversation]], dict]:
    """`n` multi-turn rollouts per prompt through `engines` (an `Engines`, or one server client).
    Returns the conversations per prompt and the generate answers' bookkeeping: "version" (the
    oldest), "split" (the first turn's), "timing" (engine seconds summed over turns), "requests"
    (generate requests made: one per turn, more where a turn had over `max_prompts` rollouts waiting)."""
    first = engines.generate(prompt_ids, n=n, max_tokens=max_tokens, seed=seed, stop=[CALL_CLOSE], **params)
    answers = [first]
    groups = []
    for ids, result in zip(prompt_ids, first["results"], strict=True):
        group = []
        for completion in result["completions"]:
            conversation = Conversation(list(ids), toolbox.for_rollout(), engine=first.get("engine", 0))
            conversation.add_model_turn(
                {**completion, "version": completion.get("version", first["version"])}, tokenizer
            )
            group.append(conversation)
        groups.append(group)
    everyone = [c for group in groups for c in group]
    try:
        for turn in range(1, max_iterations + 1):
            waiting = [c for c in everyone if c.wants_tool]
            if not waiting:
                break
            by_budget: dict[int, list[Conversation]] = {}
            # every waiting rollout's calls at once, each started within timeout_s of the turn or not run,
            # and killed past timeout_s (pipeline/task/tools.py `tool_turn_s`): a slow tool costs a turn
            # about twice its timeout, not its timeout per rollout. A worker runs one call at a time.
            start_by = time.monotonic() + timeout_s
            with ThreadPoolExecutor(
                max_workers=min(MAX_PARALLEL_CALLS, len(waiting)), thread_name_prefix="tools"
            ) as pool:
                all_results = list(pool.map(lambda c, by=start_by: run_calls(c, timeout_s, by), waiting))
            for conversation, results in zip(waiting, all_results, strict=True):
                conversation.calls += [(r.name, r.ok) for r in results]
                conversation.wants_tool = False
                text = "\n".join(r.text for r in results)
                tool_ids = turns.token_ids(tokenizer, text)
                left = max_tokens - len(conversation.token_ids) - len(tool_ids)
                if left < 1:  # no room for the result and a word after it: the call ran, its result is cut
                    conversation.finish_reason = "length"
                    continue
                conversation.add_tool_turn(tool_ids, results)
                by_budget.setdefault(left, []).append(conversation)
            for left, conversations in sorted(by_budget.items()):
                # at most max_prompts a request (the server's limit): after the first turn each rollout is a
                # prompt of its own, n times as many as the first request had
                for start in range(0, len(conversations), max_prompts):
                    chunk = conversations[start : start + max_prompts]
                    turn_seed = None if seed is None else (seed + turn * TURN_SEED_STRIDE + start) % 2**62
                    answer = engines.generate(
                        [c.prompt_ids + c.token_ids for c in chunk],
                        n=1,
                        max_tokens=left,
                        seed=turn_seed,
                        stop=[CALL_CLOSE],
                        **params,
                    )
                    answers.append(answer)
                    for conversation, result in zip(chunk, answer["results"], strict=True):
                        completion = result["completions"][0]
                        conversation.add_model_turn(
                            {**completion, "version": completion.get("version", answer["version"])}, tokenizer
                        )
    finally:  # the rollouts' environment workers end with them (the function workers stay)
        for conversation in everyone:
            conversation.tools.close()
    for conversation in everyone:
        if conversation.wants_tool:  # still calling at the cap: its last call gets no result
            conversation.finish_reason = "tool_calls"
    timing: dict[str, float] = {}
    for answer in answers:
        for key, value in answer.get("timing", {}).items():
            timing[key] = timing.get(key, 0.0) + value
    return groups, {
        "version": min(a["version"] for a in answers),
        "split": first.get("split", {}),
        "timing": timing,
        "requests": len(answers),
    }


@dataclass
class ToolRollouts:
    """rollout.tools / rollout.environment: what multi-turn generation needs (pipeline/rollout/generate.py
    `generate(..., tools=...)` runs `generate_with_tools` with it)."""

    toolbox: Toolbox
    tokenizer: object
    max_iterations: int
    timeout_s: float
    max_prompts: int  # server.max_prompts: prompts per generate request

    def __post_init__(self):
        self.turns = ToolTurns.of(self.tokenizer, self.toolbox.schemas)

    @classmethod
    def from_config(cls, config, tokenizer) -> ToolRollouts | None:
        """rollout.tools / rollout.environment of a `Config`, loaded and checked; None without tools.
        The user's tools print into the run directory's tools.log (run.root / run.name, as the launcher
        resolves them; without a run name, into this process's stderr)."""
        r, run = config.rollout, config.run
        if not (r.tools or r.environment):
            return None
        settings = WorkerSettings(
            workers=r.tool_workers,
            memory_mb=r.tool_memory_mb,
            log_path=str(Path(run.root) / run.name / "tools.log") if run.name else "",
            log_mb=r.tool_log_mb,
        )
        return cls(
            load_toolbox(r.tools, r.environment or None, settings),
            tokenizer,
            r.max_tool_calling_iterations,
            r.tool_timeout_s,
            config.server.max_prompts,
        )

    def close(self) -> None:
        """End the user's tool workers (rank 0's, or the evaluating process's): the owner calls it on
        every way out, so that no worker outlives the run."""
        if self.toolbox.workers is not None:
            self.toolbox.workers.close()

    def prompt_style(self, style):
        """`style` (a PromptStyle) with the tools' schemas, for templates that show them to the model."""
        return dataclasses.replace(style, tools=tuple(self.toolbox.schemas))
