"""LoRA (model.lora_rank > 0): wrap the model in a PEFT adapter, and export the merged weights the
server serves. Pure torch + PEFT (no vLLM), so the GPU check can run it where vLLM is absent."""

from __future__ import annotations

import logging

import torch

from pipeline.config import Config, ConfigError

log = logging.getLogger(__name__)


def with_lora(model, config: Config):
    """model.lora_rank > 0: a PEFT LoRA adapter; only its weights train (the optimizer gets only them)."""
    from peft import LoraConfig, get_peft_model

    m = config.model
    targets = "all-linear" if m.lora_target_modules == ["all-linear"] else m.lora_target_modules
    try:
        model = get_peft_model(model, LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                                                 target_modules=targets, task_type="CAUSAL_LM"))
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError(f"model.lora_target_modules: {str(e).splitlines()[0]}") from None
    # The server gets merged linear weights (exported_weights): an adapter it could not be given
    # would train without ever reaching the rollouts.
    from peft.tuners.lora import LoraLayer

    unsupported = [name for name, layer in model.named_modules() if isinstance(layer, LoraLayer)
                   and (layer.lora_embedding_A or getattr(layer, "fan_in_fan_out", False))]
    if unsupported:
        raise ConfigError(f"model.lora_target_modules: only linear layers can take adapters here, not "
                          f"{unsupported[0].split('.')[-1]} (an embedding or a GPT-2 Conv1D layer)")
    if config.train.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks need an input with grad
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA rank %d: %d of %d parameters train (%.2f%%)", m.lora_rank, trainable, total, 100 * trainable / total)
    return model


def exported_weights(module: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter], float | None]]:
    """(HF name, parameters, LoRA scaling): the model's weights as the server knows them. A plain
    model exports each parameter as is. A PEFT LoRA model exports its base model's names, each
    adapted weight merged on the fly as W + B @ A x scaling (the parameters are [W, A, B]) and no
    adapter tensors: nothing is merged into the trained weights in place, so nothing drifts."""
    if not hasattr(module, "peft_config"):
        return [(name, [p], None) for name, p in module.named_parameters()]
    from peft.tuners.lora import LoraLayer

    base = module.get_base_model()
    adapted = {f"{name}.base_layer.weight": layer for name, layer in base.named_modules()
               if isinstance(layer, LoraLayer) and "default" in layer.lora_A}
    out = []
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        layer = adapted.get(name)
        params = [p] if layer is None else [p, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        out.append((name.replace(".base_layer.", "."), params, None if layer is None else layer.scaling["default"]))
    return out


def merged_weight(params: list[torch.Tensor], scaling: float | None) -> torch.Tensor:
    """One exported weight: the parameter itself, or for a LoRA layer W + B @ A x scaling in fp32."""
    if scaling is None:
        return params[0].detach()
    weight, a, b = (t.detach().float() for t in params)
    return weight + (b @ a) * scaling


def adapter_state(module, zero_stage: int) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole (gathered under ZeRO-3: a collective, every rank calls it), on CPU."""
    named = [(n, p) for n, p in module.named_parameters() if "lora_" in n]
    if zero_stage < 3:
        return {n: p.detach().cpu().clone() for n, p in named}
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {n: p.detach().cpu().clone() for n, p in named}
