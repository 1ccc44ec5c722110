"""GPU memory in the launch plan: one trainer rank's peak under DeepSpeed ZeRO, the least a vLLM engine
needs, and from those the split of a GPU they share. A card too small for both is a one-line error
before anything starts, not an out-of-memory error at step 1.

Pure Python (no torch, no model loaded): estimates from the model's config.json, written out with their
arithmetic in the dry run and --plan-json. The rank's peak is the largest of three moments of a step
(backward, the optimizer step, the weight push), each a sum of named parts; the constants below say
where each number comes from, and `tests/test_memory.py` holds them against the H200 measurements in
the README ("GPUs").
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from launch.plan import BatchSplit, Gpu, MemorySplit, Plan, PlanError, engine_gpus
from pipeline.config import SERVER_ALONE_GPU_SHARE, Config

GIB = 2**30
REPO = Path(__file__).resolve().parents[1]
CUDA_CONTEXT_GIB = 1.0  # per process, outside torch's allocator: the CUDA context, cuBLAS and NCCL workspaces
VLLM_RUNTIME_GIB = 2.0  # vLLM beyond weights and KV cache, inside its share: its CUDA context, the profiled
#                         activations of a max_num_batched_tokens forward, CUDA graphs, the sampler
MARGIN_GIB, MARGIN_FRACTION = 1.0, 0.10  # allocator fragmentation beside a rank's modelled peak: the larger
KV_CACHE_STEPS = 4  # a GPU shared with a rank: vLLM's KV cache holds this many steps' completions at full
#                     length (an overlapped step's next rollouts, evaluation batches, block rounding)
# Bytes kept for backward per token and layer, in 16-bit, by an HF Llama/Qwen2 decoder layer with sdpa:
# counted with torch's saved-tensor hooks on the real modules (tests/test_memory.py does it again): each
# RMSNorm keeps its input upcast to fp32, the normalised fp32 and the 16-bit output (20 x hidden for two);
# q, k, v before and after rotary embedding, the attention output and its projection's input (~6 x hidden
# + 4 x the KV width); the gated MLP's gate, up, SiLU and product (8 x intermediate). 45 B per hidden unit
# for the 1.06B H200 shape, 34 in Korthikanti et al. 2022 (4h MLP, no fp32 norms).
ACT_PER_HIDDEN, ACT_PER_INTERMEDIATE, ACT_PER_KV = 20, 8, 4
ACT_PER_HEAD = 4  # sdpa's fp32 log-sum-exp per head
LOGIT_BYTES = 16  # per token and vocabulary entry: 16-bit logits, the fp32 copy log-softmax keeps, and in
#                   backward its fp32 softmax and gradient and the 16-bit gradient into lm_head
# The optimizer step's transients per parameter of the rank's partition (DeepSpeed 0.19.8, torch AdamW):
# ZeRO-1/2 flatten the 16-bit gradients and cast the flat copy to fp32 while the gradient views are alive
# (stage_1_and_2.py `step`: the 16-bit partition + its flat copy + fp32 = 8 B); then AdamW, whose foreach
# kernel adds a full-size fp32 sqrt(v) (torch/optim/adam.py `_multi_tensor_adam`) beside the fp32
# gradient (8 B), the fused kernel nothing (4 B). ZeRO-3 keeps a flat 16-bit gradient buffer, casts one
# sub-group (sub_group_size) to fp32 and steps it (4 B + foreach's 4 B, per sub-group).
DIGEST_TEMPORARIES = (
    32 * 2**20
)  # pipeline/sync/digest.py on the device: its 16 MiB table and one block's products
FUSED_ADAMW_ON_CUDA = True  # pipeline/trainer/build.py: torch.optim.AdamW(fused=True) on CUDA
# Hub models the recipes name, for a plan made before the download: their config.json.
KNOWN_MODELS = {
    # TinyLlama's Llama-2 shape, which Prem-1B is built on (Prem AI's "Introducing Prem-1B"); the vocabulary is
    # TinyLlama's 32,000 plus the chat model's added tokens, taken as 4 here: not read from the hub, which this
    # machine cannot reach. A cached or local config.json always wins over this table.
    "premai-io/prem-1B-chat": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32004,
        "tie_word_embeddings": False,
    },
}
ZERO_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "overlap_comm": False,
    "sub_group_size": 1e9,
    "stage3_max_live_parameters": 1e9,
}  # DeepSpeed 0.19.8's, where a JSON leaves them out


@dataclass(frozen=True)
class Zero:
    """What the memory model reads of a DeepSpeed JSON's zero_optimization."""

    stage: int = 2
    reduce_bucket: int = 500_000_000  # elements
    overlap_comm: bool = False
    sub_group: int = 1_000_000_000
    max_live: int = 1_000_000_000

    @classmethod
    def of(cls, zero: dict) -> Zero:
        z = {**ZERO_DEFAULTS, **zero}
        return cls(
            int(z.get("stage", 0)),
            int(z["reduce_bucket_size"]),
            bool(z["overlap_comm"]),
            int(z["sub_group_size"]),
            int(z["stage3_max_live_parameters"]),
        )

    @classmethod
    def from_file(cls, path: str, cuda: bool = True) -> Zero:
        """train.deepspeed_config (auto: the ZeRO-2 JSON for the device, as launch/train.py resolves it)."""
        if path == "auto":
            path = str(REPO / "configs" / ("ds_zero2_gpu.json" if cuda else "ds_zero2.json"))
        return cls.of(json.loads(Path(path).read_text()).get("zero_optimization", {}))


def hub_cache_config(name: str) -> Path | None:
    """config.json of a hub model already in the Hugging Face cache (where `from_pretrained` looks)."""
    hub = (
        os.environ.get("HF_HUB_CACHE")
        or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
    )
    snapshots = sorted((Path(hub) / f"models--{name.replace('/', '--')}" / "snapshots").glob("*/config.json"))
    return snapshots[-1] if snapshots else None


def model_shape(config: Config) -> tuple[dict | None, str]:
    """The model's config.json keys and where they were read: the embedded default's settings, a local
    directory, the hub cache, or the table of recipe models; (None, why) when none has it."""
    path = config.model.path
    if config.model.build:
        from pipeline.embedded.default_model import tiny_shape

        return tiny_shape(config), "model.build=tiny (its model.build_* settings)"
    found = Path(path).expanduser() / "config.json"
    source = found if found.is_file() else hub_cache_config(path) if path.count("/") == 1 else None
    if source is not None:
        try:
            shape = json.loads(source.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PlanError(f"model.path: cannot read {source}: {e}") from None
        return shape.get("text_config", shape), str(source)
    if path in KNOWN_MODELS:
        return KNOWN_MODELS[path], f"{path}: its config.json, as recorded in launch/memory.py"
    return (
        None,
        f"model.path={path} is not a local directory, not in the Hugging Face cache and not in launch/memory.py",
    )


def kv_width(shape: dict) -> int:
    heads = shape["num_attention_heads"]
    return (shape.get("num_key_value_heads") or heads) * (
        shape.get("head_dim") or shape["hidden_size"] // heads
    )


def param_count(shape: dict) -> int:
    """Parameters of a Llama-style decoder (gated MLP, as Llama, Qwen2 and Mistral have) from its shape;
    Qwen2 has biases on q, k and v."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    heads = shape["num_attention_heads"]
    q = heads * (shape.get("head_dim") or h // heads)
    attention = 2 * h * q + 2 * h * kv_width(shape)
    if shape.get("model_type") == "qwen2" or shape.get("attention_bias"):
        attention += q + 2 * kv_width(shape)
    mlp = 3 * h * shape.get("intermediate_size", 4 * h)
    embeddings = vocab * h * (1 if shape.get("tie_word_embeddings", True) else 2)
    return layers * (attention + mlp + 2 * h) + embeddings + h


def checksum_sample_bytes(shape: dict, w: int, verify_mb: int) -> tuple[int, str]:
    """Bytes of the tensors a push verifies (pipeline/sync/weight_sync.py `checksum_sample`): the whole model
    up to sync.verify_mb, else the embeddings, the final norm and head and as many whole layers as the rest
    of the budget holds, at least one (prem-1B in bf16: 262 MB of ends + one 88 MB layer)."""
    total, ends = param_count(shape), param_count({**shape, "num_hidden_layers": 0})
    layers = shape["num_hidden_layers"]
    budget = verify_mb * 2**20
    if total * w <= budget or not layers:
        return total * w, f"the whole model (<= sync.verify_mb {verify_mb})"
    per_layer = (total - ends) // layers
    window = min(layers, max(1, (budget - ends * w) // (per_layer * w)))
    return (ends + window * per_layer) * w, f"embeddings, head and {window} of {layers} layers x {w} B"


def lora_param_count(shape: dict, rank: int) -> int:
    """LoRA A and B of every linear layer of the decoder (model.lora_target_modules all-linear): rank x
    (inputs + outputs) each; q and o are h -> h, k and v h -> KV width, gate and up h -> I, down I -> h."""
    h, i, kv = shape["hidden_size"], shape.get("intermediate_size", 4 * shape["hidden_size"]), kv_width(shape)
    return shape["num_hidden_layers"] * rank * (9 * h + 2 * kv + 3 * i)


def kv_bytes_per_token(shape: dict, weight_bytes: int) -> int:
    """K and V of every layer for one token."""
    return 2 * shape["num_hidden_layers"] * kv_width(shape) * weight_bytes


def activation_bytes_per_token(shape: dict, w: int, checkpointing: bool) -> tuple[float, str]:
    """Bytes one token keeps for backward over the whole decoder, and how: every layer's saved tensors,
    or with gradient checkpointing each layer's input and one layer recomputed."""
    h, layers = shape["hidden_size"], shape["num_hidden_layers"]
    per_layer = (
        ACT_PER_HIDDEN * h
        + ACT_PER_INTERMEDIATE * shape.get("intermediate_size", 4 * h)
        + ACT_PER_KV * kv_width(shape)
    ) * w / 2 + ACT_PER_HEAD * shape["num_attention_heads"]
    if checkpointing:
        return (
            layers * h * w + per_layer,
            f"({layers} layer inputs {h * w} B + one layer {per_layer / 1024:.0f} KiB), checkpointed",
        )
    return layers * per_layer, f"{layers} layers x {per_layer / 1024:.0f} KiB"


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


Part = tuple[str, float, str]  # (name, bytes, arithmetic)


def trainer_phases(
    config: Config, shape: dict, batch: BatchSplit, zero: Zero, cuda: bool = True
) -> dict[str, list[Part]]:
    """The parts one trainer rank holds at each moment of a step that can be its peak: backward (the
    states, the gradients, the activations and logits of one micro-batch), the optimizer step (the
    states and the step's transients, activations freed) and the weight push (the states and the
    transfer buffers). `batch`: the plan's batch split (micro_batch_size, ranks)."""
    t, ranks, stage = config.train, batch.ranks, zero.stage
    w = 4 if config.model.dtype == "float32" else 2
    n = param_count(shape)
    lora = config.model.lora_rank
    trainable = lora_param_count(shape, lora) if lora else n
    opt_split = ranks if stage >= 1 else 1  # fp32 master and Adam's moments
    grad_split = ranks if stage >= 2 else 1
    weight_split = ranks if stage == 3 else 1
    master = 4 if w == 2 else 0

    def per(params: int, size: float, split: int, what: str, why: str = "") -> Part:
        return (
            what,
            params * size / split,
            f"{params / 1e9:.3g}B x {size:g} B{why}" + (f" / {split} ranks" if split > 1 else ""),
        )

    states = [per(n, w, weight_split, "weights" + (" (frozen)" if lora else ""))]
    if master:
        states.append(per(trainable, master, opt_split, "fp32 master"))
    states.append(per(trainable, 8, opt_split, "Adam m, v"))
    if t.beta and not lora:  # with LoRA the reference is the policy, adapter off: no second copy
        states.append(per(n, w, weight_split, "reference model"))
    bucket = min(zero.reduce_bucket, trainable) * w * (2 if zero.overlap_comm and stage < 3 else 1)
    ds_bucket = (
        "DeepSpeed gradient bucket",
        bucket,
        f"reduce_bucket_size {zero.reduce_bucket / 1e6:.0f}M x {w} B"
        + (" x 2 (overlap_comm)" if zero.overlap_comm and stage < 3 else ""),
    )

    tokens = batch.micro_batch_size * (config.data.max_prompt_tokens + t.max_completion_tokens)
    per_token, how = activation_bytes_per_token(shape, w, t.gradient_checkpointing)
    backward = [
        *states,
        per(trainable, w, grad_split, "gradients"),
        ds_bucket,
        (
            "activations",
            tokens * per_token,
            f"{tokens} tokens ({batch.micro_batch_size} x {tokens // batch.micro_batch_size}) x {how}",
        ),
        (
            "logits",
            tokens * shape["vocab_size"] * LOGIT_BYTES,
            f"{tokens} tokens x {shape['vocab_size']} vocab x {LOGIT_BYTES} B",
        ),
    ]
    if stage == 3 and ranks > 1:
        live = min(zero.max_live, n)
        backward.append(
            ("ZeRO-3 gathered layers", live * w, f"stage3_max_live_parameters {live / 1e6:.0f}M x {w} B")
        )

    fused = cuda and FUSED_ADAMW_ON_CUDA
    adam_extra = 0 if fused else 4
    if stage == 3:
        group = min(trainable // ranks, zero.sub_group)
        step = [
            *states,
            per(trainable, w, ranks, "flat gradients"),
            ds_bucket,
            (
                "step transients",
                group * (4 + adam_extra),
                f"{group / 1e9:.3g}B (a sub-group) x (fp32 gradient 4"
                + (" + foreach sqrt(v) 4" if adam_extra else ", fused AdamW")
                + ") B",
            ),
        ]
    else:
        flatten = 2 * w + (4 if w == 2 else 0)
        transient = max(flatten, 4 + adam_extra)
        step = [
            *states,
            per(
                trainable,
                transient,
                grad_split,
                "step transients",
                f": max(gradients {w} + flat copy {w}"
                + (" + fp32 4" if w == 2 else "")
                + f", fp32 gradient 4 + {'fused AdamW 0' if fused else 'foreach sqrt(v) 4'})",
            ),
        ]

    bucket_bytes = config.sync.bucket_mb * 2**20
    sample, sample_why = checksum_sample_bytes(shape, w, config.sync.verify_mb)
    if stage < 3 and not lora:  # the kept sample is the weights themselves (ModelSource._out)
        sample, sample_why = 0, "the weights themselves (no copy without ZeRO-3 or LoRA)"
    push = [
        *states,
        ("weight-transfer buffers", 2 * bucket_bytes, f"2 x sync.bucket_mb {config.sync.bucket_mb}"),
        ("checksum sample", sample + DIGEST_TEMPORARIES, f"{sample_why} + 32 MiB digest table and products"),
    ]
    if stage == 3:
        push.append(("ZeRO-3 gathered chunk", 256 * 2**20, "256 MiB (ModelSource.chunk_bytes)"))
    return {"backward": backward, "optimizer step": step, "weight push": push}


def trainer_peak(
    config: Config, shape: dict, batch: BatchSplit, zero: Zero, cuda: bool = True
) -> tuple[str, list[Part]]:
    """The moment of a step at which the rank holds most, and its parts (the CUDA context added)."""
    phases = trainer_phases(config, shape, batch, zero, cuda)
    name = max(phases, key=lambda k: total(phases[k]))
    return name, [*phases[name], ("CUDA context", CUDA_CONTEXT_GIB * GIB, "outside torch's allocator")]


def margin(trainer_bytes: float) -> float:
    return max(MARGIN_GIB * GIB, MARGIN_FRACTION * trainer_bytes)


def server_need(config: Config, shape: dict, completions: int, shared: bool) -> list[Part]:
    """(part, bytes, arithmetic) of what each engine's GPU must give vLLM: its weights, the KV cache of one
    step's completions at full length (a whole step may go to one engine; on a GPU shared with a rank,
    KV_CACHE_STEPS of them, or server.kv_cache_gib), vLLM's runtime."""
    tp, length = config.server.tensor_parallel_size, config.server.max_model_len
    w = 4 if config.model.dtype == "float32" else 2
    n, kv = param_count(shape), kv_bytes_per_token(shape, w)
    over = f" / TP {tp}" if tp > 1 else ""
    steps = KV_CACHE_STEPS if shared else 1
    if config.server.kv_cache_gib:
        cache = (
            "KV cache",
            config.server.kv_cache_gib * GIB / tp,
            f"server.kv_cache_gib {config.server.kv_cache_gib:g}{over}",
        )
    else:
        cache = (
            "KV cache",
            steps * completions * length * kv / tp,
            (f"{steps} steps x " if steps > 1 else "") + f"{completions} completions x {length} tokens x "
            f"{kv / 1024:.0f} KiB{over}",
        )
    return [
        ("weights", n * w / tp, f"{n / 1e9:.2f}B x {w} B{over}"),
        cache,
        ("vLLM runtime", VLLM_RUNTIME_GIB * GIB, "context, activations, CUDA graphs"),
    ]


def total(parts) -> float:
    return sum(size for _, size, _ in parts)


def spell(parts) -> str:
    return " + ".join(f"{name} {gib(size)} ({how})" for name, size, how in parts)


def plan_memory(plan: Plan, gpus: list[Gpu], config: Config, zero: Zero | None = None) -> MemorySplit | None:
    """The memory split of this host's GPUs (the arithmetic as lines; the server's share and KV cache; the
    rank's modelled peak and what the split leaves it), or PlanError naming the GPU that cannot hold its
    part; None on CPU. `gpus`: the visible inventory; `zero`: train.deepspeed_config's settings."""
    local = plan.trainer.local_gpus
    if plan.trainer.device != "cuda" or not local:
        return None  # CPU, or ranks on a hostfile's nodes: nothing known here about their GPUs
    zero = zero or Zero.from_file(config.train.deepspeed_config)
    memory = {g.index: g.memory_gib for g in gpus}
    server_gpus = sorted(engine_gpus(plan))
    shared = bool(set(server_gpus) & set(local))
    requested = config.server.gpu_memory_utilization
    share, kv_cache, trainer_share = requested or SERVER_ALONE_GPU_SHARE, config.server.kv_cache_gib, None
    shape, source = model_shape(config)
    if shape is None or None in memory.values():
        why = source if shape is None else "GPU memory unknown"
        if shared and not requested:
            raise PlanError(
                f"server.gpu_memory_utilization: auto splits GPU {local[0]} by the model's size, but {why}; "
                f"download it first or set server.gpu_memory_utilization"
            )
        return MemorySplit(
            source, share, kv_cache, (f"not checked: {why}; server.gpu_memory_utilization={share}",)
        )
    moment, trainer = trainer_peak(config, shape, plan.batch, zero)
    slack = margin(total(trainer))
    phases = trainer_phases(config, shape, plan.batch, zero)
    lines = [
        f"model {param_count(shape) / 1e9:.2f}B parameters ({source}), "
        f"{'fp32' if config.model.dtype == 'float32' else '16-bit'} weights, ZeRO-{zero.stage}",
        f"trainer rank peak ~{gib(total(trainer))} GiB at the {moment} ("
        + ", ".join(f"{name} {gib(total(parts))}" for name, parts in phases.items())
        + f" + CUDA context) = {spell(trainer)}",
    ]
    server_min = None
    if server_gpus:
        need = server_need(config, shape, plan.batch.completions_per_step, shared)
        engines = len(plan.servers)
        lines.append(
            f"{'server' if engines == 1 else f'each of {engines} engines'} needs >= {gib(total(need))} GiB "
            f"per GPU = {spell(need)}"
        )
        server_min = round(total(need) / GIB, 2)
        if shared:
            share, kv_cache, trainer_share = split_shared_gpu(
                local[0], memory[local[0]], need, total(trainer), slack, requested, lines
            )
        else:
            share = own_gpus_share(server_gpus, memory, total(need), requested, lines)
    if not shared:
        trainer_share = trainer_gpus_hold(local, memory, total(trainer), slack, lines)
    return MemorySplit(
        model_source=source,
        gpu_memory_utilization=share,
        kv_cache_gib=kv_cache,
        lines=tuple(lines),
        params=param_count(shape),
        zero_stage=zero.stage,
        trainer_peak_at=moment,
        trainer_rank_gib=round(total(trainer) / GIB, 2),
        margin_gib=round(slack / GIB, 2),
        server_min_gib=server_min,
        trainer_share_gib=trainer_share,
    )


def trainer_gpus_hold(
    local: tuple[int, ...], memory: dict, trainer: float, slack: float, lines: list[str]
) -> float:
    """GPUs of their own for the ranks: the smallest must hold a rank's peak and the margin; its size."""
    smallest = min(memory[i] for i in local)
    if trainer + slack > smallest * GIB:
        raise PlanError(
            f"GPU {min(local, key=lambda i: memory[i])} has {smallest} GiB, but a trainer rank needs "
            f"~{gib(trainer)} GiB + {gib(slack)} margin (launch/memory.py); use more ranks "
            f"(ZeRO splits the optimizer state), model.lora_rank or train.gradient_checkpointing"
        )
    lines.append(f"GPUs {','.join(map(str, local))}: a trainer rank each, ~{gib(trainer)} of {smallest} GiB")
    return smallest


def split_shared_gpu(
    index: int,
    size_gib: float,
    need: list[Part],
    trainer: float,
    slack: float,
    requested: float,
    lines: list[str],
) -> tuple[float, float, float]:
    """One GPU for an engine and a rank: vLLM gets what a step needs (its share rounded up to 0.01, the KV
    cache fixed through vLLM's kv_cache_memory_bytes) and the rank everything else. The share also passes
    vLLM's start-up check (free memory >= share x total) when an engine is restarted beside a rank at
    its peak. A card too small for both is refused; a share set by hand is kept, with warnings.
    Returns the server's share, its KV cache (GiB) and what the rank gets (GiB)."""
    size = size_gib * GIB
    server = total(need)
    if server + trainer + slack > size:
        raise PlanError(
            f"GPU {index} has {size_gib} GiB, too small for the server and a trainer rank: ~{gib(trainer)} "
            f"GiB for full AdamW training + >= {gib(server)} for vLLM + {gib(slack)} margin = "
            f"{gib(server + trainer + slack)} GiB (launch/memory.py); use model.lora_rank, "
            f"train.gradient_checkpointing or a larger GPU"
        )
    auto = math.ceil(server / size * 100) / 100
    share = requested or auto
    kv = next(size for name, size, _ in need if name == "KV cache")
    lines.append(
        f"GPU {index} ({size_gib} GiB), server and a trainer rank: server.gpu_memory_utilization = "
        + (f"{requested} (set)" if requested else f"ceil({gib(server)} / {size_gib}, 0.01) = {share} (auto)")
        + f", KV cache {gib(kv)} GiB (kv_cache_memory_bytes); the rank gets the other "
        f"{gib((1 - share) * size)} GiB for ~{gib(trainer)} + {gib(slack)} margin"
    )
    if requested and requested * size < server:
        lines.append(
            f"warning: server.gpu_memory_utilization={requested} gives vLLM {gib(requested * size)} GiB of "
            f"GPU {index}; it needs >= {gib(server)} (0 = auto)"
        )
    if requested and (1 - requested) * size < trainer + slack:
        lines.append(
            f"warning: server.gpu_memory_utilization={requested} leaves {gib((1 - requested) * size)} GiB of "
            f"GPU {index} for a trainer rank that needs ~{gib(trainer)} + {gib(slack)} margin (0 = auto)"
        )
    return share, round(kv / GIB, 3), round((1 - share) * size_gib, 2)


def own_gpus_share(
    server_gpus: list[int], memory: dict, need: float, requested: float, lines: list[str]
) -> float:
    """The engines' own GPUs: vLLM's default share (its KV cache takes what weights leave); a card that
    cannot hold the least an engine needs is refused."""
    index = min(server_gpus, key=lambda i: memory[i])
    size = memory[index] * GIB
    share = requested or SERVER_ALONE_GPU_SHARE
    if need > share * size:
        raise PlanError(
            f"GPU {index} has {memory[index]} GiB; at server.gpu_memory_utilization={share} vLLM gets "
            f"{gib(share * size)} GiB but needs >= {gib(need)} (launch/memory.py); use a larger "
            f"server.tensor_parallel_size or a larger GPU"
        )
    lines.append(
        f"GPU {index} ({memory[index]} GiB), the server's own: server.gpu_memory_utilization = {share}"
        + (" (set)" if requested else " (auto: vLLM's default)")
    )
    return share
