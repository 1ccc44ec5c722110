"""GRPO math: group-normalised advantages, per-token logprobs, and the clipped policy loss.

Pure functions on tensors, so each is unit-tested on hand-computed cases. References:
- advantages: (r - mean_group) / std, with std from the group (GRPO, DeepSeekMath), the whole batch
  (`batch`: a group's spread no longer rescales it, as TRL's scale_rewards="batch") or none (`none`,
  Dr. GRPO: dividing by the group's std up-weights questions that are nearly always right or wrong).
- loss: PPO's clipped surrogate per token, `-min(ratio * A, clip(ratio, 1 - eps, 1 + eps_high) * A)`
  (eps_high > eps is DAPO's clip-higher), plus `beta * KL(pi || ref)` with the k3 estimator when
  beta > 0, aggregated as TRL's `loss_type` names it (what the token losses are divided by):
  `grpo` each sequence's mean, then the mean over sequences (DeepSeekMath); `bnpo` the micro-batch's
  trained tokens; `dapo` all trained tokens of the optimizer step, across ranks and accumulation
  (Yu et al. 2025); `dr_grpo` a constant, max completion length x sequences (Liu et al. 2025,
  "Understanding R1-Zero-like training"), so neither length nor batch composition rescales a token.
- `old_logprobs` are the server's (the behaviour policy mu that sampled the tokens), so the ratio
  pi_theta / mu also corrects for numerical mismatch between vLLM and the trainer and, in overlapped
  mode, for rollouts one step stale. Truncated importance sampling: for A < 0 the surrogate is
  additionally bounded by `is_cap * A` (dual-clip PPO, Ye et al. 2020), so no token's weight exceeds
  `is_cap` however far pi_theta has moved from mu (for A > 0 the PPO clip already bounds it at 1 + eps).
- TRL's alternative (`SamplerCorrection`, TRL's vllm_importance_sampling_*): the ratio is taken against
  the trainer's own logprobs before the step, and the mismatch with mu becomes a separate per-token or
  per-sequence weight, truncated or masked. `importance_sampling_level="sequence"` is GSPO (Zheng et al.
  2025): one ratio per completion, the exp of its mean token log-ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline import options

# train.advantage_scaling: the std centred rewards are divided by, from (rewards, grouped); None: not divided
ADVANTAGE_SCALINGS = {
    "group": lambda rewards, grouped: grouped.std(dim=1, keepdim=True),
    "batch": lambda rewards, grouped: rewards.std(),
    "none": None,
}
options.check_implements(__name__, "ADVANTAGE_SCALINGS", ADVANTAGE_SCALINGS)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scaling: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """rewards: flat (num_prompts * group_size,), prompt-major. Returns the same shape."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if scaling not in ADVANTAGE_SCALINGS:
        raise ValueError(f"advantage scaling must be one of {', '.join(ADVANTAGE_SCALINGS)}, got {scaling!r}")
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    std = ADVANTAGE_SCALINGS[scaling]
    if std is not None:
        centred = centred / (std(rewards, grouped) + eps)
    return centred.reshape(-1)


@dataclass
class Batch:
    """A padded micro-batch of prompt+completion sequences (right-padded)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    completion_mask: torch.Tensor  # (B, T-1): 1 where target token t+1 is a trained completion token
    old_logprobs: torch.Tensor  # (B, T-1), server logprobs aligned with completion_mask
    advantages: torch.Tensor  # (B,)


def make_batch(
    prompts: list[list[int]],
    completions: list[list[int]],
    old_logprobs: list[list[float]],
    advantages: list[float],
    trained: list[bool],
    pad_id: int,
    device,
    loss_masks: list[list[int] | None] | None = None,
) -> Batch:
    """Pack sequences; `trained[i]` False masks a whole completion (e.g. truncated ones); `loss_masks[i]`
    (one 0/1 per completion token, None = all 1) masks the tokens the model did not write (a tool's
    result and the template around it in a multi-turn rollout): they are in the sequence the model
    reads, but out of the loss, the KL and the length normalisers."""
    length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    n = len(prompts)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    mask = torch.zeros((n, length - 1))
    old = torch.zeros((n, length - 1))
    for i, (p, c, lp) in enumerate(zip(prompts, completions, old_logprobs, strict=True)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        # position t predicts token t+1: completion token j sits at len(p)+j, predicted at len(p)+j-1
        start = len(p) - 1
        if trained[i]:
            own = loss_masks[i] if loss_masks is not None and loss_masks[i] is not None else None
            mask[i, start : start + len(c)] = 1.0 if own is None else torch.tensor(own, dtype=mask.dtype)
        old[i, start : start + len(c)] = torch.tensor(lp)
    return Batch(
        input_ids.to(device),
        attention.to(device),
        mask.to(device),
        old.to(device),
        torch.tensor(advantages, dtype=torch.float32, device=device),
    )


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """log p(token t+1 | tokens <= t) for every position, shape (B, T-1), in fp32; with
    `with_entropy`, also the entropy of each position's distribution (B, T-1), without gradient."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
    logits = logits.float() / temperature
    targets = input_ids[:, 1:].unsqueeze(-1)
    # log_softmax via logsumexp keeps memory at one (B, T, V) fp32 tensor
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets).squeeze(-1) - lse
    if not with_entropy:
        return logprobs
    with torch.no_grad():  # H = logsumexp(z) - sum softmax(z) z; a diagnostic of collapse, not trained
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return logprobs, entropy


def step_token_normaliser(step_tokens: float, accumulation_steps: int, ranks: int) -> float:
    """loss_type dapo: what each micro-batch's summed token loss is divided by so that, after
    DeepSpeed divides every micro-batch loss by the accumulation steps and averages gradients over
    ranks, the step's gradient is that of the mean over all its trained tokens (`step_tokens`,
    summed over ranks): sum / (N / (A x R)) / A / R = sum / N."""
    return max(step_tokens, 1.0) / (accumulation_steps * ranks)


# --- loss types: what one micro-batch's token losses are divided by, as TRL's GRPOConfig names them ------


def _grpo(token_losses: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    """Each sequence's mean, then the mean over the micro-batch's sequences (DeepSeekMath). A sequence
    with no trained token (a truncated completion masked) counts as 0, as in TRL's `_compute_loss`."""
    per_sequence = token_losses.sum(1) / mask.sum(1).clamp(min=1)
    return per_sequence.sum() / mask.size(0)


def _bnpo(token_losses: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    """The micro-batch's trained tokens."""
    return token_losses.sum() / mask.sum().clamp(min=1)


def _dapo(
    token_losses: torch.Tensor, mask: torch.Tensor, *, token_normaliser: float | None, **_
) -> torch.Tensor:
    """All trained tokens of the optimizer step, across ranks and accumulation (`step_normaliser`)."""
    if token_normaliser is None:
        raise ValueError("loss_type dapo needs token_normaliser (step_normaliser)")
    return token_losses.sum() / token_normaliser


def _dr_grpo(
    token_losses: torch.Tensor, mask: torch.Tensor, *, max_completion_tokens: int | None, **_
) -> torch.Tensor:
    """A constant: max completion length x sequences (Dr. GRPO)."""
    if max_completion_tokens is None:
        raise ValueError("loss_type dr_grpo needs max_completion_tokens")
    return token_losses.sum() / (mask.size(0) * max_completion_tokens)


LOG_RATIO_BOUND = 20.0  # |log pi_theta - log mu| beyond this is clamped (see grpo_loss)


@dataclass(frozen=True)
class SamplerCorrection:
    """TRL's vllm_importance_sampling_correction: how trainer / sampler probability weights the loss."""

    mode: str = "sequence_mask"  # train.vllm_importance_sampling_mode
    clip_min: float | None = None
    clip_max: float | None = 3.0


def _truncate(ratio: torch.Tensor, c: SamplerCorrection) -> torch.Tensor:
    return torch.clamp(ratio, min=c.clip_min, max=c.clip_max)


def _mask(ratio: torch.Tensor, c: SamplerCorrection) -> torch.Tensor:
    low = -math.inf if c.clip_min is None else c.clip_min
    high = math.inf if c.clip_max is None else c.clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


# train.vllm_importance_sampling_mode: (per sequence, bound)
SAMPLER_CORRECTIONS = {
    "token_truncate": (False, _truncate),
    "token_mask": (False, _mask),
    "sequence_truncate": (True, _truncate),
    "sequence_mask": (True, _mask),
}
options.check_implements(__name__, "VLLM_IMPORTANCE_SAMPLING_MODES", SAMPLER_CORRECTIONS)


def sampler_weights(
    trainer_logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor, c: SamplerCorrection
) -> torch.Tensor:
    """TRL's importance_sampling_ratio: exp(trainer - sampler) per token (B, T-1) or, summed over the
    completion's tokens, per sequence (B, 1), then truncated or masked to [clip_min, clip_max]. The
    log-difference is clamped first: the server's floor (-1e9) must give a bounded weight, not inf."""
    per_sequence, bound = SAMPLER_CORRECTIONS[c.mode]
    diff = torch.nan_to_num((trainer_logprobs - sampler_logprobs) * mask, nan=0.0)
    if per_sequence:
        diff = diff.sum(dim=-1, keepdim=True)
    return bound(torch.exp(diff.clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)), c)


# train.loss_type: what each loss type divides the token losses by
LOSS_TYPES = {"grpo": _grpo, "bnpo": _bnpo, "dapo": _dapo, "dr_grpo": _dr_grpo}
options.check_implements(__name__, "LOSS_TYPES", LOSS_TYPES)


def step_normaliser(
    loss_type: str, trained_tokens: int, accumulation_steps: int, ranks: int, device
) -> float | None:
    """What the loss type needs to know about the whole optimizer step before its first micro-batch:
    for dapo the step's trained tokens on every rank (a collective: every rank calls it), else nothing."""
    if loss_type != "dapo":
        return None
    count = torch.tensor([float(trained_tokens)], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
    return step_token_normaliser(count.item(), accumulation_steps, ranks)


def grpo_loss(
    logprobs: torch.Tensor,
    batch: Batch,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    is_cap: float = 3.0,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    token_normaliser: float | None = None,
    max_completion_tokens: int | None = None,
    importance_sampling_level: str = "token",
    sampler_correction: SamplerCorrection | None = None,
    use_bias_correction_kl: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss of one micro-batch and its diagnostics.

    `token_normaliser` (dapo): what this micro-batch's summed token loss is divided by, from
    `step_token_normaliser` so the mean is over the whole step. `max_completion_tokens` (dr_grpo):
    the constant length each sequence counts as. The last three are TRL's GRPOConfig fields.
    """
    high = epsilon if epsilon_high is None else epsilon_high
    mask = batch.completion_mask
    old, weight = batch.old_logprobs, None
    if sampler_correction is not None:
        # TRL with one update per generation: the old policy is these weights (the step has not
        # happened yet), and the sampler's difference from them is a separate weight
        old = logprobs.detach()
        weight = sampler_weights(old, batch.old_logprobs, mask, sampler_correction)
    # Clamped before exp: a behaviour logprob at the server's floor (-1e9, a token it gave probability 0)
    # would make the ratio inf and its gradient 0 x inf = NaN. e^20 is far past every clip, so no
    # gradient that the clips let through changes.
    log_ratio = ((logprobs - old) * mask).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND)
    if importance_sampling_level == "sequence":  # GSPO: (B, 1), broadcast over the tokens
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    elif importance_sampling_level != "token":
        raise ValueError(
            f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}"
        )
    ratio = torch.exp(log_ratio)
    adv = batch.advantages.unsqueeze(1)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high) * adv
    per_token = -torch.min(unclipped, clipped)
    per_token = torch.where(adv < 0, torch.minimum(per_token, -is_cap * adv), per_token)  # dual clip
    if weight is not None:
        per_token = per_token * weight
    kl = None
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs ref_logprobs")
        delta = (ref_logprobs - logprobs) * mask  # masked first: padding's gap must not overflow exp
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        if use_bias_correction_kl:
            kl = kl * ratio
        per_token = per_token + beta * kl
    tokens = mask.sum()
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    loss = LOSS_TYPES[loss_type](
        per_token * mask, mask, token_normaliser=token_normaliser, max_completion_tokens=max_completion_tokens
    )
    with torch.no_grad():  # sums, so the caller can reduce them over micro-batches and ranks
        is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
        stats = {
            "tokens": float(tokens),
            "clipped_tokens": float((is_clipped.float() * mask).sum()),
            "ratio_sum": float((ratio * mask).sum()),
            "ratio_max": float(torch.where(mask > 0, ratio, torch.zeros_like(ratio)).max()),
            "capped_tokens": float(((ratio > is_cap) & (adv < 0)).float().mul(mask).sum()),
            "kl_sum": float((kl * mask).sum()) if kl is not None else 0.0,
        }
        if weight is not None:
            token_weight = weight.expand_as(mask)
            stats["sampler_weight_sum"] = float((token_weight * mask).sum())
            stats["sampler_masked_tokens"] = float(((token_weight == 0) & (mask > 0)).float().sum())
            stats["sampler_weight_max"] = float(torch.where(mask > 0, token_weight, 0).max())
    return loss, stats
