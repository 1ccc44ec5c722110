"""What a trainer rank trains with, built from the config: the prompts of every step, the rewards, the
policy under DeepSpeed (optimizer, schedule, ZeRO stage), and the frozen reference when beta > 0.

`build(config, world)` is the one way to make them: `pipeline.trainer` trains with it, and
tests/harness/gpu_trainer.py checks it on a GPU without vLLM.
"""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError, TrainConfig, check_batch
from pipeline.device import accelerator, resolve_attn, resolve_dtype
from pipeline.rollout.multi_turn import ToolRollouts
from pipeline.task.data import Example, PromptStyle, drop_long_prompts, examples_for
from pipeline.task.reward_functions import Reward, load_rewards
from pipeline.trainer.lora import with_lora

log = logging.getLogger(__name__)


class StepData:
    """The prompts of step s: a seeded permutation per epoch, consumed in order (so resumable)."""

    def __init__(self, examples: list[Example], prompts_per_step: int, seed: int):
        self.examples, self.per_step, self.seed = examples, prompts_per_step, seed
        self.steps_per_epoch = len(examples) // prompts_per_step
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"train: {len(examples)} training prompts are fewer than the "
                f"{prompts_per_step} prompts one step needs"
            )
        self._order: dict[int, list[int]] = {}

    def indices(self, step: int) -> list[int]:
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch not in self._order:
            order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(order)
            self._order = {epoch: order}
        return self._order[epoch][index * self.per_step : (index + 1) * self.per_step]

    def __call__(self, step: int) -> list[Example]:
        return [self.examples[i] for i in self.indices(step)]

    def extra(self, step: int, draw: int) -> list[Example]:
        """Dynamic sampling's draw-th extra prompts for step `step`: a seeded sample, the same after a
        resume, that leaves the epoch's order alone."""
        rng = random.Random(f"{self.seed}:{step}:{draw}")
        return [self.examples[i] for i in rng.sample(range(len(self.examples)), self.per_step)]


def lr_schedule(optimizer: torch.optim.Optimizer, t: TrainConfig, total_steps: int):
    """train.lr_scheduler with linear warm-up; cosine ends at train.min_lr_ratio x the peak."""
    from transformers import get_scheduler

    name, floor = (
        ("cosine_with_min_lr", {"min_lr_rate": t.min_lr_ratio}) if t.min_lr_ratio else (t.lr_scheduler, None)
    )
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(t.warmup_ratio * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs=floor,
    )


def deepspeed_config(config: Config, dtype: torch.dtype) -> dict:
    """The JSON from train.deepspeed_config with what this config decides filled in."""
    path = Path(config.train.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"train.deepspeed_config: cannot load {path}: {e}") from None
    ds.update(
        {
            "train_micro_batch_size_per_gpu": config.train.micro_batch_size,
            "gradient_accumulation_steps": config.train.gradient_accumulation_steps,
            "gradient_clipping": config.train.max_grad_norm,
            "bf16": {"enabled": dtype == torch.bfloat16},
            "fp16": {"enabled": dtype == torch.float16},
            "zero_allow_untested_optimizer": True,  # torch AdamW: no DeepSpeed op build needed on CPU
            "steps_per_print": 10**9,
        }
    )
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from the three values above
    return ds


def load_tokenizer(config: Config):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(
        config.model.path, trust_remote_code=config.model.trust_remote_code
    )
    if tokenizer.pad_token_id is None:  # e.g. prem-1B-chat: padding only needs some id; the mask hides it
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class TrainingParts:
    """Everything one rank trains with."""

    config: Config
    tokenizer: object
    style: PromptStyle  # how a question becomes prompt tokens
    rewards: dict[str, Reward]
    step_data: StepData  # the prompts of each step
    total_steps: int
    dtype: torch.dtype
    engine: object  # the DeepSpeed engine of the policy
    zero_stage: int
    reference: object | None  # beta > 0 without LoRA: the frozen initial model (with LoRA: the adapter off)
    world: int
    tools: ToolRollouts | None = (
        None  # rollout.tools / rollout.environment: multi-turn rollouts with tool calls
    )


def build(config: Config, world: int) -> TrainingParts:
    """Data, rewards, model, optimizer, schedule and DeepSpeed engine for a rank of `world` ranks
    (torch.distributed is initialised)."""
    import deepspeed
    import transformers

    t, seed = config.train, config.run.seed
    random.seed(seed)
    torch.manual_seed(seed)

    # --- data and rewards ---------------------------------------------------------------------------
    tokenizer = load_tokenizer(config)
    style = PromptStyle.from_config(config.data)
    tools = ToolRollouts.from_config(config, tokenizer)  # loaded once: rollouts and evaluation share it
    if tools is not None:  # the prompts show the tools (templates that render `tools`)
        style = tools.prompt_style(style)
    examples = examples_for(config.data, "train", seed)
    examples, dropped = drop_long_prompts(examples, tokenizer, config.data.max_prompt_tokens, style)
    rewards = load_rewards(config.reward_functions)
    log.info(
        "%d training prompts (%d dropped as longer than %d tokens)",
        len(examples),
        dropped,
        config.data.max_prompt_tokens,
    )
    step_data = StepData(examples, check_batch(config, world), seed)
    total_steps = step_data.steps_per_epoch * t.epochs
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)

    # --- model, optimizer, schedule under DeepSpeed -----------------------------------------------------
    dtype = resolve_dtype(config.model.dtype)
    # Loaded in the training dtype (Flash Attention 2 needs bf16/fp16); DeepSpeed keeps fp32 master
    # weights in the optimizer when bf16 is on.
    attn = resolve_attn(config.model.attn_implementation, dtype)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        config.model.path,
        dtype=dtype,
        attn_implementation=attn,
        trust_remote_code=config.model.trust_remote_code,
    )
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if config.model.lora_rank:
        model = with_lora(model, config)
    # Fused on CUDA: one kernel per step, and no full-size sqrt(v) buffer beside the fp32 gradients at the
    # step (the foreach kernel's, launch/memory.py). CPU keeps foreach: its results are the tests' reference.
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
        **({"fused": True} if accelerator() == "cuda" else {}),
    )
    scheduler = lr_schedule(optimizer, t, total_steps)
    ds_config = deepspeed_config(config, dtype)
    zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    reference = None  # with LoRA the reference is the policy with its adapter switched off: no second copy
    if t.beta > 0 and not config.model.lora_rank:
        ref_model = (
            transformers.AutoModelForCausalLM.from_pretrained(  # the same kernel: KL compares like with like
                config.model.path,
                dtype=dtype,
                attn_implementation=attn,
                trust_remote_code=config.model.trust_remote_code,
            )
        )
        ref_config = {k: v for k, v in ds_config.items() if k not in ("zero_allow_untested_optimizer",)}
        if zero_stage != 3:
            ref_config["zero_optimization"] = {"stage": 0}
        reference, *_ = deepspeed.initialize(model=ref_model, config=ref_config)
        reference.eval()
    return TrainingParts(
        config,
        tokenizer,
        style,
        rewards,
        step_data,
        total_steps,
        dtype,
        engine,
        zero_stage,
        reference,
        world,
        tools,
    )
