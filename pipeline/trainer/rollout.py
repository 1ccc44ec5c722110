"""Stage 1-2 of a step: generate the step's completions and score this rank's share of them.

Rank 0 makes one generate request for all of a step's prompts (spread over the generation engines
by pipeline/generation/engines.py; one weight version to check) and broadcasts the result; every rank then owns a contiguous slice of the
step's `prompts x G` completions (its micro-batches) and scores only that slice.

Synchronous mode requests step k's rollouts when step k starts, from the weights of step k.
Overlapped mode requests step k+1's rollouts as soon as step k's are in hand, so the server
generates them (with the weights from before step k's update) while the trainer computes step k;
rollouts more than `max_staleness` versions old are discarded and regenerated.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.task.answers import completion_text
from pipeline.task.example import Example
from pipeline.task.rewards import Reward, score_completions
from pipeline.task.xml_format import SYSTEM_PROMPT
from pipeline.trainer.grpo import group_advantages


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # the server's (behaviour policy), per token
    text: str
    truncated: bool  # cut at max_completion_tokens rather than ended by EOS/stop
    example: Example  # its prompt's example: question, reference answer, the row's other columns
    engine: int = 0  # the generation engine that made it
    version: int = 0  # the weights version that made it
    loss_mask: list[int] | None = None  # per token: 1 the model wrote it, 0 a tool's result (None: all 1)
    tool_calls: tuple[tuple[str, bool], ...] = ()  # (tool name, succeeded) of each call it made
    messages: list[dict] | None = None  # a multi-turn rollout as TRL's message list (None: one turn)

    @property
    def answer(self) -> str:
        return self.example.answer

    @property
    def scored(self) -> str | list[dict]:
        """What the rewards read: TRL's message-list completion for a rollout with tools, else the text."""
        return self.text if self.messages is None else self.messages

    @property
    def final_text(self) -> str:
        """The model's final answer turn (the whole text without tools)."""
        return completion_text(self.scored)

    @property
    def model_tokens(self) -> int:
        """The tokens the model wrote (what the loss trains and the length normalisers count)."""
        return len(self.token_ids) if self.loss_mask is None else sum(self.loss_mask)


class Rollouts:
    """Rank 0 talks to the server (in a helper thread, so a request can run ahead); all ranks
    receive each step's completions by broadcast."""

    def __init__(self, client, *, n: int, max_tokens: int, temperature: float, top_p: float, seed: int,
                 max_staleness: int, tools=None):
        # tools: a pipeline.task.tool_rollout.ToolRollouts (rank 0, rollout.tools): multi-turn generation
        self.client, self.max_staleness, self.tools = client, max_staleness, tools
        self.params = {"n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        self.seed = seed
        self.is_sender = dist.get_rank() == 0
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") if self.is_sender else None
        self.pending: dict[int, tuple[Future, list[list[int]], list[str]]] = {}
        self.discarded = 0
        self.timing: dict[str, float] = {}  # the last collected step's: time/<phase> seconds (rank 0's)
        self.split: dict[str, float] = {}  # the last collected step's engines and their imbalance (rank 0's)

    def step_seed(self, step: int) -> int:
        """The sampling seed of step `step`: distinct per run seed and step, and (mod 2**62) always
        within the server's seed range, however large the run seed or the step."""
        return (self.seed * 1_000_003 + step) % 2**62

    def request(self, step: int, prompt_ids: list[list[int]], examples: list[Example]) -> None:
        """Start generating step `step`'s rollouts (returns at once)."""
        if self.is_sender:
            future = self.pool.submit(self._generate, prompt_ids, step)
            self.pending[step] = (future, prompt_ids, examples)

    def _generate(self, prompt_ids: list[list[int]], step: int) -> dict:
        """One generate call; its round trip next to the engine time the server reports, so a step's
        metrics separate the engine (prefill, decode) from HTTP and (de)serialisation."""
        start = time.perf_counter()
        if self.tools is not None:
            out = self.tools.generate(self.client, prompt_ids, seed=self.step_seed(step), **self.params)
        else:
            out = self.client.generate(prompt_ids, seed=self.step_seed(step), **self.params)
        server = out.get("timing", {})
        out["timing"] = {"time/engine": server.get("engine_s", 0.0),
                         "time/http": time.perf_counter() - start - server.get("engine_s", 0.0),
                         **{f"time/engine_{k.removesuffix('_s')}": v for k, v in server.items() if k != "engine_s"}}
        out.setdefault("split", {})
        return out

    def collect(self, step: int, version: int) -> tuple[list[Completion], int]:
        """Step `step`'s completions on every rank, generated by weights at most `max_staleness`
        versions older than `version`; returns them with the version that generated them."""
        payload = [None]
        if self.is_sender:
            try:
                future, prompt_ids, examples = self.pending.pop(step)
                out = future.result()
                if not version - self.max_staleness <= out["version"] <= version:
                    self.discarded += 1  # too stale: generate again from the current weights
                    out = self._generate(prompt_ids, step)
                    if out["version"] != version:
                        raise StaleRolloutError(f"server generated with weights version {out['version']}, "
                                                f"the trainer is at version {version}")
                self.timing, self.split = out["timing"], out["split"]
                payload = [(out["version"], [
                    Completion(ids, c["token_ids"], c["logprobs"], c["text"], c["finish_reason"] == "length", example,
                               c.get("engine", 0), c.get("version", out["version"]), c.get("loss_mask"),
                               tuple(map(tuple, c.get("tool_calls", ()))), c.get("messages"))
                    for ids, example, result in zip(prompt_ids, examples, out["results"], strict=True)
                    for c in result["completions"]
                ])]
            except Exception as e:  # let every rank fail with the same message instead of hanging
                payload = [e]
        start = time.perf_counter()
        dist.broadcast_object_list(payload, src=0)
        self.timing["time/broadcast_rollouts"] = time.perf_counter() - start
        if isinstance(payload[0], Exception):
            raise payload[0]
        generated_by, completions = payload[0]
        return completions, generated_by

    def wait(self) -> None:
        """Block until requests under way are done (before a weight push, which would wait for them
        inside the server, where only the push's own deadline applies)."""
        for future, _, _ in self.pending.values():
            future.exception()  # waits; an error is raised later, by collect()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def tool_metrics(completions: list[Completion], tool_names: list[str]) -> dict[str, float]:
    """tools/*: calls per completion, the share that failed, completions with at least one call, and
    calls per tool (every configured tool, so the columns are the same every step)."""
    calls = [call for c in completions for call in c.tool_calls]
    return {"tools/calls_per_completion": len(calls) / max(len(completions), 1),
            "tools/failure_rate": sum(not ok for _, ok in calls) / max(len(calls), 1),
            "tools/completions_with_call": sum(bool(c.tool_calls) for c in completions) / max(len(completions), 1),
            **{f"tools/calls/{name}": float(sum(n == name for n, _ in calls)) for name in tool_names}}


class StaleRolloutError(RuntimeError):
    """The server generated with weights other than the trainer's current ones."""


def score_slice(completions: list[Completion], weights: dict[str, float], rewards: dict[str, Reward] | None = None,
                system_prompt: str | None = None):
    """Weighted total reward and each reward's values for this rank's completions. Reward functions
    get TRL's arguments: the prompts (chat messages), the completions, `answer`, and each other column
    of the dataset rows as a list (None where a row lacks it)."""
    names = {key for c in completions for key in c.example.columns}
    columns = {key: [c.example.columns.get(key) for c in completions] for key in sorted(names)}
    prompts = [c.example.prompt(system_prompt or SYSTEM_PROMPT) for c in completions]
    return score_completions([c.scored for c in completions], [c.answer for c in completions], weights, rewards,
                             prompts, columns)


@dataclass
class StepBatch:
    """One optimizer step as this rank sees it: its slice of the step's completions (its micro-batches,
    in order), their rewards, and advantages normalised over each prompt's whole group."""
    completions: list[Completion]  # (per_rank,) = micro_batch_size x gradient_accumulation_steps
    totals: list[float]  # (per_rank,) weighted reward of each
    per_reward: dict[str, list[float]]  # name -> (per_rank,) each reward's own values
    advantages: torch.Tensor  # (per_rank,) float32
    group_totals: torch.Tensor  # (prompts, G) float64: every rank's totals, for group diagnostics
    generated_by: int  # the weights version that generated them


def score_step(completions: list[Completion], generated_by: int, *, rank: int, world: int, group_size: int,
               scaling: str, weights: dict[str, float], rewards: dict[str, Reward], system_prompt: str,
               device) -> StepBatch:
    """Score this rank's slice, gather every rank's totals (collectives need tensors on the rank's
    device: NCCL CUDA ones, gloo CPU ones) and compute group-normalised advantages."""
    per_rank = len(completions) // world
    mine = completions[rank * per_rank: (rank + 1) * per_rank]
    totals, per_reward = score_slice(mine, weights, rewards, system_prompt)
    gathered = [torch.zeros(per_rank, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(totals, dtype=torch.float64, device=device))
    everyone = torch.cat(gathered).cpu()
    advantages = group_advantages(everyone, group_size, scaling)[rank * per_rank: (rank + 1) * per_rank].float()
    return StepBatch(mine, totals, per_reward, advantages, everyone.view(-1, group_size), generated_by)
