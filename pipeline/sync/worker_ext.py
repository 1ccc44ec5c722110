"""What the server asks of each vLLM worker beyond vLLM's own methods (`worker_extension_cls`).

Weight transfer itself is vLLM's (`init_weight_transfer_engine`, `start_weight_update`, ...); this
adds the digest read-out for a named sample, so a push can be verified every step without hashing
(and copying off the GPU) the whole model the way vLLM's `compute_weight_checksums` (sha256 on the
host) does, and the clean-up that lets a full push repair a model whose previous push broke off
half-way. The digests are `tensor_digest` (pipeline/sync/digest.py), computed on the worker's device;
nothing compares them with vLLM's own sha256 checksums.
"""

from __future__ import annotations

import torch

from pipeline.sync.digest import tensor_digest


def fused_name(name: str, packed: dict[str, list[str]]) -> str:
    """The vLLM parameter an HF weight is loaded into: `...q_proj.weight` -> `...qkv_proj.weight` where
    the model fuses q, k and v (its `packed_modules_mapping`)."""
    parts = name.split(".")
    for fused, members in packed.items():
        if len(parts) > 1 and parts[-2] in members:
            return ".".join([*parts[:-2], fused, parts[-1]])
    return name


def forget_torn_update(model: torch.nn.Module) -> int:
    """A receive that broke off half-way (a peer of the transfer group died) ends vLLM's update session
    without finalising its layer-wise reload: layers it had started stay mid-reload (on the meta
    device, their loaders wrapped), holding that push's tensors and counting them as loaded. The next
    session's `initialize_layerwise_reload` skips such layers, so the next push's tensors would top up
    the old ones (and the rest be dropped as "excessive loading"). Forget what they hold: the next full
    push then loads every layer from its own bytes alone. Returns how many layers were mid-reload."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    torn = 0
    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if info is not None and info.can_load():
            info.loaded_weights = []
            info.load_numel = 0
            torn += 1
    return torn


class WorkerExtension:
    """Mixed into every vLLM worker (`self` is the worker)."""

    def grpo_forget_torn_update(self) -> int:
        """Before the first update after one that broke off (see `forget_torn_update`)."""
        return forget_torn_update(self.model_runner.get_model())

    def grpo_weight_digests(self, names: list[str], received: list[str]) -> dict:
        """This worker's shard of the parameters that hold the named HF weights: vLLM name, shape, dtype
        and `tensor_digest` (on the worker's device); the model's fused projections (so the trainer can
        compute each rank's shard); and the digests our gloo engine took of the tensors it received
        (named in `received`)."""
        from vllm.distributed.parallel_state import get_tp_group

        model = self.model_runner.get_model()
        packed = {k: list(v) for k, v in (getattr(model, "packed_modules_mapping", None) or {}).items()}
        wanted = {fused_name(name, packed) for name in names}
        loaded = {}
        for name, tensor in model.named_parameters():
            name = name.replace(
                ".base_layer.", "."
            )  # vLLM's LoRA wrappers (enable_lora) hold the base weight
            if name in wanted:
                # vLLM-CPU swaps linear weights for empty Parameters and keeps the packed copy out of
                # sight: report those as unseen (None) rather than as the digest of nothing.
                loaded[name] = {
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype).removeprefix("torch."),
                    "digest": tensor_digest(tensor) if tensor.numel() else None,
                }
        engine = getattr(self, "weight_transfer_engine", None)
        got = getattr(engine, "received_digests", {}) or {}
        tp = get_tp_group()
        return {
            "rank": tp.rank_in_group,
            "tp_size": tp.world_size,
            "packed": packed,
            "loaded": loaded,
            "received": {name: got[name] for name in received if name in got},
        }
