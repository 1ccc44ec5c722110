"""The GRPO trainer: one rank of `deepspeed --module pipeline.train`, started by launch/train.py.

Each optimizer step runs the stages in order, each in one obvious place:
  data      prompts for this step (seeded order, resumable)              this file, `StepData`
  generate  G completions per prompt from the vLLM server                rollout.Rollouts
  reward    this rank's completions, gathered for group statistics       rollout.score_step -> StepBatch
  advantage group-normalised rewards                                      grpo.group_advantages
  loss      clipped policy gradient on the server's token ids            grpo.grpo_loss
  optimizer DeepSpeed backward/step (accumulation, clipping, schedule)    this file, `train_on_batch`
  sync      push the new weights (vLLM weight-transfer API), verify them  server_link.ServerLink
  metrics   one row per step from sums over ranks                          metrics.metrics_row

What it simplifies on purpose: one policy update per batch of rollouts (TRL's num_iterations=1),
so the server's logprobs are the "old" policy; no HF Trainer in between, so DeepSpeed sees exactly
the batch sizes we compute.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.client import ServerClient, ServerError
from pipeline.config import Config, ConfigError, TrainConfig, check_batch, load_config, to_dict
from pipeline.data import DataError, Example, PromptStyle, drop_long_prompts, examples_for
from pipeline.device import resolve_attn, resolve_dtype
from pipeline.grpo import grpo_loss, make_batch, step_token_normaliser, token_logprobs
from pipeline.lora import adapter_state, with_lora
from pipeline.metrics import Metrics, group_stats, metrics_row
from pipeline.reasoning import check_reasoning
from pipeline.rewards import STRICT_POINTS, RewardError, load_rewards
from pipeline.rollout import Rollouts, StaleRolloutError, StepBatch, score_step
from pipeline.server_link import ServerLink
from pipeline.weight_sync import ModelSource, WeightSyncError

log = logging.getLogger("pipeline.train")


class StepData:
    """The prompts of step s: a seeded permutation per epoch, consumed in order (so resumable)."""

    def __init__(self, examples: list[Example], prompts_per_step: int, seed: int):
        self.examples, self.per_step, self.seed = examples, prompts_per_step, seed
        self.steps_per_epoch = len(examples) // prompts_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(f"train: {len(examples)} training prompts are fewer than the "
                              f"{prompts_per_step} prompts one step needs")
        self._order: dict[int, list[int]] = {}

    def indices(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._order:
            order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(order)
            self._order = {epoch: order}
        return self._order[epoch][index * self.per_step: (index + 1) * self.per_step]

    def __call__(self, step: int) -> list[Example]:
        return [self.examples[i] for i in self.indices(step)]


def lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int):
    """train.lr_scheduler with linear warm-up; cosine ends at train.min_lr_ratio x the peak."""
    from transformers import get_scheduler

    name, floor = (("cosine_with_min_lr", {"min_lr_rate": t.min_lr_ratio}) if t.min_lr_ratio
                   else (t.lr_scheduler, None))
    return get_scheduler(name, optimizer, num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
                         num_training_steps=total_steps, scheduler_specific_kwargs=floor)


def deepspeed_config(config: Config, dtype: torch.dtype) -> dict:
    """The JSON from train.deepspeed_config with what this config decides filled in."""
    path = Path(config.train.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed_config: cannot load {path}: {e}") from None
    ds.update({
        "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
        "gradient_accumulation_steps": config.train.gradient_accumulation_steps,
        "gradient_clipping": config.train.max_grad_norm,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no DeepSpeed op build needed on CPU
        "steps_per_print": 10**9,
    })
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the three values above
    return ds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="pipeline.train", description="One GRPO trainer rank (use launch/train.py)")
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--server-url", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--token-file", help="read the server token from this file (0600; multi-node ranks "
                                             "whose launcher does not forward the environment)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by deepspeed
    return parser.parse_args(argv)


def load_tokenizer(config: Config):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(config.model.path,
                                                           trust_remote_code=config.model.trust_remote_code)
    if tokenizer.pad_token_id is None:  # e.g. prem-1B-chat: padding only needs some id; the mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def server_token(token_file: str | None, config: Config) -> str:
    """GRPO_SERVER_TOKEN, else --token-file, else server.token (the token never travels on a command line)."""
    if os.environ.get("GRPO_SERVER_TOKEN"):
        return os.environ["GRPO_SERVER_TOKEN"]
    if token_file:
        try:
            return Path(token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"--token-file: cannot read {token_file}: {e.strerror or e}") from None
    return config.server.token


def setup_logging(run_dir: Path, rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
                        handlers=[logging.StreamHandler(sys.stderr)]
                        + ([logging.FileHandler(run_dir / "train.log")] if rank == 0 else []))


def main(argv=None) -> int:
    import deepspeed
    import transformers
    from tqdm import tqdm

    args = parse_args(argv)
    config = load_config(args.config, args.set)
    run_dir = Path(args.run_dir)
    if torch.cuda.is_available():  # before any collective: NCCL binds to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(timeout=collective_timeout(config))
    rank, world = dist.get_rank(), dist.get_world_size()
    release_shm_name(rank)
    setup_logging(run_dir, rank)
    t = config.train
    prompts_per_step = check_batch(config, world)
    seed = config.run.seed
    random.seed(seed)
    torch.manual_seed(seed)

    # --- data ------------------------------------------------------------------------------------
    tokenizer = load_tokenizer(config)
    style = PromptStyle.from_config(config.data)
    examples = examples_for(config.data, "train", seed)
    examples, dropped = drop_long_prompts(examples, tokenizer, config.data.max_prompt_tokens, style)
    rewards = load_rewards(config.reward_functions)
    log.info("%d training prompts (%d dropped as longer than %d tokens)", len(examples), dropped,
             config.data.max_prompt_tokens)
    step_data = StepData(examples, prompts_per_step, seed)
    total_steps = step_data.steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    # --- model, optimizer, schedule under DeepSpeed ------------------------------------------------
    dtype = resolve_dtype(config.model.dtype)
    # Loaded in the training dtype (Flash Attention 2 needs bf16/fp16); DeepSpeed keeps fp32 master
    # weights in the optimizer when bf16 is on.
    attn = resolve_attn(config.model.attn_implementation, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        config.model.path, dtype=dtype, attn_implementation=attn, trust_remote_code=config.model.trust_remote_code)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.model.lora_rank:
        model = with_lora(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate,
                                  betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    scheduler = lr_schedule(optimizer, t, total_steps)
    ds_config = deepspeed_config(config, dtype)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    device = engine.device
    reference = None  # with LoRA the reference is the policy with its adapter switched off: no second copy
    if t.beta > 0 and not config.model.lora_rank:
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(  # the same kernel: KL compares like with like
            config.model.path, dtype=dtype, attn_implementation=attn, trust_remote_code=config.model.trust_remote_code)
        ref_config = {k: v for k, v in ds_config.items() if k not in ("zero_allow_untested_optimizer",)}
        if zero_stage != 3:
            ref_config["zero_optimization"] = {"stage": 0}
        reference, *_ = deepspeed.initialize(model=ref_model, config=ref_config)
        reference.eval()

    # --- resume -------------------------------------------------------------------------------------
    ckpt_dir = run_dir / "checkpoints"
    start_step = 0
    if args.resume:
        path, state = engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise SystemExit(f"error: --resume: no checkpoint in {ckpt_dir}")
        start_step = state["step"]
        if rank == 0:
            trim_metrics(run_dir / "metrics.jsonl", start_step)
        log.info("resumed from %s at step %d", path, start_step)

    # --- the server link: the server must serve exactly the trainer's weights before the first rollout ---
    client = None
    if rank == 0:
        client = ServerClient(args.server_url, server_token(args.token_file, config), config.server.request_timeout_s)
    server_is_local = args.server_url.split("//")[-1].startswith(("127.", "localhost", "[::1]"))
    # Trainer rank 0 hosts the transfer group's rendezvous; the server's workers connect to it.
    link = ServerLink(engine, zero_stage, rank, config, client, dtype=dtype,
                      sync_host=config.sync.host or ("127.0.0.1" if server_is_local else socket.getfqdn()))
    link.connect()
    link.push(start_step)
    metrics = Metrics(run_dir, rank == 0, t.report_to, config.run.project, config.run.name, to_dict(config))
    evaluation = InTrainingEval(config, tokenizer, client) if config.eval.every and rank == 0 else None
    rollouts = Rollouts(client, n=t.num_generations, max_tokens=t.max_completion_tokens, temperature=t.temperature,
                        top_p=t.top_p, seed=seed, max_staleness=t.max_staleness if t.overlap else 0)

    def request_rollouts(step: int) -> None:
        batch = step_data(step)
        rollouts.request(step, [style.ids(tokenizer, e) for e in batch], batch)

    # --- the loop: generate -> reward/advantage -> train -> sync -> metrics -> checkpoint ----------------
    if t.overlap and start_step < total_steps:
        request_rollouts(start_step)
    bar = tqdm(total=total_steps, initial=start_step, desc="GRPO", disable=rank != 0, dynamic_ncols=True)
    for step in range(start_step, total_steps):
        step_start = time.perf_counter()
        if not t.overlap:
            request_rollouts(step)
        try:
            completions, generated_by = rollouts.collect(step, version=step)
        except ServerError as e:  # the server died mid-generation: fail, or (server.restart) retry once
            link.recover(e, step)
            request_rollouts(step)
            completions, generated_by = rollouts.collect(step, version=step)
        if t.overlap and step + 1 < total_steps:
            request_rollouts(step + 1)  # generated while this step trains; its push waits for it
        time_generate = time.perf_counter() - step_start  # the trainer's wait for rollouts

        start = time.perf_counter()
        batch = score_step(completions, generated_by, rank=rank, world=world, group_size=t.num_generations,
                           scaling=t.advantage_scaling, weights=config.rewards, rewards=rewards,
                           system_prompt=style.system_prompt, device=device)
        time_reward = time.perf_counter() - start

        start = time.perf_counter()
        sums, maxima = train_on_batch(engine, reference, batch, t, tokenizer.pad_token_id, world)
        time_train = time.perf_counter() - start

        start = time.perf_counter()
        rollouts.wait()  # overlapped: the next step's generation finishes before its weights change
        time_wait = time.perf_counter() - start
        link.push(step + 1)
        time_sync = time.perf_counter() - start - time_wait
        sync_diff = link.probe(completions[0].prompt_ids, completions[0].token_ids, step + 1)

        counts, longest = completion_stats(batch)
        s, mx = Metrics.reduce({**sums, **counts}, {**maxima, **longest}, device)
        row = metrics_row(step + 1, s, mx, list(rewards), {
            "epoch": (step + 1) / step_data.steps_per_epoch, "lr": engine.get_lr()[0],
            **group_stats(batch.group_totals.tolist()),
            "data/first_index": step_data.indices(step)[0],  # shows the data order survives a resume
            "rollout/staleness": step - generated_by, "rollout/discarded_total": rollouts.discarded,
            "server/restarts": link.restarts, "sync/logprob_max_abs_diff": sync_diff,
            "sync/verified_tensors": link.last_stats.get("verified_tensors", 0),
            "sync/gb_per_s": link.last_stats.get("gb_per_s", 0.0),
            "time/generate": time_generate, "time/reward": time_reward, "time/train": time_train,
            "time/sync": time_sync, "time/wait_rollouts": time_wait, "time/step": time.perf_counter() - step_start,
        })
        if evaluation and ((step + 1) % config.eval.every == 0 or step + 1 == total_steps):
            row.update(evaluation.run(step + 1))  # the weights just pushed: version step + 1
        if (step + 1) % t.log_every == 0 or step + 1 == total_steps:
            metrics.write(row)
        if t.log_completions_every and t.log_completions and (step + 1) % t.log_completions_every == 0:
            metrics.write_completions(step + 1, completion_samples(batch, t.log_completions))
        bar.update(1)
        bar.set_postfix(reward=f"{row['reward/total']:.3f}", strict=f"{row['format/strict_rate']:.2f}",
                        step_s=f"{row['time/step']:.1f}")

        if t.save_every and (step + 1) % t.save_every == 0 and step + 1 < total_steps:
            save_checkpoint(engine, ckpt_dir, step + 1, t.keep_checkpoints, rank)

    bar.close()
    metrics.close()
    rollouts.close()
    save_checkpoint(engine, ckpt_dir, total_steps, t.keep_checkpoints, rank)
    save_final_model(engine, zero_stage, tokenizer, run_dir / "final", rank)
    link.close()
    log.info("done: %d steps; final model in %s", total_steps, run_dir / "final")
    dist.barrier()
    return 0


def train_on_batch(engine, reference, batch: StepBatch, t: TrainConfig, pad_id: int,
                   world: int) -> tuple[dict[str, float], dict[str, float]]:
    """One optimizer step on this rank's completions: `gradient_accumulation_steps` micro-batches of
    forward (with the frozen reference when beta > 0), GRPO loss, backward; DeepSpeed steps, clips
    and schedules at the accumulation boundary. Returns this rank's sums and maxima for the metrics."""
    engine.train()
    device = engine.device
    mine, advantages = batch.completions, batch.advantages
    trained = [not (t.mask_truncated_completions and c.truncated) for c in mine]
    token_total = None
    if t.loss_type == "dapo":  # the step's trained tokens over every rank and micro-batch
        count = torch.tensor([float(sum(len(c.token_ids) for c, k in zip(mine, trained, strict=True) if k))],
                             device=device)
        dist.all_reduce(count)
        token_total = step_token_normaliser(count.item(), t.gradient_accumulation_steps, world)
    sums = dict.fromkeys(("loss", "tokens", "clipped_tokens", "capped_tokens", "ratio_sum", "entropy_sum"), 0.0)
    if t.beta > 0:
        sums["kl_sum"] = 0.0
    maxima = {"ratio_max": 0.0}
    for m in range(t.gradient_accumulation_steps):
        part = slice(m * t.micro_batch_size, (m + 1) * t.micro_batch_size)
        chunk = mine[part]
        micro = make_batch([c.prompt_ids for c in chunk], [c.token_ids for c in chunk], [c.logprobs for c in chunk],
                           advantages[part].tolist(), trained[part], pad_id, device)
        logprobs, entropy = token_logprobs(engine, micro.input_ids, micro.attention_mask, t.temperature,
                                           with_entropy=True)
        ref_logprobs = None
        if t.beta > 0:
            ref_model, off = ((reference, contextlib.nullcontext()) if reference is not None
                              else (engine, engine.module.disable_adapter()))  # LoRA: the adapter switched off
            with torch.no_grad(), off:
                ref_logprobs = token_logprobs(ref_model, micro.input_ids, micro.attention_mask, t.temperature)
        loss, stats = grpo_loss(logprobs, micro, epsilon=t.epsilon, epsilon_high=t.epsilon_high or None,
                                loss_type=t.loss_type, is_cap=t.is_cap, beta=t.beta, ref_logprobs=ref_logprobs,
                                token_normaliser=token_total, max_completion_tokens=t.max_completion_tokens)
        engine.backward(loss)
        engine.step()
        sums["loss"] += loss.item() / t.gradient_accumulation_steps / world
        sums["entropy_sum"] += float((entropy * micro.completion_mask).sum())
        for key in ("tokens", "clipped_tokens", "capped_tokens", "ratio_sum", "kl_sum"):
            if key in sums:
                sums[key] += stats[key]
        maxima["ratio_max"] = max(maxima["ratio_max"], stats["ratio_max"])
    # the gradient's norm before clipping, computed by DeepSpeed at the boundary (the same on every rank)
    norm = engine.get_global_grad_norm()
    maxima["grad_norm"] = float(norm) if norm is not None else math.nan
    return sums, maxima


def completion_stats(batch: StepBatch) -> tuple[dict[str, float], dict[str, float]]:
    """This rank's sums and maxima over its completions, for the metrics (reduced over ranks by the caller)."""
    mine, per_reward = batch.completions, batch.per_reward
    checks = [check_reasoning(c.text) for c in mine]
    return {
        "count": float(len(mine)), "reward_total": float(sum(batch.totals)),
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

    def __init__(self, config: Config, tokenizer, client: ServerClient):
        from pipeline.evaluate import load_eval_examples

        self.config, self.tokenizer, self.client = config, tokenizer, client
        self.examples, _ = load_eval_examples(config, tokenizer, None, config.eval.limit or None)
        self.style = PromptStyle.from_config(config.data)

    def run(self, step: int) -> dict[str, float]:
        from pipeline.evaluate import evaluate

        e = self.config.eval
        summary, _ = evaluate(self.client, self.tokenizer, self.examples, max_tokens=self.config.train.max_completion_tokens,
                              maj_k=e.maj_k, temperature=e.temperature, seed=self.config.run.seed + step, style=self.style)
        log.info("step %d: eval pass@1 strict accuracy %.3f on %d problems", step,
                 summary.get("pass@1/strict_accuracy", float("nan")), len(self.examples))
        return {f"eval/{k}": v for k, v in summary.items() if isinstance(v, int | float)}


def completion_samples(batch: StepBatch, count: int) -> list[dict]:
    """The first `count` of this rank's completions as table rows."""
    rows = []
    for i, c in enumerate(batch.completions[:count]):
        rows.append({"prompt": c.example.question, "completion": c.text, "reference": c.answer,
                     **{f"reward/{name}": values[i] for name, values in batch.per_reward.items()},
                     "reward/total": batch.totals[i], "advantage": float(batch.advantages[i])})
    return rows


def release_shm_name(rank: int) -> None:
    """DeepSpeed's CPU all-reduce maps a 66 MB /dev/shm buffer per rank and never unlinks it, so every
    run on CPU leaked RAM (a test suite: gigabytes, until the machine crawled). Once every rank has
    mapped every peer's buffer (during init_distributed, hence the barrier), the names can go: the
    memory stays mapped while the ranks live and is freed when they exit, however they exit."""
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{rank}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(Path("/dev/shm") / name)


def collective_timeout(config: Config) -> timedelta:
    """How long a rank waits in a collective for the others. Rank 0 alone talks to the server, so the
    other ranks wait out its deadlines (a generation, a server restart, a push) plus a margin: rank 0's
    error names the cause, instead of a bare gloo/NCCL timeout on a rank that was only waiting."""
    s, e = config.server, config.eval
    evaluation = 0.0
    if e.every:  # one greedy (and one sampled, for maj@k) request per 128 problems, each within its deadline
        from pipeline.evaluate import REQUEST_PROMPTS

        requests = -(-(e.limit or 10_000) // REQUEST_PROMPTS) * (2 if e.maj_k else 1)
        evaluation = requests * s.request_timeout_s
    return timedelta(seconds=s.request_timeout_s + s.startup_timeout_s + config.sync.timeout_s + evaluation + 120)


def save_checkpoint(engine, ckpt_dir: Path, step: int, keep: int, rank: int) -> None:
    """Model, optimizer, scheduler (DeepSpeed) plus our step counter; old ones pruned.

    Atomic: `latest` names a tag only once every rank has finished writing it, and is itself
    replaced with a rename, so a kill at any moment leaves the previous complete checkpoint loadable.
    """
    engine.save_checkpoint(str(ckpt_dir), tag=f"step-{step}", client_state={"step": step}, save_latest=False)
    dist.barrier()
    if rank == 0:
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(f"step-{step}")
        os.replace(tmp, ckpt_dir / "latest")
        tags = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in tags[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def trim_metrics(path: Path, last_step: int) -> None:
    """On resume: keep only whole rows up to the checkpoint's step (rows written after it, and a line
    torn by a kill, would otherwise be duplicated or corrupt the file)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def save_final_model(engine, zero_stage: int, tokenizer, out_dir: Path, rank: int) -> None:
    """HF format (loadable by AutoModelForCausalLM and by the server), gathered under ZeRO-3. With
    LoRA: the merged model (what the server served), and the adapter alone in out_dir/adapter."""
    module = engine.module
    source = ModelSource(module, zero_stage, rank == 0, next(module.parameters()).dtype, torch.device("cpu"))
    state = dict(iter(source))
    lora = hasattr(module, "peft_config")
    adapter = adapter_state(module, zero_stage) if lora else None
    if rank == 0:
        (module.get_base_model() if lora else module).save_pretrained(out_dir, state_dict=state)
        tokenizer.save_pretrained(out_dir)
        if lora:
            module.save_pretrained(out_dir / "adapter", state_dict=adapter)
    dist.barrier()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, DataError, RewardError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (ServerError, WeightSyncError, StaleRolloutError) as e:  # the server failed: say so in one line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
