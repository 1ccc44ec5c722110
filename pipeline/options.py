"""The names of every option that names an implementation, and the transport rule. Standard library only.

The config's choices are these names (pipeline/config.py); each module that implements an option checks
at import that it implements exactly them (`check_implements`), so adding one (a loss type, a data source,
a transport) is a name here and its implementation there.
"""

from __future__ import annotations

from collections.abc import Iterable

DTYPES = ("float32", "bfloat16", "float16")  # model.dtype, besides auto: pipeline/device.py
TRANSPORTS = ("nccl", "ipc", "gloo")  # sync.transport, besides auto: pipeline/generation/transport.py
SOURCES = ("synthetic", "jsonl", "csv", "parquet", "hub")  # data.source: pipeline/task/data.py
ANSWER_FORMATS = ("gsm8k", "plain", "boxed")  # data.answer_format: pipeline/task/answers.py
CHAT_TEMPLATES = ("auto", "true", "false")  # data.chat_template: pipeline/task/data.py
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")  # train.loss_type: pipeline/trainer/grpo.py
ADVANTAGE_SCALINGS = ("group", "batch", "none")  # train.advantage_scaling: pipeline/trainer/grpo.py
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")  # train.importance_sampling_level: trainer/grpo.py
# train.vllm_importance_sampling_mode: pipeline/trainer/grpo.py
VLLM_IMPORTANCE_SAMPLING_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
TRACKERS = ("tensorboard", "wandb", "trackio")  # train.report_to: pipeline/trainer/metrics.py
# the rewards a config may weight besides its reward_functions: pipeline/task/reward_functions.py
BUILTIN_REWARDS = (
    "strict_format",
    "soft_format",
    "int_answer",
    "xml_count",
    "correctness",
    "reasoning_steps",
)


def check_implements(module: str, option: str, implemented: Iterable[str]) -> None:
    """Called by `module` at import: RuntimeError unless it implements exactly the names of `option` here."""
    implemented, declared = sorted(implemented), sorted(globals()[option])
    if implemented != declared:
        raise RuntimeError(
            f"{module} implements {option} {implemented} but pipeline/options.py names {declared}"
        )


def resolve_transport(requested: str, cuda: bool, shared_gpu: bool = False) -> str:
    """sync.transport: `auto` is gloo on CPU, ipc when trainer and server share one GPU, else nccl."""
    if requested != "auto":
        return requested
    if not cuda:
        return "gloo"
    return "ipc" if shared_gpu else "nccl"
