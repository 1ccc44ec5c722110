"""The weights the server serves, as the trainer exports them: each parameter as it is; with LoRA
(model.lora_rank > 0) either the adapter alone (model.lora_sync adapter: `adapter_file`) or the base
weight merged with its adapter on the fly (merged). Pure torch + PEFT (no vLLM), so the GPU trainer
check runs it where vLLM is absent."""

from __future__ import annotations

import json

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
    adapted = {
        f"{name}.base_layer.weight": layer
        for name, layer in base.named_modules()
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A
    }
    out = []
    for name, p in base.named_parameters():
        if ".lora_" in name:
            continue
        layer = adapted.get(name)
        params = [p] if layer is None else [p, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
        out.append(
            (name.replace(".base_layer.", "."), params, None if layer is None else layer.scaling["default"])
        )
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


def adapter_file(module, state: dict[str, torch.Tensor], version: int) -> bytes:
    """The adapter as one safetensors file: the tensors under the names PEFT saves (what vLLM's loader
    reads), its PEFT config and the weight version in the file's metadata (POST /weights/adapter)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save

    tensors = get_peft_model_state_dict(module, state_dict=state)
    config = {
        k: sorted(v) if isinstance(v, set) else v for k, v in module.peft_config["default"].to_dict().items()
    }
    return save(
        {k: v.contiguous() for k, v in tensors.items()},
        metadata={"version": str(version), "adapter_config": json.dumps(config, default=str)},
    )
