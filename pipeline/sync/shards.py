"""What each tensor-parallel worker of vLLM holds of a model's weights, computed on the trainer from the
full HF tensors, so a push is verified on every shard by the worker's own digests (`tensor_digest`).

vLLM 0.32's layouts for the decoder-only models it loads (Llama, Qwen2, Mistral, ...), rank r of tp:
- fused column-parallel projections (the model's `packed_modules_mapping`): each member's rows split
  in tp equal parts, rank r's parts concatenated along dim 0 (`gate_up_proj` = [gate_r; up_r]);
  `qkv_proj` = [q_r; k_kr; v_kr]: the query heads split, and the KV heads split too, or replicated
  when there are fewer of them than ranks (rank r holds KV head r // (tp / kv_heads)):
  QKVParallelLinear / parameter.py `load_qkv_weight`;
- row-parallel projections (`o_proj`, `down_proj`): columns split, dim 1 (RowParallelLinear); their
  biases are whole on every rank;
- the vocabulary (`embed_tokens`, `lm_head`): padded to a multiple of 64 rows, then split; padding
  rows are zero (VocabParallelEmbedding `weight_loader`), at tp = 1 too;
- everything else (norms) whole on every rank.
Pure torch; tests/test_weight_sync.py checks it against vLLM's own weight loaders on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

VOCAB_PADDING = 64  # vllm/model_executor/layers/vocab_parallel_embedding.py DEFAULT_VOCAB_PADDING_SIZE
ROW_PARALLEL = ("o_proj", "down_proj")
VOCAB_PARALLEL = ("embed_tokens", "lm_head")
QKV = ["q_proj", "k_proj", "v_proj"]


@dataclass(frozen=True)
class Heads:
    """The attention layout a qkv shard depends on (from the HF model config)."""

    heads: int
    kv_heads: int

    @classmethod
    def of(cls, config) -> Heads:
        """0 heads where the config does not say (no qkv shard is computed then)."""
        heads = getattr(config, "num_attention_heads", None) or 0
        return cls(heads, getattr(config, "num_key_value_heads", None) or heads)


def _rows(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    size = t.shape[0] // tp
    return t[rank * size : (rank + 1) * size]


def qkv_shard(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: Heads, rank: int, tp: int
) -> torch.Tensor:
    head_dim = q.shape[0] // heads.heads
    q_rows = heads.heads // tp * head_dim
    if tp >= heads.kv_heads:  # fewer KV heads than ranks: each rank holds one, replicated
        kv_rows, kv_rank = head_dim, rank // (tp // heads.kv_heads)
    else:
        kv_rows, kv_rank = heads.kv_heads // tp * head_dim, rank
    kv = slice(kv_rank * kv_rows, (kv_rank + 1) * kv_rows)
    return torch.cat([q[rank * q_rows : (rank + 1) * q_rows], k[kv], v[kv]])


def vocab_shard(t: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    vocab = t.shape[0]
    per_rank = -(-vocab // VOCAB_PADDING) * VOCAB_PADDING // tp
    start, end = min(rank * per_rank, vocab), min((rank + 1) * per_rank, vocab)
    out = t.new_zeros((per_rank, *t.shape[1:]))
    out[: end - start] = t[start:end]
    return out


def worker_shards(
    tensors: dict[str, torch.Tensor], packed: dict[str, list[str]], heads: Heads, rank: int, tp: int
) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """{vLLM parameter name: (what rank `rank` of `tp` holds, the HF names it is made of)} for the given
    HF tensors. A fused parameter appears only when all its members are given."""
    member_of = {m: fused for fused, members in packed.items() for m in members}
    out: dict[str, tuple[torch.Tensor, list[str]]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        module = parts[-2] if len(parts) > 1 else ""
        if module in member_of:
            fused = member_of[module]
            fused_name = ".".join([*parts[:-2], fused, parts[-1]])
            members = [".".join([*parts[:-2], m, parts[-1]]) for m in packed[fused]]
            if fused_name in out or not all(m in tensors for m in members):
                continue
            if packed[fused] == QKV and not heads.heads:
                continue
            if packed[fused] == QKV:
                shard = qkv_shard(*(tensors[m] for m in members), heads, rank, tp)
            else:
                shard = torch.cat([_rows(tensors[m], rank, tp) for m in members])
            out[fused_name] = (shard, members)
        elif module in ROW_PARALLEL and t.dim() == 2:
            size = t.shape[1] // tp
            out[name] = (t[:, rank * size : (rank + 1) * size], [name])
        elif module in VOCAB_PARALLEL:
            out[name] = (vocab_shard(t, rank, tp), [name])
        else:
            out[name] = (t, [name])
    return out
