"""Reference logprobs that served ones are compared with."""

import torch


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Teacher-forced per-token logprobs of `completion` after `prompt`, straight from HF: `model` is a
    model (on any device) or a model directory (loaded in fp32 on the CPU). On the CPU."""
    if not isinstance(model, torch.nn.Module):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = torch.tensor([prompt + completion], device=model.device)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logprobs.gather(-1, targets[:, None])[:, 0][len(prompt) - 1 :].cpu()


def peft_logprobs(model, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """The same through the trainer's own `token_logprobs` (what a PEFT-wrapped policy computes)."""
    from pipeline.trainer.grpo import token_logprobs

    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        return token_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1 :]
