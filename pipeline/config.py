"""One config for the server and the trainer: YAML file + dotted `--set section.key=value` overrides.

Every field is documented where it is declared, with where its default comes from. Unknown keys
and wrong types are errors naming the key (`ConfigError: train.max_stepz: unknown key ...`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from pipeline import options

# The choices of every option that names an implementation: pipeline/options.py names them.
Dtype = Literal[("auto", *options.DTYPES)]
Transport = Literal[("auto", *options.TRANSPORTS)]
DataSource = Literal[options.SOURCES]
AnswerFormat = Literal[options.ANSWER_FORMATS]
ChatTemplate = Literal[options.CHAT_TEMPLATES]
LossType = Literal[options.LOSS_TYPES]
AdvantageScaling = Literal[options.ADVANTAGE_SCALINGS]
ImportanceSamplingLevel = Literal[options.IMPORTANCE_SAMPLING_LEVELS]
VllmImportanceSamplingMode = Literal[options.VLLM_IMPORTANCE_SAMPLING_MODES]
Tracker = Literal[options.TRACKERS]


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the dotted key."""


@dataclass
class ModelConfig:
    path: str = ""
    """HF model name or local directory (the seed recipe: premai-io/prem-1B-chat)."""
    build: str = ""
    """'' = use model.path as is; 'tiny' = the embedded default: build a small Qwen2 + tokenizer
    locally and warm-start it with TRL's SFT trainer (cached under <run.root>/.cache; no download)."""
    build_hidden_size: int = 128
    """model.build=tiny: hidden size (head size is fixed at 32, as vLLM-CPU needs >= 32)."""
    build_layers: int = 4
    """model.build=tiny: decoder layers."""
    build_split_digits: bool = True
    """model.build=tiny: every digit its own token (as Qwen2 and Llama 3 do), so the small model can
    copy numbers from the question and do arithmetic digit by digit."""
    build_sft_steps: int = 600
    """model.build=tiny: SFT warm-start steps (batch 32, about one epoch of fresh problems) on
    formatted solutions."""
    build_early_answers: float = 0.5
    """model.build=tiny: the share of warm-start solutions whose working is right but whose <answer> is
    one step early (README "What GRPO has to fix"); 0 = a clean warm start."""
    build_tool_demos: float = 0.0
    """model.build=tiny: the share of warm-start solutions that ask the built-in calculator for each step
    (tool turns, results out of the SFT loss); > 0 also makes the call tags tokens of their own. For
    rollout.tools: [calculator] (configs/tiny-cpu-tools.yaml)."""
    dtype: Dtype = "auto"
    """float32 | bfloat16 | float16 | auto (bfloat16 on GPU, float32 on CPU, as the recipe uses bf16)."""
    attn_implementation: str = "auto"
    """Trainer attention kernel: auto (flash_attention_2 on GPU with a 16-bit dtype when the optional
    flash-attn package is installed, else sdpa) or any HF name."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless asked for: it executes the model repo's Python."""
    lora_rank: int = 0
    """> 0: train a LoRA adapter of this rank (PEFT) instead of every weight; final/ is the merged model,
    final/adapter the adapter alone."""
    lora_sync: Literal["auto", "adapter", "merged"] = "auto"
    """With LoRA, what each step pushes into the engines. adapter: the adapter alone (megabytes), loaded
    by vLLM under a new name per version and applied unmerged; merged: every weight with W + B A x
    alpha/rank merged in (in bf16 most of a small update rounds away); auto: adapter where the engines
    can serve one (vLLM's LoRA support for the architecture; a 16-bit model on GPU), else merged."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scaling = alpha / rank; PEFT's default 8, 16 is the common choice)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch during training (PEFT's default 0)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters: names such as q_proj, or all-linear (every linear layer but the head)."""


SERVER_ALONE_GPU_SHARE = 0.9
"""server.gpu_memory_utilization for a server with its GPUs to itself: vLLM's own default."""


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    """Address the generation server binds. Anything but loopback requires `token`."""
    port: int = 8710
    """HTTP port of the generation server."""
    token: str = ""
    """Shared secret every request needs (`Authorization: Bearer <token>`), and which the server proves
    it holds before a client sends it. Prefer the GRPO_SERVER_TOKEN environment variable, which
    overrides this and is never written to disk. Neither set: a server on loopback makes a random one
    (launch/train.py and `make eval` give theirs one), off loopback it refuses to start. A saved
    config.yaml holds "" here."""
    tls_cert: str = ""
    """PEM certificate the server serves HTTPS with (with `tls_key`); clients then use https:// URLs.
    For engines on other hosts: the token travels encrypted (README "Security")."""
    tls_key: str = ""
    """PEM private key of `tls_cert`."""
    tls_ca: str = ""
    """PEM CA bundle clients verify an https:// server against (a self-signed `tls_cert` itself);
    empty: the system's CAs."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallelism (GPUs given to each generation engine)."""
    data_parallel_size: int = 1
    """Generation engines (TRL's and vLLM's name), each its own server process with
    `tensor_parallel_size` GPUs, engine i on port `port + i` (README "Several generation engines")."""
    max_model_len: int = 512
    """Longest prompt + completion the server accepts (recipe: 256 + 200 fits in 512)."""
    gpu_memory_utilization: float = 0.0
    """GPU: fraction of each of its GPUs vLLM may take (weights + KV cache + its runtime). 0 = auto: the
    launcher computes it from the model's size (launch/memory.py, arithmetic in the dry run): on a GPU
    shared with a trainer rank, what one step's generation needs (the rank gets the rest); on the
    server's own GPUs 0.9 (vLLM's default, also what a server started alone uses)."""
    kv_cache_gib: float = 0.0
    """KV-cache size in GiB. CPU: VLLM_CPU_KVCACHE_SPACE (0 = 1 GiB). GPU: vLLM's kv_cache_memory_bytes
    (0 = what gpu_memory_utilization leaves after the weights, as vLLM profiles it; the launcher sets it
    on a GPU shared with a trainer rank)."""
    max_n: int = 64
    """Largest `n` (completions per prompt) one request may ask for."""
    max_tokens: int = 4096
    """Largest `max_tokens` one request may ask for."""
    max_prompts: int = 1024
    """Most prompts in one request."""
    request_timeout_s: float = 600.0
    """Deadline of one generate/score call, on both sides: the trainer's client gives up after it, and
    the server's watchdog declares its engine stuck (the server exits; server.restart replaces it)."""
    max_request_mb: int = 64
    """Largest request body the server reads (413 above it)."""
    startup_timeout_s: float = 300.0
    """How long the launcher waits for the server's health check (and the trainer, after a restart)."""
    restart: bool = True
    """If an engine's server process dies, the launcher starts a new one (up to `max_restarts` per engine);
    the trainer waits for it (with one engine) or goes on with the others, pushes its current weights into
    it and retries the lost request (recorded as `server/restarts`). Off: with one engine the run fails;
    with several, a dead engine is left out and the run fails when none is left."""
    max_restarts: int = 3
    """server.restart: restarts per engine; an engine past them stays down (the run fails when none is left)."""
    enforce_eager: bool | None = None
    """Skip CUDA-graph capture. Unset: eager on CPU, CUDA graphs on GPU (they survive weight pushes:
    vLLM's layer-wise reload copies into the captured storage). true: faster start, slower decode."""
    seed: int = 0
    """Engine seed (requests carry their own seeds too)."""


@dataclass
class SyncConfig:
    transport: Transport = "auto"
    """The backend of vLLM's weight-transfer API: auto | nccl | ipc | gloo. auto: vLLM's `nccl`
    on GPU (the launcher picks vLLM's `ipc` when trainer and server share one GPU), our `gloo`
    engine on CPU."""
    bucket_mb: int = 256
    """Tensors are packed into buckets of this many MB (gloo buckets, vLLM's packed NCCL/IPC buffers)."""
    shared_memory: bool = True
    """gloo (CPU): when every engine runs on the trainer's host, the buckets travel through one
    shared-memory file (/dev/shm) that each engine reads, instead of gloo sending every engine the bytes;
    falls back to gloo by itself where the file cannot be made or seen. false: always gloo."""
    timeout_s: float = 60.0
    """A whole push, and every call in it (HTTP or collective), fails after this many seconds instead
    of hanging; a server worker stuck that long makes the server exit (server.restart restarts it)."""
    verify_mb: int = 64
    """Each push is checked by a digest (pipeline/sync/digest.py, computed on each side's device) of a
    sample of whole layers of about this many MB (all of a smaller model; at least the embeddings, the
    head and one layer), against the server's digests; a mismatch fails the step."""
    host: str = ""
    """Address the trainer's rank 0 binds the sync group's rendezvous store to (it listens there only)
    and the engines' workers dial; empty = 127.0.0.1 when every engine is on this host, else this host's
    address on its route to the first engine. Never one that resolves to loopback with an engine elsewhere."""
    port: int = 0
    """Port of the sync group's rendezvous; 0 = one the OS picks, bound before the workers are told it."""


@dataclass
class DataConfig:
    source: DataSource = "synthetic"
    """synthetic (GSM8K-style problems generated locally; no download) | jsonl, csv, parquet (local
    files: data.train_file / data.test_file) | hub (data.hub_name via `datasets`)."""
    train_file: str = ""
    """Training file (jsonl/csv/parquet), relative to the working directory."""
    test_file: str = ""
    """Evaluation file, same format."""
    hub_name: str = "openai/gsm8k"
    """Dataset name on the hub (data.source=hub)."""
    hub_config: str = "main"
    """Dataset config on the hub ('' for none)."""
    question_key: str = "question"
    """Column holding the question (GSM8K: question)."""
    answer_key: str = "answer"
    """Column holding the reference answer (GSM8K: answer). Every other column is passed to the
    reward functions as a keyword argument, one value per completion (as TRL does)."""
    answer_format: AnswerFormat = "gsm8k"
    """How the final answer is read from the answer column: gsm8k (the text after `####`), plain (the
    column is the final answer), boxed (the last `\\boxed{...}`, MATH-style). Correctness compares
    numbers exactly and anything else with math-verify (fractions, LaTeX, expressions)."""
    system_prompt: str = ""
    """The system prompt, or `@path/to/file` to read it from a file; empty = the XML-format prompt
    the recipe teaches (pipeline/task/xml_format.py SYSTEM_PROMPT)."""
    chat_template: ChatTemplate = "auto"
    """Build prompts with the tokenizer's chat template: auto (if it has one), true, or false (plain
    text: the system prompt, a blank line, the question; for base models)."""
    synthetic_train: int = 4000
    """Number of generated training problems (data.source=synthetic)."""
    synthetic_test: int = 200
    """Number of generated test problems (data.source=synthetic)."""
    synthetic_levels: int = 3
    """Generated problems take 1..N arithmetic steps, in equal shares (data.source=synthetic)."""
    synthetic_max_operand: int = 10
    """Generated problems' numbers are 2..N (multipliers 2..max(5, N // 10)); 99 gives products a
    small model's own arithmetic often gets wrong (configs/tiny-cpu-tools.yaml)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this (chat template included) are dropped before training (seed: 256)."""


@dataclass
class TrainConfig:
    num_generations: int = 16
    """Completions per prompt, G (seed: 16)."""
    micro_batch_size: int = 2
    """Completions per rank per forward/backward (seed: batch size 2 per device)."""
    gradient_accumulation_steps: int = 2
    """Micro-batches per optimizer step (seed: 2). Completions per step = micro_batch_size x
    gradient_accumulation_steps x ranks, and must be a multiple of num_generations (as in TRL)."""
    num_ranks: int = 0
    """Trainer ranks on this host; 0 = GPUs minus the server's tensor_parallel_size, or 2 on CPU (with
    completions_per_step set: the most of those that split it evenly; the plan says why GPUs stay idle)."""
    completions_per_step: int = 0
    """Completions per optimizer step the recipe means, kept on any number of ranks: the launcher keeps
    micro_batch_size (lowered only when a rank's share is smaller), derives gradient_accumulation_steps
    = completions_per_step / (micro_batch_size x ranks) and says so in the plan. A multiple of
    num_generations. 0 = micro_batch_size x gradient_accumulation_steps x ranks, as given."""
    learning_rate: float = 5e-6
    """Peak learning rate of AdamW (seed: 5e-6)."""
    lr_scheduler: str = "cosine"
    """Any `transformers.get_scheduler` name (seed: cosine)."""
    min_lr_ratio: float = 0.0
    """cosine only: decay to this fraction of learning_rate instead of to 0 (transformers'
    cosine_with_min_lr). Short runs use it so the last steps still learn (seed: 0)."""
    warmup_ratio: float = 0.1
    """Fraction of steps with linear warm-up (seed: 0.1)."""
    weight_decay: float = 0.0
    """AdamW weight decay (TRL's default)."""
    adam_beta1: float = 0.9
    """AdamW beta1 (HF TrainingArguments default)."""
    adam_beta2: float = 0.999
    """AdamW beta2 (HF TrainingArguments default)."""
    max_grad_norm: float = 0.1
    """Gradient clipping, written into the DeepSpeed config (seed: 0.1)."""
    epochs: int = 1
    """Passes over the training prompts (seed: 1)."""
    max_steps: int = 0
    """Stop after this many optimizer steps; 0 = as many as `epochs` gives."""
    max_completion_tokens: int = 200
    """Longest completion sampled (seed: 200)."""
    temperature: float = 1.0
    """Sampling temperature; the trainer's logprobs use the same one (TRL's default 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling for rollouts: must be 1.0. vLLM's logprobs under top-p are renormalised over the
    nucleus, and the loss divides the trainer's full-vocabulary probability by them, so every ratio
    would start below 1 (README "Overlapped mode" says more). Evaluation is not bound by this."""
    epsilon: float = 0.2
    """PPO clip range of the importance ratio pi_theta / pi_server (TRL's default)."""
    is_cap: float = 3.0
    """Truncated importance sampling: the ratio's weight never exceeds this for negative advantages
    (dual-clip PPO's c); matters for stale (overlapped) or numerically mismatched (bf16) rollouts."""
    max_staleness: int = 0
    """How many weight versions a step's rollouts may lag the weights they train (README "Asynchronous
    GRPO"). 0: synchronous, each step generates from its own weights (exact, reproducible). 1:
    overlapped, step k+1's rollouts are generated while step k trains, and the push waits for them
    (reproducible). k >= 2: up to k steps' rollouts are generated ahead, continuously, and each push
    lands mid-generation (the engines pause between decode steps): a completion can span versions.
    Groups whose oldest token is more than k versions old are dropped and generated again."""
    overlap: bool = False
    """The older name of max_staleness=1 (used when max_staleness is 0)."""
    beta: float = 0.0
    """KL penalty weight to the frozen initial model; 0 loads no reference model (TRL's default)."""
    loss_type: LossType = "grpo"
    """What the token losses are divided by, named as in TRL's GRPOConfig: grpo (each completion's
    mean, then the mean over completions; DeepSeekMath, TRL's original default), bnpo (the
    micro-batch's trained tokens), dapo (all trained tokens of the optimizer step, across ranks and
    accumulation; DAPO), dr_grpo (a constant: max_completion_tokens x completions; Dr. GRPO)."""
    epsilon_high: float = 0.0
    """Upper clip range: ratios clip at 1 + epsilon_high for positive advantages (DAPO's clip-higher,
    0.28 there); 0 = the same as epsilon (TRL's default)."""
    advantage_scaling: AdvantageScaling = "group"
    """Divide centred rewards by the group's std (group, DeepSeekMath), the batch's std (batch, TRL's
    scale_rewards="batch"), or not (none, Dr. GRPO). With `group`, a group whose completions differ by
    a 0.001 format penalty gets advantages of +-1 like one that differs in correctness; `batch`
    keeps such differences small (the CPU default uses it)."""
    mask_truncated_completions: bool = False
    """Give completions cut at max_completion_tokens no gradient (DAPO's overlong filtering)."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: a group whose completions all score the same has zero advantage and
    trains nothing; drop such groups and draw more prompts until the step has its groups with signal
    (rollout/filtered_groups, rollout/dynamic_draws, rollout/short_groups per step)."""
    dynamic_sampling_max_draws: int = 3
    """Extra rounds of prompts one step may draw; a step still short trains with groups without signal."""
    importance_sampling_level: ImportanceSamplingLevel = "token"
    """The PPO ratio per token (token) or one per completion, the exp of its tokens' mean log-ratio
    (sequence: GSPO). As TRL's GRPOConfig."""
    vllm_importance_sampling_correction: bool = False
    """TRL's correction of the sampler/trainer mismatch: the PPO ratio is taken against the trainer's own
    logprobs before the step, and each token's loss is weighted by trainer / sampler probability, bounded
    as vllm_importance_sampling_mode says. Off (the default here, on in TRL): the ratio is taken against
    the sampler's logprobs directly, which corrects the same mismatch inside the PPO clip and is_cap."""
    vllm_importance_sampling_mode: VllmImportanceSamplingMode = "sequence_mask"
    """token_truncate / sequence_truncate clip the token's / completion's ratio to [clip_min, clip_max];
    token_mask / sequence_mask give a weight of 0 outside it (TRL's modes and default)."""
    vllm_importance_sampling_clip_max: float | None = 3.0
    """The correction's upper bound C_max (TRL's default 3.0); null: none (mask modes, with a clip_min)."""
    vllm_importance_sampling_clip_min: float | None = None
    """The correction's lower bound C_min; null: none."""
    use_bias_correction_kl: bool = False
    """Multiply the KL term by the importance ratio (TRL's default True: the unbiased reverse-KL gradient,
    DeepSeek-V3.2); only matters with beta > 0."""
    deepspeed_config: str = "auto"
    """DeepSpeed JSON (ZeRO stage etc.); batch sizes, clipping and precision are filled in from here.
    auto: configs/ds_zero2.json on CPU, configs/ds_zero2_gpu.json (overlapped communication) on GPU;
    ZeRO-3: configs/ds_zero3.json / configs/ds_zero3_gpu.json."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0 = only the final model)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep."""
    log_every: int = 1
    """Write metrics every N steps (metrics.jsonl and the trackers)."""
    report_to: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    """Trackers besides metrics.jsonl. wandb and trackio are optional packages (the `track` extra);
    offline: WANDB_MODE=offline keeps wandb's run in <run>/wandb, trackio's store is <run>/trackio."""
    log_completions_every: int = 10
    """Every N steps, a table of sampled completions (prompt, completion, each reward, advantage) goes
    to completions.jsonl and the trackers; 0 = never."""
    log_completions: int = 8
    """Completions in that table (rank 0's first ones: whole groups when G is at most this)."""


@dataclass
class EvalConfig:
    enabled: bool = True
    """Evaluate on the test split before and after training (launcher), through the same server."""
    limit: int = 0
    """Evaluate only the first N test problems (0 = all)."""
    maj_k: int = 8
    """Samples per problem for maj@k accuracy (0 = greedy pass@1 only)."""
    temperature: float = 1.0
    """Sampling temperature for maj@k."""
    every: int = 0
    """Also evaluate during training, every N steps and after the last one, through the same server
    with the current weights (eval.limit problems): `eval/<key>` columns in metrics.jsonl at that
    step, plotted in eval_curves.png. 0 = only before and after."""


@dataclass
class RolloutConfig:
    tools: list[str] = field(default_factory=list)
    """Tools the model may call while it reasons (TRL's `tools`): "module:function" (type hints and a
    docstring with Args: transformers turns it into the schema the chat template shows), or
    "calculator", the built-in exact arithmetic. Empty = single-turn rollouts."""
    environment: str = ""
    """TRL's `environment_factory`: "module:Class", one object per rollout whose public methods are
    tools (state across the rollout's turns); `reset()` is called first if it has one."""
    max_tool_calling_iterations: int = 5
    """Tool calls per rollout (TRL's name); a rollout still calling after them ends there."""
    tool_timeout_s: float = 10.0
    """A user's tool call running longer is killed (its worker process) and answered with an error
    (counted in tools/failure_rate); a turn's call not started within it (workers busy) is not run."""
    tool_workers: int = 8
    """Worker processes running the user's tool functions (rank 0's; a turn's calls run this many at a time)."""
    tool_memory_mb: int = 4096
    """Memory a tool worker may allocate beyond its imports (address-space limit: MemoryError past it); 0 = none."""
    tool_log_mb: float = 16.0
    """What the user's tools print goes to <run dir>/tools.log, rotated to tools.log.1 at this size."""


@dataclass
class RunConfig:
    name: str = ""
    """Run name; the run directory is <root>/<name>. Empty = a timestamp."""
    root: str = "runs"
    """Where run directories go."""
    seed: int = 42
    """Seeds data order, sampling and initialisation."""
    project: str = "grpo-pipeline"
    """Project name in wandb / trackio."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: dict[str, float] = field(default_factory=dict)
    """Per-reward weights by name (the built-ins of pipeline/task/reward_functions.py and any reward_functions
    plugin). Default 1.0 (totals are the seed card's points), reasoning_steps 0.0; 0 turns a reward off
    (it is still computed and logged)."""
    reward_functions: dict[str, str] = field(default_factory=dict)
    """Your own rewards: `name: "module:function"`, the module importable from the working directory
    or PYTHONPATH. TRL's signature: fn(prompts, completions, answer, **columns) -> list[float | None]
    (None = not applicable, 0 points); logged as reward/<name>; an optional `max_points` attribute on
    the function goes into the model card."""


# --- loading -------------------------------------------------------------------------------------


def _check_type(value, hint, key: str):
    """Return `value` converted to `hint` where lossless (int -> float), else raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and str(value).lower() in choices:  # YAML reads `true` as a bool
            return str(value).lower()
        if value not in choices or isinstance(value, bool) != isinstance(choices[0], bool):
            raise ConfigError(f"{key}: expected one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, value_hint = typing.get_args(hint)
        return {str(k): _check_type(v, value_hint, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        (item_hint,) = typing.get_args(hint)
        return [_check_type(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {hint}, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported field type {hint}")


# Keys that once existed: a config that still sets one is told what replaced it.
RETIRED_KEYS = {
    "train.loss_aggregation": "replaced by train.loss_type (sequence -> grpo, token -> dapo)",
    "train.vllm_importance_sampling_cap": "TRL's deprecated name: use train.vllm_importance_sampling_clip_max",
}


def _merge(obj, values: dict, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if dotted in RETIRED_KEYS:
            raise ConfigError(f"{dotted}: {RETIRED_KEYS[dotted]}")
        if key not in names:
            raise ConfigError(f"{dotted}: unknown key (expected one of: {', '.join(sorted(names))})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a section (mapping), got {type(value).__name__}")
            _merge(current, value, dotted + ".")
        else:
            setattr(obj, key, _check_type(value, hints[key], dotted))


def parse_override(item: str) -> dict:
    """`train.max_steps=5` -> {"train": {"max_steps": 5}} (the value is parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    for part in reversed(key.strip().split(".")):
        value = {part: value}
    return value


def load_config(
    path: str | Path | None = None, overrides: list[str] = (), base: Config | None = None
) -> Config:
    """Defaults <- YAML file <- `--set` overrides, validated."""
    config = base or Config()
    if path:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        _merge(config, data)
    for item in overrides:
        _merge(config, parse_override(item))
    validate(config)
    return config


def validate(config: Config) -> None:
    """Cross-field checks that no single type can express."""
    if config.data.source in ("jsonl", "csv", "parquet") and not config.data.train_file:
        raise ConfigError(f"data.train_file: required when data.source is {config.data.source}")
    if config.data.question_key == config.data.answer_key:
        raise ConfigError(
            f"data.answer_key: the same column as data.question_key ({config.data.question_key!r})"
        )
    known = [*options.BUILTIN_REWARDS, *config.reward_functions]
    for name in config.rewards:
        if name not in known:
            raise ConfigError(
                f"rewards.{name}: unknown reward (expected one of: {', '.join(known)}; "
                "your own go in reward_functions)"
            )
    if not 0 <= config.model.build_tool_demos <= 1:
        raise ConfigError(
            f"model.build_tool_demos: expected a share in [0, 1], got {config.model.build_tool_demos}"
        )
    if not 0 <= config.model.build_early_answers <= 1:
        raise ConfigError(
            f"model.build_early_answers: expected a share in [0, 1], got {config.model.build_early_answers}"
        )
    if not 1 <= config.data.synthetic_levels <= 6:
        raise ConfigError(
            f"data.synthetic_levels: expected 1 to 6 arithmetic steps, got {config.data.synthetic_levels}"
        )
    if not 10 <= config.data.synthetic_max_operand <= 10**6:
        raise ConfigError(
            f"data.synthetic_max_operand: expected 10 to 1000000, got {config.data.synthetic_max_operand}"
        )
    if not 0 <= config.run.seed < 2**32:
        raise ConfigError(f"run.seed: expected an integer in [0, 2**32), got {config.run.seed}")
    if not 0 <= config.server.gpu_memory_utilization <= 1:
        raise ConfigError(
            f"server.gpu_memory_utilization: expected 0 (auto) or a share in (0, 1], got "
            f"{config.server.gpu_memory_utilization}"
        )
    if config.server.max_restarts < 0:
        raise ConfigError(f"server.max_restarts: must be >= 0, got {config.server.max_restarts}")
    if config.server.token == REDACTED_TOKEN:
        raise ConfigError(
            f"server.token: {REDACTED_TOKEN!r} is the placeholder an older saved config.yaml holds, not a "
            f'token; set GRPO_SERVER_TOKEN (or server.token to the real one, or to "")'
        )
    if bool(config.server.tls_cert) != bool(config.server.tls_key):
        raise ConfigError("server.tls_cert and server.tls_key: give both (HTTPS) or neither")
    for key in (
        "port",
        "tensor_parallel_size",
        "data_parallel_size",
        "max_model_len",
        "max_n",
        "max_tokens",
        "max_prompts",
        "max_request_mb",
    ):
        if getattr(config.server, key) < (0 if key == "port" else 1):
            raise ConfigError(f"server.{key}: must be positive, got {getattr(config.server, key)}")
    t = config.train
    for key in (
        "num_generations",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "epochs",
        "max_completion_tokens",
        "log_every",
    ):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}: must be at least 1, got {getattr(t, key)}")
    if t.completions_per_step < 0 or t.completions_per_step % t.num_generations:
        raise ConfigError(
            f"train.completions_per_step={t.completions_per_step}: must be 0 or a multiple of "
            f"train.num_generations={t.num_generations} (whole groups)"
        )
    if t.num_generations < 2:
        raise ConfigError("train.num_generations: GRPO needs at least 2 completions per prompt")
    if t.epsilon_high and t.epsilon_high < t.epsilon:
        raise ConfigError(
            f"train.epsilon_high: must be 0 (= epsilon) or >= train.epsilon={t.epsilon}, got {t.epsilon_high}"
        )
    if t.temperature <= 0:
        raise ConfigError(f"train.temperature: must be > 0, got {t.temperature}")
    if t.top_p != 1:
        raise ConfigError(
            f"train.top_p={t.top_p}: must be 1.0; vLLM's logprobs under nucleus sampling are "
            f"renormalised over the nucleus, the trainer's are over the whole vocabulary, so the "
            f"ratio pi_theta / mu would be biased"
        )
    r = config.rollout
    if r.max_tool_calling_iterations < 1:
        raise ConfigError(
            f"rollout.max_tool_calling_iterations: must be at least 1, got {r.max_tool_calling_iterations}"
        )
    if not 0 < r.tool_timeout_s <= 3600:
        raise ConfigError(f"rollout.tool_timeout_s: must be in (0, 3600], got {r.tool_timeout_s}")
    low, high = t.vllm_importance_sampling_clip_min, t.vllm_importance_sampling_clip_max
    if (low is not None and low < 0) or (high is not None and high <= 0) or (low or 0) >= (high or math.inf):
        raise ConfigError(
            f"train.vllm_importance_sampling_clip_min={low} and clip_max={high}: need 0 <= min < max"
        )
    if t.vllm_importance_sampling_mode.endswith("truncate") and high is None and low is None:
        raise ConfigError(
            f"train.vllm_importance_sampling_mode={t.vllm_importance_sampling_mode}: needs clip_max"
        )
    if t.dynamic_sampling_max_draws < 0:
        raise ConfigError(
            f"train.dynamic_sampling_max_draws: must be >= 0, got {t.dynamic_sampling_max_draws}"
        )
    if not 1 <= r.tool_workers <= 256:
        raise ConfigError(f"rollout.tool_workers: must be in [1, 256], got {r.tool_workers}")
    if r.tool_memory_mb < 0:
        raise ConfigError(f"rollout.tool_memory_mb: must be >= 0 (0 = no limit), got {r.tool_memory_mb}")
    if not r.tool_log_mb > 0:
        raise ConfigError(f"rollout.tool_log_mb: must be > 0, got {r.tool_log_mb}")
    if t.is_cap <= 1 or t.max_staleness < 0:
        raise ConfigError("train.is_cap must be > 1 and train.max_staleness >= 0")
    if t.overlap and t.max_staleness == 0:
        t.max_staleness = 1  # the alias: everything below reads max_staleness
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"train.warmup_ratio: expected a value in [0, 1), got {t.warmup_ratio}")
    if not 0 <= t.min_lr_ratio < 1 or (t.min_lr_ratio and t.lr_scheduler != "cosine"):
        raise ConfigError(
            f"train.min_lr_ratio: expected a value in [0, 1) with lr_scheduler cosine, got "
            f"{t.min_lr_ratio} with {t.lr_scheduler!r}"
        )
    if t.num_generations > config.server.max_n:
        raise ConfigError(
            f"train.num_generations={t.num_generations} exceeds server.max_n={config.server.max_n}"
        )
    longest = config.data.max_prompt_tokens + t.max_completion_tokens
    if longest > config.server.max_model_len:
        raise ConfigError(
            f"data.max_prompt_tokens + train.max_completion_tokens = {longest} exceeds "
            f"server.max_model_len={config.server.max_model_len}"
        )
    if config.model.lora_rank < 0 or (config.model.lora_rank and config.model.lora_alpha <= 0):
        raise ConfigError(
            f"model.lora_rank must be >= 0 and model.lora_alpha > 0, got {config.model.lora_rank} "
            f"and {config.model.lora_alpha}"
        )
    if not 0 <= config.model.lora_dropout < 1:
        raise ConfigError(f"model.lora_dropout: expected a value in [0, 1), got {config.model.lora_dropout}")
    if config.eval.every < 0 or t.log_completions_every < 0 or t.log_completions < 0:
        raise ConfigError("eval.every, train.log_completions_every and train.log_completions must be >= 0")
    if config.sync.bucket_mb < 1:
        raise ConfigError(f"sync.bucket_mb: must be at least 1, got {config.sync.bucket_mb}")
    if config.sync.verify_mb < 0 or config.sync.timeout_s <= 0:
        raise ConfigError("sync.verify_mb must be >= 0 and sync.timeout_s > 0")


def check_batch(config: Config, ranks: int) -> int:
    """Prompts per optimizer step for `ranks` trainer ranks, or ConfigError."""
    t = config.train
    completions = t.micro_batch_size * t.gradient_accumulation_steps * ranks
    if (
        t.completions_per_step and completions != t.completions_per_step
    ):  # a trainer started without the launcher
        raise ConfigError(
            f"train.completions_per_step={t.completions_per_step}, but train.micro_batch_size x "
            f"train.gradient_accumulation_steps x ranks = {t.micro_batch_size} x {t.gradient_accumulation_steps} "
            f"x {ranks} = {completions}; launch/train.py derives the accumulation for the ranks it starts"
        )
    if completions % t.num_generations:
        raise ConfigError(
            f"train.micro_batch_size x train.gradient_accumulation_steps x ranks = {t.micro_batch_size} x "
            f"{t.gradient_accumulation_steps} x {ranks} = {completions} completions per step, which is not a "
            f"multiple of train.num_generations={t.num_generations}"
        )
    return completions // t.num_generations


REDACTED_TOKEN = "<redacted>"  # what saved configs once held for a token: refused, never a token


def to_dict(config: Config, redact: bool = True) -> dict:
    """Plain dict for saving next to a run; the server token is never written (`token: ""`: reusing the
    file gives a server a token of its own, never a known one)."""
    data = dataclasses.asdict(config)
    if redact:
        data["server"]["token"] = ""
    return data
