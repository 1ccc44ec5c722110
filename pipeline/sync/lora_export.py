"""The weights the server serves, as the trainer exports them: each parameter as it is, or with LoRA
(model.lora_rank > 0) the base weight merged with its adapter on the fly. Pure torch + PEFT (no vLLM),
so the GPU trainer check runs it where vLLM is absent."""

from __future__ import annotations

import torch


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
