"""GPU memory in the launch plan: what one trainer rank needs for full AdamW training under DeepSpeed
ZeRO, what the vLLM server needs at least, and from those the share of a GPU the server may take
(`server.gpu_memory_utilization: 0` = auto). A card too small for both is a one-line error before
anything starts, not an out-of-memory error at step 1.

Pure Python (no torch, no model loaded): estimates from the model's shape, written out with their
arithmetic in the dry run and --plan-json. They are not measurements: no GPU has run them yet (README
"GPUs"); the constants below say where each number comes from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from launch.plan import PlanError
from pipeline.config import SERVER_ALONE_GPU_SHARE, Config

GIB = 2**30
CUDA_CONTEXT_GIB = 1.0  # per process: the CUDA context, cuBLAS and NCCL workspaces (0.5-1 GiB on recent cards)
VLLM_RUNTIME_GIB = 2.0  # vLLM beyond weights and KV cache, counted in its share: its CUDA context, the profiled
#                         activations of a max_num_batched_tokens forward, CUDA graphs, the sampler
MARGIN_GIB = 1.0  # allocator fragmentation and caching on the GPU, besides the weight-transfer bucket
# Bytes of activations kept for backward per token, layer and hidden unit in 16-bit without recomputation:
# Korthikanti et al. 2022 ("Reducing Activation Recomputation"), s*b*h*(34 + 5*a*s/h), whose attention-score
# term flash/sdpa attention does not store. With gradient checkpointing: the layer inputs (2) plus one
# layer recomputed (34).
ACTIVATION_BYTES = 34
CHECKPOINTED_BYTES = 2
LOGIT_COPIES = 3  # fp32 logits, their log-softmax and its gradient, per token and vocabulary entry
# Hub models the recipes name, for a plan made before the download: their config.json.
KNOWN_MODELS = {
    # TinyLlama's Llama-2 shape, which Prem-1B is built on (Prem AI's "Introducing Prem-1B"); the vocabulary is
    # TinyLlama's 32,000 plus the chat model's added tokens, taken as 4 here: not read from the hub, which this
    # machine cannot reach. A cached or local config.json always wins over this table.
    "premai-io/prem-1B-chat": {
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32004, "tie_word_embeddings": False},
}


def hub_cache_config(name: str) -> Path | None:
    """config.json of a hub model already in the Hugging Face cache (where `from_pretrained` looks)."""
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
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
    return None, f"model.path={path} is not a local directory, not in the Hugging Face cache and not in launch/memory.py"


def param_count(shape: dict) -> int:
    """Parameters of a Llama-style decoder (gated MLP, as Llama, Qwen2 and Mistral have) from its shape."""
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    heads = shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or h // heads
    attention = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim
    mlp = 3 * h * shape.get("intermediate_size", 4 * h)
    embeddings = vocab * h * (1 if shape.get("tie_word_embeddings", True) else 2)
    return layers * (attention + mlp + 2 * h) + embeddings + h


def kv_bytes_per_token(shape: dict, weight_bytes: int) -> int:
    """K and V of every layer for one token."""
    heads = shape["num_attention_heads"]
    head_dim = shape.get("head_dim") or shape["hidden_size"] // heads
    return 2 * shape["num_hidden_layers"] * (shape.get("num_key_value_heads") or heads) * head_dim * weight_bytes


def gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def model_states(params: int, w: int, ranks: int, stage: int, lora: bool) -> tuple[float, str]:
    """Weights, gradients, fp32 master copy and Adam's two moments, partitioned as the ZeRO stage says."""
    if lora:
        return params * w, f"{params / 1e9:.2f}B frozen weights x {w} B (LoRA adapters and their Adam state not counted)"
    master = 4 if w == 2 else 0  # DeepSpeed keeps an fp32 copy of 16-bit weights
    parts = [(f"weights {w}", w, 3), (f"grads {w}", w, 2), (f"fp32 master {master}", master, 1), ("Adam m, v 8", 8, 1)]
    whole = [name for name, size, level in parts if size and (stage < level or ranks == 1)]
    split = [name for name, size, level in parts if size and stage >= level and ranks > 1]
    per_param = sum(size / (ranks if stage >= level else 1) for _, size, level in parts)
    spelled = " + ".join(whole + ([f"({' + '.join(split)}) / {ranks} ranks"] if split else []))
    return params * per_param, f"{params / 1e9:.2f}B params x {per_param:.1f} B: {spelled}, ZeRO-{stage}"


def trainer_need(config: Config, shape: dict, params: int, w: int, batch: dict, stage: int,
                 bucket_elements: int) -> list[tuple[str, float, str]]:
    """(part, bytes, arithmetic) of one trainer rank's peak."""
    t = config.train
    tokens = batch["micro_batch_size"] * (config.data.max_prompt_tokens + t.max_completion_tokens)
    h, layers, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["vocab_size"]
    kept = (CHECKPOINTED_BYTES * layers + ACTIVATION_BYTES) if t.gradient_checkpointing else ACTIVATION_BYTES * layers
    states = model_states(params, w, batch["ranks"], stage, bool(config.model.lora_rank))
    parts = [("model states", *states),
             ("activations", tokens * h * kept * w / 2,
              f"{batch['micro_batch_size']} x {tokens // batch['micro_batch_size']} tokens x {h} hidden x "
              + (f"({CHECKPOINTED_BYTES} x {layers} layers + {ACTIVATION_BYTES}) B, checkpointed" if t.gradient_checkpointing
                 else f"{layers} layers x {ACTIVATION_BYTES} B")),
             ("logits", tokens * vocab * 4 * LOGIT_COPIES, f"{tokens} tokens x {vocab} vocab x 4 B x {LOGIT_COPIES}"),
             ("runtime", CUDA_CONTEXT_GIB * GIB + min(bucket_elements, params) * w,
              f"CUDA context {CUDA_CONTEXT_GIB:.0f} GiB + DeepSpeed buckets {min(bucket_elements, params) / 1e6:.0f}M x {w} B")]
    if t.beta and not config.model.lora_rank:  # with LoRA the reference is the policy, adapter off
        parts.insert(1, ("reference model", params * w, f"train.beta > 0: {params / 1e9:.2f}B x {w} B"))
    return parts


def server_need(config: Config, shape: dict, params: int, w: int, completions: int) -> list[tuple[str, float, str]]:
    """(part, bytes, arithmetic) of the least each server GPU must hold: its weights, the KV cache of one
    step's completions at full length (a whole step generated at once), vLLM's runtime."""
    tp, length = config.server.tensor_parallel_size, config.server.max_model_len
    kv = kv_bytes_per_token(shape, w)
    return [("weights", params * w / tp, f"{params / 1e9:.2f}B x {w} B" + (f" / TP {tp}" if tp > 1 else "")),
            ("KV cache", completions * length * kv / tp,
             f"{completions} completions x {length} tokens x {kv / 1024:.0f} KiB" + (f" / TP {tp}" if tp > 1 else "")),
            ("vLLM runtime", VLLM_RUNTIME_GIB * GIB, "context, activations, CUDA graphs")]


def total(parts) -> float:
    return sum(size for _, size, _ in parts)


def spell(parts) -> str:
    return " + ".join(f"{name} {gib(size)} ({how})" for name, size, how in parts)


def plan_memory(plan: dict, gpus: list[dict], config: Config, stage: int = 2, bucket_elements: int = 10**9) -> None:
    """Fill plan["memory"] (the arithmetic as lines, the server's share) for the GPUs of this host, or
    raise PlanError naming the GPU that cannot hold its part. `gpus`: the visible inventory."""
    local = plan["trainer"]["gpus"].get("localhost", [])
    if plan["trainer"]["device"] != "cuda" or not local:
        return  # CPU, or ranks on a hostfile's nodes: nothing known here about their GPUs
    memory = {g["index"]: g.get("memory_gib") for g in gpus}
    # every engine's GPUs: one server.gpu_memory_utilization for all of them, sized by the smallest
    server_gpus = sorted({gpu for server in plan["servers"] for gpu in server["gpus"]})
    engines = len(plan["servers"])
    shared = bool(set(server_gpus) & set(local))
    requested = config.server.gpu_memory_utilization
    shape, source = model_shape(config)
    margin = MARGIN_GIB * GIB + config.sync.bucket_mb * 2**20
    result = {"model_source": source, "gpu_memory_utilization": requested or SERVER_ALONE_GPU_SHARE, "lines": []}
    plan["memory"] = result
    if shape is None or None in memory.values():
        why = source if shape is None else "GPU memory unknown"
        if shared and not requested:
            raise PlanError(f"server.gpu_memory_utilization: auto splits GPU {local[0]} by the model's size, but {why}; "
                            f"download it first or set server.gpu_memory_utilization")
        result["lines"].append(f"not checked: {why}; server.gpu_memory_utilization={result['gpu_memory_utilization']}")
        return
    w = 4 if config.model.dtype == "float32" else 2  # auto: bf16 on GPU
    params = param_count(shape)
    trainer = trainer_need(config, shape, params, w, plan["batch"], stage, bucket_elements)
    lines = result["lines"]
    lines.append(f"model {params / 1e9:.2f}B parameters ({source}), {'fp32' if w == 4 else '16-bit'} weights")
    lines.append(f"trainer rank ~{gib(total(trainer))} GiB = {spell(trainer)}")
    result.update(params=params, trainer_rank_gib=round(total(trainer) / GIB, 2), margin_gib=round(margin / GIB, 2))
    if server_gpus:
        # each engine sized for a whole step: the trainer spreads a step over the engines by measured speed,
        # so one engine may be sent most of it
        need = server_need(config, shape, params, w, plan["batch"]["completions_per_step"])
        lines.append(f"{'server' if engines == 1 else f'each of {engines} engines'} needs >= {gib(total(need))} GiB "
                     f"per GPU = {spell(need)}")
        result["server_min_gib"] = round(total(need) / GIB, 2)
        result["gpu_memory_utilization"] = server_share(server_gpus, memory, total(need),
                                                        total(trainer) if shared else 0.0, margin, requested, lines)
    for index in ([] if shared else local):
        if total(trainer) + margin > memory[index] * GIB:
            raise PlanError(f"GPU {index} has {memory[index]} GiB, but a trainer rank needs ~{gib(total(trainer))} GiB "
                            f"+ {gib(margin)} margin (launch/memory.py); use more ranks (ZeRO splits the optimizer "
                            f"state), model.lora_rank or train.gradient_checkpointing")
    if not shared:
        lines.append(f"GPUs {','.join(map(str, local))}: a trainer rank each, ~{gib(total(trainer))} of "
                     f"{min(memory[i] for i in local)} GiB")


def server_share(server_gpus: list[int], memory: dict, need: float, trainer: float, margin: float, requested: float,
                 lines: list[str]) -> float:
    """server.gpu_memory_utilization: auto = what the trainer rank (on a shared GPU) and the margin leave,
    at most vLLM's default; a card that cannot hold the server's least and the rank is refused."""
    index = min(server_gpus, key=lambda i: memory[i])
    size = memory[index] * GIB
    who = "server and a trainer rank" if trainer else "server"
    if need + trainer + margin > size:
        needs = (f"~{gib(trainer)} GiB for full AdamW training + " if trainer else "") + f">= {gib(need)} for vLLM"
        raise PlanError(f"GPU {index} has {memory[index]} GiB, too small for the {who}: {needs} + {gib(margin)} margin "
                        f"= {gib(need + trainer + margin)} GiB (launch/memory.py); use "
                        + ("model.lora_rank, train.gradient_checkpointing or a larger GPU" if trainer
                           else "a larger server.tensor_parallel_size or a larger GPU"))
    fits = (size - trainer - margin) / size
    share = requested or min(SERVER_ALONE_GPU_SHARE, int(fits * 100) / 100)
    lines.append(f"GPU {index} ({memory[index]} GiB), {who}: server.gpu_memory_utilization = "
                 + (f"{requested} (set)" if requested else
                    f"min({SERVER_ALONE_GPU_SHARE}, ({memory[index]}" + (f" - {gib(trainer)} trainer" if trainer else "")
                    + f" - {gib(margin)} margin) / {memory[index]}) = {share} (auto)"))
    if requested and requested * size < need:
        lines.append(f"warning: server.gpu_memory_utilization={requested} gives vLLM {gib(requested * size)} GiB of "
                     f"GPU {index}; it needs >= {gib(need)} (0 = auto)")
    if requested and trainer and requested > fits:
        lines.append(f"warning: server.gpu_memory_utilization={requested} leaves {gib((1 - requested) * size)} GiB of "
                     f"GPU {index} for a trainer rank that needs ~{gib(trainer)} + {gib(margin)} margin (0 = auto)")
    return share
