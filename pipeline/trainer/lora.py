"""LoRA (model.lora_rank > 0): wrap the model in a PEFT adapter. What the server is sent (the adapter
alone, or the merged weights) is pipeline/sync/lora_export.py. Pure torch + PEFT."""

from __future__ import annotations

import logging

from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)


def with_lora(model, config: Config):
    """model.lora_rank > 0: a PEFT LoRA adapter; only its weights train (the optimizer gets only them)."""
    from peft import LoraConfig, get_peft_model

    m = config.model
    targets = "all-linear" if m.lora_target_modules == ["all-linear"] else m.lora_target_modules
    try:
        model = get_peft_model(
            model,
            LoraConfig(
                r=m.lora_rank,
                lora_alpha=m.lora_alpha,
                lora_dropout=m.lora_dropout,
                target_modules=targets,
                task_type="CAUSAL_LM",
            ),
        )
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError(f"model.lora_target_modules: {str(e).splitlines()[0]}") from None
    # The server gets the adapter or merged linear weights (pipeline/sync/lora_export.py): an adapter it
    # could not be given would train without ever reaching the rollouts.
    from peft.tuners.lora import LoraLayer

    unsupported = [
        name
        for name, layer in model.named_modules()
        if isinstance(layer, LoraLayer)
        and (layer.lora_embedding_A or getattr(layer, "fan_in_fan_out", False))
    ]
    if unsupported:
        raise ConfigError(
            f"model.lora_target_modules: only linear layers can take adapters here, not "
            f"{unsupported[0].split('.')[-1]} (an embedding or a GPT-2 Conv1D layer)"
        )
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input with grad
    trainable, total = model.get_nb_trainable_parameters()
    log.info(
        "LoRA rank %d: %d of %d parameters train (%.2f%%)",
        m.lora_rank,
        trainable,
        total,
        100 * trainable / total,
    )
    return model
