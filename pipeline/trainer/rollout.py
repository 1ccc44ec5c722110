"""Stage 1-2 of a step: generate the step's completions and score this rank's share of them.

Rank 0 makes one generate call for all of a step's prompts (pipeline/rollout/generate.py: spread over
the generation engines by pipeline/generation/engines.py, one weight version to check; multi-turn with
rollout.tools) and broadcasts the completions; every rank then owns a contiguous slice of the step's
`prompts x G` completions (its micro-batches) and scores only that slice: the task's rewards
(pipeline/task/reward_functions.py), gathered over ranks into group-normalised advantages (pipeline/trainer/grpo.py).

train.max_staleness k: with k = 0 (synchronous) step s's rollouts are requested when step s starts,
from the weights of step s. With k >= 1 step s+k's are requested as soon as step s's are in hand, so
the engines generate up to k steps ahead, one request after the other, while the trainer computes;
k = 1 pushes only once the request under way has ended (overlapped), k >= 2 pushes into it (the
engines pause between decode steps, so a completion can span versions). A group whose oldest token is
more than k versions older than the weights it trains is dropped and generated again.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline.rollout.completion import Completion, Generation
from pipeline.rollout.generate import generate
from pipeline.rollout.multi_turn import ToolRollouts
from pipeline.task.example import Example
from pipeline.task.reward_functions import Reward, score_completions
from pipeline.task.xml_format import SYSTEM_PROMPT
from pipeline.trainer.grpo import group_advantages


class Rollouts:
    """Rank 0 talks to the server (in a helper thread, so a request can run ahead); all ranks
    receive each step's completions by broadcast."""

    def __init__(
        self,
        client,
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        max_staleness: int,
        tools: ToolRollouts | None = None,
    ):
        # tools: rank 0's, with rollout.tools or rollout.environment: multi-turn generation
        self.client, self.max_staleness, self.tools = client, max_staleness, tools
        self.params = {"n": n, "max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        self.seed = seed
        self.is_sender = dist.get_rank() == 0
        self.pool = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollouts") if self.is_sender else None
        )
        self.pending: dict[int, tuple[Future, list[list[int]], list[Example]]] = {}
        self.discarded = 0
        self.dropped_stale = 0  # the last collected step's groups dropped as too stale (rank 0's)
        self.buffered = 0  # requested steps whose rollouts were ready when the last step collected its own
        self.busy = Busy()  # rank 0's time with a generate request under way
        self.timing: dict[str, float] = {}  # the last collected step's: time/<phase> seconds (rank 0's)
        self.split: dict[str, float] = {}  # the last collected step's engines and their imbalance (rank 0's)

    def step_seed(self, step: int) -> int:
        """The sampling seed of step `step`: distinct per run seed and step, and (mod 2**62) always
        within the server's seed range, however large the run seed or the step."""
        return (self.seed * 1_000_003 + step) % 2**62

    def request(self, step: int, prompt_ids: list[list[int]], examples: list[Example], done=None) -> None:
        """Start generating step `step`'s rollouts (returns at once). `done`: what `ahead` returned for
        this step before a checkpoint, used as they were instead of generating them again."""
        if self.is_sender:
            if done is None:
                future = self.pool.submit(self._generate, prompt_ids, examples, step)
            else:
                future = Future()
                future.set_result(done)
            self.pending[step] = (future, prompt_ids, examples)

    def ahead(self, step: int):
        """Rank 0: step `step`'s rollouts if they were requested and came back (overlapped mode, after
        `wait`), as `request(done=...)` takes them; else None."""
        future = self.pending.get(step, (None,))[0]
        if future is None or not future.done() or future.exception() is not None:
            return None
        return future.result()

    def _generate(
        self, prompt_ids: list[list[int]], examples: list[Example], step: int
    ) -> tuple[Generation, dict[str, float]]:
        """One generate call, and its round trip next to the engine time the server reports (`time/*`
        columns), so a step's metrics separate the engine (prefill, decode) from HTTP and (de)serialisation."""
        start = time.perf_counter()
        with self.busy:
            out = generate(
                self.client, prompt_ids, examples, seed=self.step_seed(step), tools=self.tools, **self.params
            )
        server = out.timing
        timing = {
            "time/engine": server.get("engine_s", 0.0),
            "time/http": time.perf_counter() - start - server.get("engine_s", 0.0),
            **{f"time/engine_{k.removesuffix('_s')}": v for k, v in server.items() if k != "engine_s"},
        }
        return out, timing

    def collect(self, step: int, version: int) -> tuple[list[Completion], int]:
        """Step `step`'s completions on every rank, generated by weights at most `max_staleness`
        versions older than `version`; returns them with the version that generated them."""
        (generated_by, completions), seconds = self._on_every_rank(lambda: self._take(step, version))
        self.timing["time/broadcast_rollouts"] = seconds
        return completions, generated_by

    def _take(self, step: int, version: int) -> tuple[int, list[Completion]]:
        """Rank 0: step `step`'s requested rollouts; with k >= 1 the groups more than k versions stale
        generated again, with k = 0 all of them unless they came from exactly `version`."""
        future, prompt_ids, examples = self.pending.pop(step)
        self.buffered = sum(f.done() for f, _, _ in self.pending.values())
        out, timing = future.result()
        self.dropped_stale = 0
        if self.max_staleness == 0 and out.version != version:
            self.discarded += 1  # not the current weights: generate again from them
            out, timing = self._generate(prompt_ids, examples, step)
            if out.version != version:
                raise StaleRolloutError(
                    f"server generated with weights version {out.version}, the trainer is at version {version}"
                )
        stale = [
            g
            for g, group in enumerate(out.groups)
            if not version - self.max_staleness <= min(c.version for c in group) <= version
        ]
        if stale:  # too old (a restart, a slow engine): the same prompts again, from the current weights
            self.discarded += 1
            self.dropped_stale = len(stale)
            again, _ = self._generate([prompt_ids[g] for g in stale], [examples[g] for g in stale], step)
            for g, group in zip(stale, again.groups, strict=True):
                out.groups[g] = group
            out.version = min(c.version for group in out.groups for c in group)
        self.timing, self.split = timing, out.split
        return out.version, out.completions

    def draw(
        self, step: int, draw: int, prompt_ids: list[list[int]], examples: list[Example]
    ) -> list[Completion]:
        """Dynamic sampling's extra prompts for step `step` (its draw-th), generated now from the weights
        being served, on every rank; a seed of their own (draws never reach the next step's seeds)."""
        seed = (self.step_seed(step) + draw * 2**40) % 2**62
        params = {"seed": seed, "tools": self.tools, **self.params}
        return self._on_every_rank(lambda: generate(self.client, prompt_ids, examples, **params).completions)[
            0
        ]

    def _on_every_rank(self, make):
        """`make()` on rank 0, broadcast: (its result on every rank, the broadcast's seconds). Its error
        is raised on every rank, so all fail with the same message instead of hanging."""
        payload = [None]
        if self.is_sender:
            try:
                payload = [make()]
            except Exception as e:
                payload = [e]
        start = time.perf_counter()
        dist.broadcast_object_list(payload, src=0)
        seconds = time.perf_counter() - start
        if isinstance(payload[0], Exception):
            raise payload[0]
        return payload[0], seconds

    def wait(self) -> None:
        """Block until requests under way are done (before a weight push, which would wait for them
        inside the server, where only the push's own deadline applies)."""
        for future, _, _ in self.pending.values():
            future.exception()  # waits; an error is raised later, by collect()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


class Busy:
    """Seconds spent inside `with busy:` (a generate request under way), the one under way included."""

    def __init__(self):
        self.total, self.since = 0.0, None

    def __enter__(self):
        self.since = time.perf_counter()

    def __exit__(self, *exc):
        self.total += time.perf_counter() - self.since
        self.since = None

    def seconds(self) -> float:
        since = self.since
        return self.total + (time.perf_counter() - since if since is not None else 0.0)


def staleness_metrics(completions: list[Completion], group_size: int, version: int) -> dict[str, float]:
    """rollout/staleness_mean|max: versions between each group's oldest token and the weights it
    trains (`version`); rollout/version_span_max: the most versions one completion's tokens span, - 1."""
    groups = [completions[i : i + group_size] for i in range(0, len(completions), group_size)]
    lags = [version - min(c.version for c in group) for group in groups]
    return {
        "rollout/staleness_mean": sum(lags) / max(len(lags), 1),
        "rollout/staleness_max": float(max(lags, default=0)),
        "rollout/version_span_max": float(
            max((c.newest_version - c.version for c in completions), default=0)
        ),
    }


def tool_metrics(completions: list[Completion], tool_names: list[str]) -> dict[str, float]:
    """tools/*: calls per completion, the share that failed, completions with at least one call, and
    calls per tool (every configured tool, so the columns are the same every step)."""
    calls = [call for c in completions for call in c.tool_calls]
    return {
        "tools/calls_per_completion": len(calls) / max(len(completions), 1),
        "tools/failure_rate": sum(not ok for _, ok in calls) / max(len(calls), 1),
        "tools/completions_with_call": sum(bool(c.tool_calls) for c in completions)
        / max(len(completions), 1),
        **{f"tools/calls/{name}": float(sum(n == name for n, _ in calls)) for name in tool_names},
    }


class StaleRolloutError(RuntimeError):
    """The server generated with weights other than the trainer's current ones."""


def score_slice(
    completions: list[Completion],
    weights: dict[str, float],
    rewards: dict[str, Reward] | None = None,
    system_prompt: str | None = None,
):
    """Weighted total reward and each reward's values for this rank's completions. Reward functions
    get TRL's arguments: the prompts (chat messages), the completions, `answer`, and each other column
    of the dataset rows as a list (None where a row lacks it)."""
    names = {key for c in completions for key in c.example.columns}
    columns = {key: [c.example.columns.get(key) for c in completions] for key in sorted(names)}
    prompts = [c.example.prompt(system_prompt or SYSTEM_PROMPT) for c in completions]
    return score_completions(
        [c.scored for c in completions], [c.answer for c in completions], weights, rewards, prompts, columns
    )


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


def score_step(
    completions: list[Completion],
    generated_by: int,
    *,
    rank: int,
    world: int,
    group_size: int,
    scaling: str,
    weights: dict[str, float],
    rewards: dict[str, Reward],
    system_prompt: str,
    device,
) -> StepBatch:
    """Score this rank's slice, gather every rank's totals (collectives need tensors on the rank's
    device: NCCL CUDA ones, gloo CPU ones) and compute group-normalised advantages."""
    per_rank = len(completions) // world
    mine = completions[rank * per_rank : (rank + 1) * per_rank]
    totals, per_reward = score_slice(mine, weights, rewards, system_prompt)
    gathered = [torch.zeros(per_rank, dtype=torch.float64, device=device) for _ in range(world)]
    dist.all_gather(gathered, torch.tensor(totals, dtype=torch.float64, device=device))
    everyone = torch.cat(gathered).cpu()
    advantages = group_advantages(everyone, group_size, scaling)[
        rank * per_rank : (rank + 1) * per_rank
    ].float()
    return StepBatch(mine, totals, per_reward, advantages, everyone.view(-1, group_size), generated_by)


@dataclass
class GroupFilter:
    """train.dynamic_sampling (DAPO): what one step's filling took."""

    filtered: int = 0  # groups seen whose completions all scored the same (no signal)
    draws: int = 0  # extra rounds of prompts generated
    short: int = 0  # groups without signal still in the step: the draws ran out


def keep_informative_groups(
    completions: list[Completion], group_size: int, group_totals, draw_more, max_draws: int
) -> tuple[list[Completion], GroupFilter]:
    """DAPO's dynamic sampling: drop the groups whose rewards are all equal (zero advantage everywhere,
    so no gradient) and draw more prompts until the step has its number of groups with signal, or
    `max_draws` extra rounds ran. `group_totals(completions)` gives every group's rewards (prompts, G)
    on every rank; `draw_more(k)` the k-th round's completions. Groups beyond the step's are dropped;
    a step still short is filled with groups without signal, so every step has the same shape."""
    prompts, stats = len(completions) // group_size, GroupFilter()
    kept: list[list[Completion]] = []
    spare: list[list[Completion]] = []
    pool = completions
    while True:
        totals = group_totals(pool)
        for g, rewards in enumerate(totals):
            group = pool[g * group_size : (g + 1) * group_size]
            (kept if float(rewards.std()) > 1e-9 else spare).append(group)
        if len(kept) >= prompts or stats.draws == max_draws:
            break
        stats.draws += 1
        pool = draw_more(stats.draws)
    stats.filtered = len(spare)
    chosen = (kept + spare)[:prompts]
    stats.short = max(prompts - len(kept), 0)
    return [c for group in chosen for c in group], stats
