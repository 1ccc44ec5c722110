"""The weight-transfer backends (`sync.transport`): what each is and the worker-side engine class the
server loads. The rule `auto` follows is pure Python in pipeline/options.py (re-exported here).

Every backend is a name in vLLM's weight-transfer factories: vLLM registers `nccl` and `ipc`, and
pipeline/sync/gloo_transfer.py registers `gloo`. A new backend is its name in pipeline/options.py, its
engine module, one line here, and its trainer-side init info in pipeline/sync/weight_sync.py
(`TRAINER_INIT_INFO`).
"""

from __future__ import annotations

import importlib

from pipeline import options
from pipeline.options import resolve_transport  # noqa: F401  (launch/plan.py imports it from here)


class Backend:
    def __init__(self, about: str, engine: str, vllm_name: str):
        self.about, self.engine = about, engine  # engine: "module:Class" of the worker-side engine
        self.vllm_name = vllm_name  # its name in vLLM's worker-side registry (WeightTransferConfig.backend)

    def engine_class(self):
        module, _, name = self.engine.partition(":")
        return getattr(importlib.import_module(module), name)


TRANSPORTS = {
    "nccl": Backend(
        "vLLM's NCCL engine with a receive deadline (pipeline/sync/nccl_deadline.py): GPU to GPU, "
        "trainer and server on different GPUs or hosts",
        "pipeline.sync.nccl_deadline:NCCLWithDeadline",
        "grpo_nccl",
    ),
    "ipc": Backend(
        "vLLM's CUDA IPC engine: trainer and server share one GPU (NCCL cannot hold one device twice)",
        "vllm.distributed.weight_transfer.ipc_engine:IPCWeightTransferEngine",
        "ipc",
    ),
    "gloo": Backend(
        "our gloo engine (pipeline/sync/gloo_transfer.py): CPU to CPU",
        "pipeline.sync.gloo_transfer:GlooWeightTransferEngine",
        "gloo",
    ),
}
options.check_implements(__name__, "TRANSPORTS", TRANSPORTS)
