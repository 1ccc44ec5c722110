"""The suite's models: the test tokenizer's corpus, a LoRA-wrapped model, a perturbation."""

import torch


def tiny_corpus(rows: int = 2000) -> list[str]:
    """The test tokenizer's corpus: generated problems (as the embedded default's), so building the test
    models needs nothing from ../shared."""
    from pipeline.task.synthetic import generate
    from pipeline.task.xml_format import SYSTEM_PROMPT

    return [SYSTEM_PROMPT] + [e.question + "\n" + e.solution for e in generate(rows, seed=7)]


def lora_model(model_dir, rank=4, dtype=torch.float32):
    """PEFT LoRA on every linear layer of `model_dir`'s model, its A and B drawn at random (seed 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = get_peft_model(
        model, LoraConfig(r=rank, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    torch.manual_seed(0)
    with torch.no_grad():  # a trained adapter: B is zero at init, which would hide a wrong merge
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    return model


def perturb(model, seed):
    """Add N(0, 0.05) noise (seeded) to every parameter in place: weights a push must carry."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
