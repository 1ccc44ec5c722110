"""The GRPO trainer: one rank of `deepspeed --module pipeline.trainer`, started by launch/train.py.

Each optimizer step runs the stages in order, each in one obvious place:
  data      prompts for this step (seeded order, resumable)              build.StepData
  generate  G completions per prompt from the vLLM server                rollout.Rollouts (pipeline/rollout)
  reward    this rank's completions, gathered for group statistics       rollout.score_step -> StepBatch
  advantage group-normalised rewards                                      grpo.group_advantages
  loss      clipped policy gradient on the server's token ids            grpo.grpo_loss
  optimizer DeepSpeed backward/step (accumulation, clipping, schedule)    this file, `train_on_batch`
  sync      push the new weights (vLLM weight-transfer API), verify them  server_link.ServerLink
  metrics   one row per step from sums over ranks                          metrics.metrics_row

`main` sets a rank up (`build.build`: data, rewards, the model under DeepSpeed; it closes the tool
workers however the rank leaves), `train` connects it to the server and hands over to `fit`, the loop. What it simplifies on purpose: one policy update per batch
of rollouts (TRL's num_iterations=1), so the server's logprobs are the "old" policy; no HF Trainer in
between, so DeepSpeed sees exactly the batch sizes we compute.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import math
import os
import sys
import time
import zlib
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.config import Config, ConfigError, TrainConfig, load_config, to_dict
from pipeline.generation.client import ServerError, server_token
from pipeline.generation.engines import Engines
from pipeline.rollout.evaluate import REQUEST_PROMPTS, evaluate, load_eval_examples
from pipeline.rollout.multi_turn import ToolRollouts
from pipeline.sync.rendezvous import RendezvousError, init_trainer_world, rendezvous_address
from pipeline.sync.weight_sync import WeightSyncError
from pipeline.task.data import DataError, PromptStyle
from pipeline.task.reasoning import check_reasoning
from pipeline.task.reward_functions import STRICT_POINTS, RewardError
from pipeline.task.tools import ToolError, tool_turn_s
from pipeline.trainer.build import TrainingParts, build
from pipeline.trainer.checkpoint import Resumed, restore_rng, resume_from, save_checkpoint, save_final_model
from pipeline.trainer.grpo import SamplerCorrection, grpo_loss, make_batch, step_normaliser, token_logprobs
from pipeline.trainer.metrics import Metrics, group_stats, metrics_row
from pipeline.trainer.rollout import (
    Rollouts,
    StaleRolloutError,
    StepBatch,
    keep_informative_groups,
    score_step,
    staleness_metrics,
    tool_metrics,
)
from pipeline.trainer.server_link import ServerLink
from pipeline.trainer.trust import untrusted_checkpoints

log = logging.getLogger("pipeline.trainer")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="pipeline.trainer", description="One GRPO trainer rank (use launch/train.py)"
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument(
        "--token-file",
        help="read the server token from this file (0600; multi-node ranks "
        "whose launcher does not forward the environment)",
    )
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def setup_logging(run_dir: Path, rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr)]
        + ([logging.FileHandler(run_dir / "train.log")] if rank == 0 else []),
    )


def main(argv=None) -> int:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    args = parse_args(argv)
    config = load_config(args.config, args.set)
    run_dir = Path(args.run_dir)
    if args.resume and (why := untrusted_checkpoints(run_dir)):  # before any pickle is opened
        raise SystemExit(f"error: --resume: refusing to load {run_dir / 'checkpoints'}: {why}")
    if torch.cuda.is_available():  # before any collective: NCCL binds to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # the ranks' store on MASTER_ADDR alone (DeepSpeed's would listen on every interface); DeepSpeed adopts it
    init_trainer_world(get_accelerator().communication_backend_name(), collective_timeout(config))
    deepspeed.init_distributed(timeout=collective_timeout(config))
    rank, world = dist.get_rank(), dist.get_world_size()
    release_shm_name(rank)
    setup_logging(run_dir, rank)
    parts = build(config, world)
    try:
        return train(args, config, parts, rank, run_dir)
    finally:  # rank 0's tool workers end with it, whichever way it leaves
        if parts.tools is not None:
            parts.tools.close()


def train(args, config: Config, parts: TrainingParts, rank: int, run_dir: Path) -> int:
    """The rank's run once its parts are built: resume, the engines' link, the steps, the final model."""
    # --- resume: all the state the uninterrupted run had at the checkpoint (README "Resume") ---------
    ckpt_dir = run_dir / "checkpoints"
    resumed = Resumed()
    if args.resume:
        resumed = resume_from(parts.engine, run_dir, rank, config.train.max_staleness, parts.total_steps)
    start_step = resumed.step

    # --- the engines' link: they must serve exactly the trainer's weights before the first rollout ---
    client = None
    if rank == 0:
        client = Engines(
            args.server_url,
            server_token(config.server.token, args.token_file),
            config.server.request_timeout_s,
            ca_file=config.server.tls_ca,
        )
    # Trainer rank 0 hosts the transfer group's rendezvous on this address; the server's workers dial it.
    link = ServerLink(
        parts.engine,
        parts.zero_stage,
        rank,
        config,
        client,
        dtype=parts.dtype,
        sync_host=rendezvous_address(config.sync.host, args.server_url),
    )
    link.connect()
    link.push(start_step)
    t = config.train
    metrics = Metrics(
        run_dir,
        rank == 0,
        t.report_to,
        config.run.project,
        config.run.name,
        to_dict(config),
        resumed_at=start_step if args.resume else None,
    )
    evaluation = (
        InTrainingEval(config, parts.tokenizer, client, parts.tools)
        if config.eval.every and rank == 0
        else None
    )
    tools = parts.tools if rank == 0 else None
    rollouts = Rollouts(
        client,
        n=t.num_generations,
        max_tokens=t.max_completion_tokens,
        temperature=t.temperature,
        top_p=t.top_p,
        seed=config.run.seed,
        max_staleness=t.max_staleness,
        tools=tools,
    )
    rollouts.discarded = resumed.counters.get("discarded", 0)
    if resumed.rng is not None:
        restore_rng(resumed.rng)  # last: nothing between here and the first step draws from them

    fit(parts, link, rollouts, metrics, evaluation, start_step, ckpt_dir, resumed.ahead)

    metrics.close()
    rollouts.close()
    save_checkpoint(
        parts.engine, ckpt_dir, parts.total_steps, t.keep_checkpoints, rank, {"discarded": rollouts.discarded}
    )
    save_final_model(parts.engine, parts.zero_stage, parts.tokenizer, run_dir / "final", rank)
    link.close()
    log.info("done: %d steps; final model in %s", parts.total_steps, run_dir / "final")
    dist.barrier()
    # Without this, gloo's worker threads can outlive the interpreter's teardown and abort the rank
    # (SIGABRT, "terminate called without an active exception") after a run that succeeded.
    dist.destroy_process_group()
    return 0


def fit(
    parts: TrainingParts,
    link: ServerLink,
    rollouts: Rollouts,
    metrics: Metrics,
    evaluation: InTrainingEval | None,
    start_step: int,
    ckpt_dir: Path,
    ahead=None,
) -> None:
    """The loop: generate -> reward/advantage -> train -> sync -> metrics -> checkpoint, every step; with
    train.max_staleness k >= 1 the next k steps' generation runs beside it (pipeline/trainer/rollout.py).
    `ahead`: resumed with k >= 1, step `start_step`'s rollouts as the checkpoint kept them."""
    from tqdm import tqdm

    config, t, engine, data = parts.config, parts.config.train, parts.engine, parts.step_data
    rank, total = dist.get_rank(), parts.total_steps

    def prompts_of(examples: list) -> tuple[list[list[int]], list]:
        return [parts.style.ids(parts.tokenizer, e) for e in examples], examples

    def request_rollouts(step: int, done=None) -> None:
        rollouts.request(step, *prompts_of(data(step)), done)

    def with_signal(step: int, completions: list, generated_by: int):
        return keep_informative_groups(
            completions,
            t.num_generations,
            lambda pool: score(pool, generated_by).group_totals,
            lambda k: rollouts.draw(step, k, *prompts_of(data.extra(step, k))),
            t.dynamic_sampling_max_draws,
        )

    score = functools.partial(
        score_step,
        rank=rank,
        world=parts.world,
        group_size=t.num_generations,
        scaling=t.advantage_scaling,
        weights=config.rewards,
        rewards=parts.rewards,
        system_prompt=parts.style.system_prompt,
        device=engine.device,
    )

    ahead_steps = t.max_staleness  # steps requested before they start (0: synchronous)
    for step in range(start_step, min(start_step + ahead_steps, total)):
        request_rollouts(step, ahead if step == start_step else None)
    bar = tqdm(total=total, initial=start_step, desc="GRPO", disable=rank != 0, dynamic_ncols=True)
    for step in range(start_step, total):
        clock = StepClock()
        generating = rollouts.busy.seconds()
        if not ahead_steps:
            request_rollouts(step)
        try:
            completions, generated_by = rollouts.collect(step, version=step)
        except ServerError as e:  # the server died mid-generation: fail, or (server.restart) retry once
            link.recover(e, step)
            request_rollouts(step)
            completions, generated_by = rollouts.collect(step, version=step)
        filled = None
        if t.dynamic_sampling:  # before the next step's request: the extra draws use these weights
            completions, filled = with_signal(step, completions, generated_by)
        if ahead_steps and step + ahead_steps < total:
            request_rollouts(step + ahead_steps)  # generated while this step trains
        clock.lap("generate")  # the trainer's wait for rollouts

        batch = score(completions, generated_by)
        clock.lap("reward")
        sums, maxima = train_on_batch(
            engine, parts.reference, batch, t, parts.tokenizer.pad_token_id, parts.world
        )
        clock.lap("train")
        if ahead_steps == 1:  # overlapped: the next step's generation finishes before its weights change
            rollouts.wait()
        clock.lap("wait_rollouts")
        link.push(step + 1)  # k >= 2: into the generation under way (the engines pause for it)
        clock.lap("sync")
        # on a multi-turn sequence when there is one: tool turns are in what the trainer scores too
        probed = max(completions, key=lambda c: len(c.tool_calls))
        probe = link.probe(probed.prompt_ids, probed.token_ids, step + 1, later=ahead_steps >= 2)
        clock.lap("probe")
        times = clock.times()
        idle = idle_fractions(times, rollouts.busy.seconds() - generating)

        row = step_row(
            step,
            batch,
            sums,
            maxima,
            parts,
            {
                "data/first_index": data.indices(step)[0],  # shows the data order survives a resume
                "data/prompts_crc": prompts_crc(completions, t.num_generations),
                "rollout/staleness": step - generated_by,
                **staleness_metrics(completions, t.num_generations, step),
                "rollout/dropped_stale": rollouts.dropped_stale,
                "rollout/buffer_steps": rollouts.buffered,
                **idle,
                "rollout/discarded_total": rollouts.discarded,
                **(
                    {
                        "rollout/filtered_groups": filled.filtered,
                        "rollout/dynamic_draws": filled.draws,
                        "rollout/short_groups": filled.short,
                    }
                    if filled is not None
                    else {}
                ),
                **engine_columns(link, rollouts),
                "sync/logprob_max_abs_diff": 0.0,
                **probe,
                "sync/bytes": link.last_stats.get("bytes", 0),
                "sync/adapter": link.last_stats.get("adapter", 0.0),
                "sync/verified_tensors": link.last_stats.get("verified_tensors", 0),
                "sync/verified_bytes_frac": link.last_stats.get("verified_bytes_frac", 0.0),
                "sync/gb_per_s": link.last_stats.get("gb_per_s", 0.0),
                "time/verify": link.last_stats.get("verify_s", 0.0),
                **(
                    {"sync/shared_memory": link.last_stats["shared_memory"]}
                    if "shared_memory" in link.last_stats
                    else {}
                ),
                **(tool_metrics(completions, parts.tools.toolbox.names) if parts.tools is not None else {}),
                **rollouts.timing,
                **times,
            },
        )
        if evaluation and ((step + 1) % config.eval.every == 0 or step + 1 == total):
            row.update(evaluation.run(step + 1))  # the weights just pushed: version step + 1
        if (step + 1) % t.log_every == 0 or step + 1 == total:
            metrics.write(row)
        if t.log_completions_every and t.log_completions and (step + 1) % t.log_completions_every == 0:
            metrics.write_completions(step + 1, completion_samples(batch, t.log_completions))
        bar.update(1)
        bar.set_postfix(
            reward=f"{row['reward/total']:.3f}",
            strict=f"{row['format/strict_rate']:.2f}",
            step_s=f"{row['time/step']:.1f}",
        )
        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < total:
            # k >= 1: step + 1's rollouts may be in hand, from weights the checkpoint does not hold:
            # kept with it, so that a resume trains on the same rollouts (later steps' are generated again)
            generated = rollouts.ahead(step + 1)
            save_checkpoint(
                engine,
                ckpt_dir,
                step + 1,
                t.keep_checkpoints,
                rank,
                {"discarded": rollouts.discarded},
                None if generated is None else {"step": step + 1, "rollouts": generated},
            )
    bar.close()


def idle_fractions(times: dict[str, float], generating_s: float) -> dict[str, float]:
    """The shares of the step the engines had no generate request under way (rank 0's) and the
    trainer waited for rollouts."""
    step = times["time/step"]
    return {
        "time/generation_idle_frac": max(0.0, 1 - generating_s / step),
        "time/trainer_idle_frac": (times["time/generate"] + times["time/wait_rollouts"]) / step,
    }


def prompts_crc(completions: list, group_size: int) -> int:
    """A checksum of the prompts the step trained (their rows' file:line, in order): equal in two runs
    only if each step trained the same prompts (a resume loses and repeats none)."""
    sources = "\n".join(c.example.source for c in completions[::group_size])
    return zlib.crc32(sources.encode())


def engine_columns(link: ServerLink, rollouts: Rollouts) -> dict[str, float]:
    """Restarts (in all, and per engine with several), engines generating, the slowest engine's time
    over the mean (`rollout/engine_imbalance`, 1 = balanced) and the engines each push verified."""
    restarts = link.restarts
    row = {
        "server/restarts": sum(restarts.values()),
        "sync/engines_verified": link.last_stats.get("engines_verified", 0),
    }
    if len(restarts) > 1:
        row.update({f"server/restarts/engine_{i}": n for i, n in restarts.items()})
        row.update(
            {
                "server/engines": rollouts.split.get("engines", 0),
                "rollout/engine_imbalance": rollouts.split.get("imbalance", 1.0),
            }
        )
    return row


class StepClock:
    """A step's phases as `time/<phase>` seconds (each since the previous lap), and `time/step`."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[f"time/{phase}"] = now - self.last
        self.last = now

    def times(self) -> dict[str, float]:
        return {**self.laps, "time/step": time.perf_counter() - self.start}


def step_row(
    step: int, batch: StepBatch, sums: dict, maxima: dict, parts: TrainingParts, extra: dict
) -> dict:
    """The step's metrics row: this rank's sums reduced over every rank, and what rank 0 knows as is."""
    counts, longest = completion_stats(batch)
    s, mx = Metrics.reduce({**sums, **counts}, {**maxima, **longest}, parts.engine.device)
    return metrics_row(
        step + 1,
        s,
        mx,
        list(parts.rewards),
        {
            "epoch": (step + 1) / parts.step_data.steps_per_epoch,
            "lr": parts.engine.get_lr()[0],
            **group_stats(batch.group_totals.tolist()),
            **{f"time/{k.removeprefix('time_')}": v for k, v in mx.items() if k.startswith("time_")},
            **extra,
        },
    )


def train_on_batch(
    engine, reference, batch: StepBatch, t: TrainConfig, pad_id: int, world: int
) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step on this rank's completions: `gradient_accumulation_steps` micro-batches of
    forward (with the frozen reference when beta > 0), GRPO loss, backward; DeepSpeed steps, clips
    and schedules at the accumulation boundary. Returns this rank's sums and maxima for the metrics
    (the maxima include each phase's seconds, `time_<phase>`: the slowest rank's after the reduction)."""
    engine.train()
    device = engine.device
    mine, advantages = batch.completions, batch.advantages
    trained = [not (t.mask_truncated_completions and c.truncated) for c in mine]
    token_total = step_normaliser(
        t.loss_type,
        sum(c.model_tokens for c, k in zip(mine, trained, strict=True) if k),
        t.gradient_accumulation_steps,
        world,
        device,
    )
    sums = dict.fromkeys(
        ("loss", "tokens", "clipped_tokens", "capped_tokens", "ratio_sum", "entropy_sum"), 0.0
    )
    if t.beta > 0:
        sums["kl_sum"] = 0.0
    maxima = {"ratio_max": 0.0, "time_forward": 0.0, "time_backward": 0.0, "time_optimizer": 0.0}
    correction = sampler_correction(t)
    for m in range(t.gradient_accumulation_steps):
        start = time.perf_counter()
        part = slice(m * t.micro_batch_size, (m + 1) * t.micro_batch_size)
        chunk = mine[part]
        micro = make_batch(
            [c.prompt_ids for c in chunk],
            [c.token_ids for c in chunk],
            [c.logprobs for c in chunk],
            advantages[part].tolist(),
            trained[part],
            pad_id,
            device,
            [c.loss_mask for c in chunk],
        )
        logprobs, entropy = token_logprobs(
            engine, micro.input_ids, micro.attention_mask, t.temperature, with_entropy=True
        )
        ref_logprobs = None
        if t.beta > 0:
            ref_model, off = (
                (reference, contextlib.nullcontext())
                if reference is not None
                else (engine, engine.module.disable_adapter())
            )  # LoRA: the adapter switched off
            with torch.no_grad(), off:
                ref_logprobs = token_logprobs(ref_model, micro.input_ids, micro.attention_mask, t.temperature)
        loss, stats = grpo_loss(
            logprobs,
            micro,
            epsilon=t.epsilon,
            epsilon_high=t.epsilon_high or None,
            loss_type=t.loss_type,
            is_cap=t.is_cap,
            beta=t.beta,
            ref_logprobs=ref_logprobs,
            token_normaliser=token_total,
            max_completion_tokens=t.max_completion_tokens,
            importance_sampling_level=t.importance_sampling_level,
            sampler_correction=correction,
            use_bias_correction_kl=t.use_bias_correction_kl,
        )
        forward = time.perf_counter()
        engine.backward(loss)
        backward = time.perf_counter()
        engine.step()  # the optimizer step at the accumulation boundary (clipping, schedule)
        maxima["time_forward"] += forward - start
        maxima["time_backward"] += backward - forward
        maxima["time_optimizer"] += time.perf_counter() - backward
        sums["loss"] += loss.item() / t.gradient_accumulation_steps / world
        sums["entropy_sum"] += float((entropy * micro.completion_mask).sum())
        for key in ("tokens", "clipped_tokens", "capped_tokens", "ratio_sum", "kl_sum"):
            if key in sums:
                sums[key] += stats[key]
        for key in ("sampler_weight_sum", "sampler_masked_tokens"):  # with the sampler correction
            if key in stats:
                sums[key] = sums.get(key, 0.0) + stats[key]
        for key in ("ratio_max", "sampler_weight_max"):
            if key in stats:
                maxima[key] = max(maxima.get(key, 0.0), stats[key])
    # the gradient's norm before clipping, computed by DeepSpeed at the boundary (the same on every rank)
    norm = engine.get_global_grad_norm()
    maxima["grad_norm"] = float(norm) if norm is not None else math.nan
    return sums, maxima


def sampler_correction(t: TrainConfig) -> SamplerCorrection | None:
    """train.vllm_importance_sampling_*, as the loss takes them (None: the ratio is against the sampler)."""
    if not t.vllm_importance_sampling_correction:
        return None
    return SamplerCorrection(
        t.vllm_importance_sampling_mode,
        t.vllm_importance_sampling_clip_min,
        t.vllm_importance_sampling_clip_max,
    )


def completion_stats(batch: StepBatch) -> tuple[dict[str, float], dict[str, float]]:
    """This rank's sums and maxima over its completions, for the metrics (reduced over ranks by the caller)."""
    mine, per_reward = batch.completions, batch.per_reward
    checks = [check_reasoning(c.final_text) for c in mine]
    return {
        "count": float(len(mine)),
        "reward_total": float(sum(batch.totals)),
        "strict": float(sum(v == STRICT_POINTS for v in per_reward["strict_format"])),
        "correct": float(sum(v > 0 for v in per_reward["correctness"])),
        "length": float(sum(len(c.token_ids) for c in mine)),
        "truncated": float(sum(c.truncated for c in mine)),
        "reasoning_steps": float(sum(r.steps for r in checks)),
        "reasoning_correct": float(sum(r.correct_steps for r in checks)),
        **{f"r_{name}": float(sum(values)) for name, values in per_reward.items()},
    }, {"length_max": float(max(len(c.token_ids) for c in mine))}


class InTrainingEval:
    """eval.every: rank 0 evaluates what the server serves now (eval.limit test problems) and returns
    the summary as `eval/<key>` columns of that step's metrics row."""

    def __init__(self, config: Config, tokenizer, client: Engines, tools: ToolRollouts | None = None):
        self.config, self.tokenizer, self.client = config, tokenizer, client
        self.examples, _ = load_eval_examples(config, tokenizer, None, config.eval.limit or None)
        self.style = PromptStyle.from_config(config.data)
        self.tools = tools

    def run(self, step: int) -> dict[str, float]:
        e = self.config.eval
        summary, _ = evaluate(
            self.client,
            self.tokenizer,
            self.examples,
            max_tokens=self.config.train.max_completion_tokens,
            maj_k=e.maj_k,
            temperature=e.temperature,
            seed=self.config.run.seed + step,
            style=self.style,
            tools=self.tools,
        )
        log.info(
            "step %d: eval pass@1 strict accuracy %.3f on %d problems",
            step,
            summary.get("pass@1/strict_accuracy", float("nan")),
            len(self.examples),
        )
        return {f"eval/{k}": v for k, v in summary.items() if isinstance(v, int | float)}


def completion_samples(batch: StepBatch, count: int) -> list[dict]:
    """The first `count` of this rank's completions as table rows."""
    rows = []
    for i, c in enumerate(batch.completions[:count]):
        # with tools the text shows the turns: the calls, the results the model read, its answer
        rows.append(
            {
                "prompt": c.example.question,
                "completion": c.text,
                "reference": c.answer,
                **{f"reward/{name}": values[i] for name, values in batch.per_reward.items()},
                "reward/total": batch.totals[i],
                "advantage": float(batch.advantages[i]),
            }
        )
    return rows


def release_shm_name(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm buffer per rank and never unlinks it, so every
    run on CPU leaked RAM (a test suite: gigabytes, until the machine crawled). Once every rank has
    mapped every peer's buffer (during init_distributed, hence the barrier), the names can go: the
    memory stays mapped while the ranks live and is freed when they exit, however they exit."""
    dist.barrier()
    name = (
        f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
        f"{os.environ.get('MASTER_PORT')}_{rank}"
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def collective_timeout(config: Config) -> timedelta:
    """How long a rank waits in a collective for the others. Rank 0 alone talks to the server, so the
    other ranks wait out its deadlines (a generation, a server restart, a push) plus a margin: rank 0's
    error names the cause, instead of a bare gloo/NCCL timeout on a rank that was only waiting. With
    tools a generation is up to max_tool_calling_iterations more turns, each the turn's calls (bounded
    as a whole: pipeline/task/tools.py `tool_turn_s`) and a request."""
    s, e, r = config.server, config.eval, config.rollout
    generation = s.request_timeout_s
    if r.tools or r.environment:
        generation += r.max_tool_calling_iterations * (tool_turn_s(r.tool_timeout_s) + s.request_timeout_s)
    evaluation = 0.0
    if e.every:  # one greedy (and one sampled, for maj@k) request per 128 problems, each within its deadline
        requests = -(-(e.limit or 10_000) // REQUEST_PROMPTS) * (2 if e.maj_k else 1)
        evaluation = requests * generation
    return timedelta(seconds=generation + s.startup_timeout_s + config.sync.timeout_s + evaluation + 120)


def command() -> int:
    """`python -m pipeline.trainer` (pipeline/trainer/__main__.py): `main`, its refusals as one line."""
    try:
        return main()
    except (ConfigError, DataError, RewardError, ToolError, RendezvousError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ServerError, WeightSyncError, StaleRolloutError) as e:  # the server failed: say so in one line
        print(f"error: {e}", file=sys.stderr)
        return 1
