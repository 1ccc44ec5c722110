"""GRPO math on small hand-computed cases, and the loss against a straightforward re-computation."""

import math

import pytest
import torch

from pipeline.trainer.grpo import (
    SamplerCorrection,
    group_advantages,
    grpo_loss,
    make_batch,
    sampler_weights,
    step_token_normaliser,
)


def test_equal_rewards_give_zero_advantage():
    adv = group_advantages(torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.5]), 3)
    assert torch.equal(adv, torch.zeros(6))


def test_group_scaling_by_hand():
    adv = group_advantages(torch.tensor([0.0, 2.0, 1.0, 1.0]), 2, "group", eps=1e-12)
    s = math.sqrt(2.0)  # unbiased std of [0, 2]
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0])
    none = group_advantages(torch.tensor([0.0, 2.0, 1.0, 1.0]), 2, "none")
    assert none.tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    batch = group_advantages(torch.tensor([0.0, 2.0, 1.0, 1.0]), 2, "batch", eps=1e-12)
    assert batch.tolist() == pytest.approx(
        [-1 / torch.tensor([0.0, 2, 1, 1]).std().item(), 1 / torch.tensor([0.0, 2, 1, 1]).std().item(), 0, 0]
    )
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


def batch_of(old, adv, prompt_len=2, trained=None):
    """Sequences of prompt_len prompt tokens + len(old[i]) completion tokens."""
    prompts = [[5] * prompt_len for _ in old]
    completions = [[7] * len(o) for o in old]
    return make_batch(prompts, completions, old, adv, trained or [True] * len(old), pad_id=0, device="cpu")


def test_make_batch_masks_prompt_and_padding():
    b = batch_of([[-1.0, -2.0], [-3.0]], [1.0, -1.0], prompt_len=2)
    assert b.input_ids.tolist() == [[5, 5, 7, 7], [5, 5, 7, 0]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    # targets are tokens 1..3: positions predicting completion tokens are 1, 2 (row 0) and 1 (row 1)
    assert b.completion_mask.tolist() == [[0, 1, 1], [0, 1, 0]]
    assert b.old_logprobs.tolist() == [[0, -1, -2], [0, -3, 0]]
    masked = batch_of([[-1.0, -2.0]], [1.0], trained=[False])
    assert masked.completion_mask.sum() == 0


def test_ratio_one_gives_minus_advantage_and_no_clipping():
    b = batch_of([[-1.0, -2.0]], [0.5])
    loss, stats = grpo_loss(b.old_logprobs.clone(), b, epsilon=0.2)
    assert loss.item() == pytest.approx(-0.5)
    assert stats["clipped_tokens"] == 0 and stats["ratio_sum"] == pytest.approx(2.0)


def test_clipping_active_and_inactive():
    b = batch_of([[0.0]], [1.0])
    up = b.old_logprobs.clone()
    up[0, 1] = math.log(1.5)  # ratio 1.5 > 1.2 with A > 0: clipped at 1.2, no gradient
    logp = up.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, b, epsilon=0.2)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert logp.grad.abs().sum() == 0
    assert stats["clipped_tokens"] == 1
    # same ratio with A < 0: min picks the unclipped (more pessimistic) term, gradient flows
    b_neg = batch_of([[0.0]], [-1.0])
    logp = up.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, b_neg, epsilon=0.2)
    assert loss.item() == pytest.approx(1.5)
    loss.backward()
    assert logp.grad[0, 1].item() == pytest.approx(1.5)
    assert stats["clipped_tokens"] == 0


def test_masked_tokens_do_not_contribute():
    b = batch_of([[-1.0, -1.0], [-1.0]], [1.0, 1.0])
    logp = b.old_logprobs.clone()
    logp[1, 2] = 50.0  # a padding position: must not matter
    loss, _ = grpo_loss(logp, b)
    assert loss.item() == pytest.approx(-1.0)


def test_a_two_call_conversation_trains_only_the_models_tokens():
    """prompt [1 2 3]; the model writes [10 11], a tool answers [20 21 22], the model [12], a tool [23],
    the model [13 14]: the mask, by hand, covers exactly the model's five tokens."""
    prompt = [1, 2, 3]
    completion = [10, 11, 20, 21, 22, 12, 23, 13, 14]
    own = [1, 1, 0, 0, 0, 1, 0, 1, 1]
    old = [-1.0, -1.0, 0.0, 0.0, 0.0, -1.0, 0.0, -1.0, -1.0]  # a tool's tokens have no behaviour logprob
    b = make_batch([prompt], [completion], [old], [1.0], [True], pad_id=0, device="cpu", loss_masks=[own])
    # position t predicts token t+1: completion token j is predicted at len(prompt) - 1 + j = 2 + j
    assert b.completion_mask.tolist() == [[0, 0, 1, 1, 0, 0, 0, 1, 0, 1, 1]]
    logp = b.old_logprobs.clone()
    reference = logp.clone()
    for t in (4, 5, 6, 8):  # the tool's positions: whatever the model thinks of them does not matter
        logp[0, t] = -30.0
        reference[0, t] = 5.0
    for loss_type in ("grpo", "bnpo", "dr_grpo"):
        loss, stats = grpo_loss(
            logp, b, loss_type=loss_type, beta=0.1, ref_logprobs=reference, max_completion_tokens=9
        )
        plain, _ = grpo_loss(
            b.old_logprobs.clone(),
            b,
            loss_type=loss_type,
            beta=0.1,
            ref_logprobs=b.old_logprobs.clone(),
            max_completion_tokens=9,
        )
        assert loss.item() == pytest.approx(plain.item()), loss_type
        assert stats["tokens"] == 5 and stats["kl_sum"] == pytest.approx(0.0)
    assert b.completion_mask.sum() == 5
    untrained = make_batch(
        [prompt], [completion], [old], [1.0], [False], pad_id=0, device="cpu", loss_masks=[own]
    )
    assert untrained.completion_mask.sum() == 0  # a truncated completion stays out whole


def test_loss_matches_a_straightforward_computation():
    torch.manual_seed(0)
    old = [[-1.0, -0.5, -2.0], [-0.3], [-1.2, -0.7]]
    adv = [0.8, -1.1, 0.3]
    b = batch_of(old, adv, prompt_len=3)
    logp = b.old_logprobs + 0.3 * torch.randn_like(b.old_logprobs)
    ref = b.old_logprobs + 0.1 * torch.randn_like(b.old_logprobs)
    eps, beta = 0.2, 0.05
    seq_losses, all_tokens = [], []
    for i, o in enumerate(old):
        terms = []
        for j in range(len(o)):
            pos = 3 - 1 + j
            lp, lo, lr = logp[i, pos].item(), o[j], ref[i, pos].item()
            ratio = math.exp(lp - lo)
            surrogate = min(ratio * adv[i], max(min(ratio, 1 + eps), 1 - eps) * adv[i])
            kl = math.exp(lr - lp) - (lr - lp) - 1
            terms.append(-surrogate + beta * kl)
        seq_losses.append(sum(terms) / len(terms))
        all_tokens += terms
    loss, stats = grpo_loss(logp, b, epsilon=eps, beta=beta, ref_logprobs=ref, loss_type="grpo")
    assert loss.item() == pytest.approx(sum(seq_losses) / len(seq_losses), rel=1e-5)
    loss, _ = grpo_loss(logp, b, epsilon=eps, beta=beta, ref_logprobs=ref, loss_type="bnpo")
    assert loss.item() == pytest.approx(sum(all_tokens) / len(all_tokens), rel=1e-5)  # 6 tokens
    loss, _ = grpo_loss(
        logp, b, epsilon=eps, beta=beta, ref_logprobs=ref, loss_type="dapo", token_normaliser=4.0
    )
    assert loss.item() == pytest.approx(sum(all_tokens) / 4.0, rel=1e-5)  # the step's count, given
    loss, _ = grpo_loss(
        logp, b, epsilon=eps, beta=beta, ref_logprobs=ref, loss_type="dr_grpo", max_completion_tokens=10
    )
    assert loss.item() == pytest.approx(sum(all_tokens) / (3 * 10), rel=1e-5)  # 3 sequences x 10 tokens
    assert stats["tokens"] == 6 and stats["kl_sum"] > 0


def test_truncated_importance_weight_for_negative_advantages():
    b = batch_of([[0.0]], [-1.0])
    far = b.old_logprobs.clone()
    far[0, 1] = math.log(10.0)  # the policy moved far from the (stale) behaviour policy
    logp = far.clone().requires_grad_(True)
    loss, stats = grpo_loss(logp, b, epsilon=0.2, is_cap=3.0)
    assert loss.item() == pytest.approx(3.0)  # not 10: the weight is capped
    loss.backward()
    assert logp.grad.abs().sum() == 0 and stats["capped_tokens"] == 1
    near = b.old_logprobs.clone()
    near[0, 1] = math.log(2.0)  # below the cap: the ordinary PPO term
    loss, stats = grpo_loss(near, b, epsilon=0.2, is_cap=3.0)
    assert loss.item() == pytest.approx(2.0) and stats["capped_tokens"] == 0


def test_token_aggregation_is_a_step_global_mean_across_ranks_and_accumulation():
    """2 ranks x 2 micro-batches of different lengths, one completion truncated (masked): what
    DeepSpeed makes of the per-micro-batch losses (each / accumulation steps, then the mean over
    ranks) equals the plain mean over every trained token of the step, computed by hand."""
    torch.manual_seed(1)
    ranks, accumulation = 2, 2
    micro = [  # (old logprobs per completion, advantages, trained?) for rank r, micro-batch m
        [([[-1.0, -0.5], [-0.2, -0.9, -0.4]], [0.5, -0.3], [True, True]), ([[-0.7]], [1.2], [True])],
        [([[-0.1, -0.1, -0.1, -0.1]], [-0.8], [True]), ([[-2.0, -1.0], [-0.6]], [0.4, 0.9], [True, False])],
    ]
    batches = [
        [make_batch([[5, 6]] * len(o), [[7] * len(x) for x in o], o, a, k, 0, "cpu") for o, a, k in r]
        for r in micro
    ]
    logps = [[b.old_logprobs + 0.2 * torch.randn_like(b.old_logprobs) for b in r] for r in batches]
    step_tokens = sum(float(b.completion_mask.sum()) for r in batches for b in r)
    assert step_tokens == 2 + 3 + 1 + 4 + 2  # the truncated completion's token is not counted
    normaliser = step_token_normaliser(step_tokens, accumulation, ranks)
    deepspeed_view = (
        sum(
            grpo_loss(lp, b, loss_type="dapo", token_normaliser=normaliser)[0].item() / accumulation
            for r_b, r_lp in zip(batches, logps, strict=True)
            for b, lp in zip(r_b, r_lp, strict=True)
        )
        / ranks
    )
    by_hand = []
    for r_b, r_lp in zip(batches, logps, strict=True):
        for b, lp in zip(r_b, r_lp, strict=True):
            for i in range(b.advantages.numel()):
                for pos in b.completion_mask[i].nonzero().flatten().tolist():
                    ratio = math.exp(lp[i, pos].item() - b.old_logprobs[i, pos].item())
                    adv = b.advantages[i].item()
                    by_hand.append(-min(ratio * adv, max(min(ratio, 1.2), 0.8) * adv))
    assert len(by_hand) == step_tokens
    assert deepspeed_view == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)


def test_clip_higher_raises_only_the_upper_bound():
    """DAPO's clip-higher: with A > 0 a ratio of 1.25 is clipped at 1.2 by epsilon=0.2 but not with
    epsilon_high=0.28; the lower bound for A < 0 stays at 1 - epsilon."""
    b = batch_of([[0.0]], [1.0])
    up = b.old_logprobs.clone()
    up[0, 1] = math.log(1.25)
    assert grpo_loss(up, b, epsilon=0.2)[0].item() == pytest.approx(-1.2)
    loss, stats = grpo_loss(up, b, epsilon=0.2, epsilon_high=0.28)
    assert loss.item() == pytest.approx(-1.25) and stats["clipped_tokens"] == 0
    down = b.old_logprobs.clone()
    down[0, 1] = math.log(0.7)
    b_neg = batch_of([[0.0]], [-1.0])
    assert grpo_loss(down, b_neg, epsilon=0.2, epsilon_high=0.28)[1]["clipped_tokens"] == 1


def test_loss_types_need_their_inputs():
    b = batch_of([[-1.0]], [1.0])
    with pytest.raises(ValueError, match="dapo needs token_normaliser"):
        grpo_loss(b.old_logprobs, b, loss_type="dapo")
    with pytest.raises(ValueError, match="dr_grpo needs max_completion_tokens"):
        grpo_loss(b.old_logprobs, b, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="loss_type must be one of"):
        grpo_loss(b.old_logprobs, b, loss_type="token")


# --- edge cases found by the cross-check against TRL's _compute_loss ------------------------------


def test_a_behaviour_logprob_at_the_servers_floor_gives_a_finite_loss_and_gradient():
    """The server reports a token it gave probability 0 at -1e9 (JSON has no -inf). Without a clamp
    the ratio is inf and its gradient 0 x inf = NaN, which DeepSpeed would step with."""
    for advantage in (1.0, -1.0):
        b = batch_of([[-1.0, -1e9]], [advantage])
        logp = b.old_logprobs.clone()
        logp[0, 2] = -3.0  # the trainer's logprob of that token
        logp.requires_grad_(True)
        loss, stats = grpo_loss(logp, b, epsilon=0.2, loss_type="grpo")
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all(), (advantage, loss, logp.grad)
        # A > 0: clipped at 1 + eps (no gradient there); A < 0: the dual clip caps the token at is_cap
        expected = -(1.0 + 1.2) / 2 if advantage > 0 else (1.0 + 3.0) / 2
        assert loss.item() == pytest.approx(expected)
        assert stats["ratio_max"] == pytest.approx(math.exp(20.0), rel=1e-4)


def test_kl_is_masked_before_its_exp():
    """beta > 0: a large reference gap at a padding position must not make the loss NaN."""
    b = batch_of([[-1.0, -1.0], [-1.0]], [1.0, 1.0])
    logp = b.old_logprobs.clone().requires_grad_(True)
    ref = b.old_logprobs.clone()
    ref[1, 2] = 1000.0  # padding: exp(1000) = inf, and inf x 0 = NaN
    loss, stats = grpo_loss(logp, b, beta=0.1, ref_logprobs=ref)
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and stats["kl_sum"] == 0.0
    assert torch.isfinite(logp.grad).all()


def test_grpo_counts_a_masked_sequence_as_trl_does():
    """loss_type grpo with a truncated completion masked: each sequence's mean, averaged over every
    sequence of the micro-batch (the masked one counts 0), as TRL's `_compute_loss` does:
    ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()."""
    b = batch_of([[-1.0, -1.0], [-1.0]], [1.0, 0.5], trained=[True, False])
    loss, _ = grpo_loss(b.old_logprobs.clone(), b, loss_type="grpo")
    assert loss.item() == pytest.approx((-1.0 + 0.0) / 2)


# --- TRL's importance-sampling options (vllm_importance_sampling_*, importance_sampling_level) ----------


def test_sampler_weights_by_mode_by_hand():
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    trainer = torch.tensor([[0.0, math.log(0.5), math.log(0.9)]])
    sampler = torch.tensor([[-5.0, math.log(0.1), math.log(0.3)]])  # token ratios 5 and 3, sequence 15
    w = {
        m: sampler_weights(trainer, sampler, mask, SamplerCorrection(m, clip_min=0.5, clip_max=4.0))
        for m in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
    }
    assert w["token_truncate"][0, 1:].tolist() == pytest.approx([4.0, 3.0])
    assert w["token_mask"][0, 1:].tolist() == pytest.approx([0.0, 3.0])
    assert w["token_mask"][0, 0].item() == 1.0  # a prompt position: exp(0)
    assert w["sequence_truncate"].shape == (1, 1) and w["sequence_truncate"].item() == pytest.approx(4.0)
    assert w["sequence_mask"].item() == 0.0
    low = sampler_weights(sampler, trainer, mask, SamplerCorrection("token_mask", clip_min=0.5, clip_max=4.0))
    assert low[0, 1:].tolist() == [0.0, 0.0]  # ratios 1/5 and 1/3: below clip_min
    # the server's floor for a token it gave probability 0, and a NaN: finite weights, TRL's 1 for NaN
    odd = sampler_weights(
        torch.zeros(1, 2),
        torch.tensor([[-1e9, math.nan]]),
        torch.ones(1, 2),
        SamplerCorrection("token_truncate"),
    )
    assert odd.tolist() == [[3.0, 1.0]]


def test_gspo_takes_one_ratio_per_sequence():
    b = batch_of([[0.0, 0.0], [0.0]], [1.0, -1.0])
    logp = b.old_logprobs.clone()
    logp[0, 1], logp[0, 2], logp[1, 1] = 0.1, 0.3, -0.05  # sequence 0's mean log-ratio 0.2
    loss, stats = grpo_loss(logp, b, epsilon=0.5, loss_type="bnpo", importance_sampling_level="sequence")
    r0, r1 = math.exp(0.2), math.exp(-0.05)
    assert loss.item() == pytest.approx((-r0 * 2 + r1) / 3, rel=1e-6)
    assert stats["ratio_sum"] == pytest.approx(2 * r0 + r1, rel=1e-6)


def test_sampler_correction_weights_a_ratio_taken_against_the_trainer():
    """The PPO ratio is 1 in value (the old policy is the trainer's own, before the step); each token's
    loss is weighted by the truncated trainer / sampler ratio, and the gradient carries that weight."""
    b = batch_of([[math.log(0.1), math.log(0.5)]], [2.0])
    logp = torch.zeros_like(b.old_logprobs)
    logp[0, 2], logp[0, 3 - 1] = math.log(0.5), math.log(0.5)
    logp[0, 1] = math.log(0.6)  # token ratios vs the sampler: 6 and 1
    logp.requires_grad_(True)
    c = SamplerCorrection("token_truncate", clip_max=3.0)
    loss, stats = grpo_loss(logp, b, epsilon=0.2, loss_type="bnpo", sampler_correction=c)
    assert loss.item() == pytest.approx(-(2.0 * 3.0 + 2.0 * 1.0) / 2, rel=1e-6)
    assert stats["clipped_tokens"] == 0 and stats["sampler_weight_sum"] == pytest.approx(4.0)
    loss.backward()
    assert logp.grad[0, 1:].tolist() == pytest.approx([-3.0, -1.0], rel=1e-6)  # -A x weight / 2 tokens
    masked, stats = grpo_loss(
        logp, b, loss_type="bnpo", sampler_correction=SamplerCorrection("sequence_mask", clip_max=3.0)
    )
    assert masked.item() == 0.0 and stats["sampler_masked_tokens"] == 2  # sequence ratio 6 > 3


class _TRLTrainer:
    """Just what TRL's GRPOTrainer._compute_loss reads of `self`: its real code runs on our inputs."""

    def __init__(self, logprobs, **args):
        from types import SimpleNamespace

        self._logprobs = logprobs
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=args.pop("use_bias_correction_kl"))
        self.model = SimpleNamespace(training=True)
        self.accelerator = SimpleNamespace(gather=lambda x: x, reduce=lambda x, reduction: x, num_processes=1)
        self.current_gradient_accumulation_steps = 1  # DeepSpeed divides ours; TRL divides its own
        self.top_entropy_quantile, self.off_policy_mask_threshold = 1.0, None
        self.aux_loss_enabled = self._entropy_bonus_enabled = False
        self.use_vllm = True
        self._metrics = {"train": __import__("collections").defaultdict(list)}
        for name, value in args.items():
            setattr(self, name, value)

    def _get_per_token_logps_and_entropies(self, *_, **__):
        return self._logprobs, torch.zeros_like(self._logprobs), None


@pytest.mark.parametrize(
    "level,mode,loss_type,beta",
    [
        ("token", None, "grpo", 0.0),
        ("sequence", None, "grpo", 0.04),
        ("token", "token_truncate", "bnpo", 0.04),
        ("token", "token_mask", "grpo", 0.0),
        ("sequence", "sequence_truncate", "grpo", 0.0),
        ("token", "sequence_mask", "dr_grpo", 0.04),
    ],
)
def test_loss_and_gradient_equal_trls_compute_loss(level, mode, loss_type, beta):
    """TRL's own GRPOTrainer._compute_loss on the same tensors: the same loss and the same gradient.
    Without the sampler correction TRL's old policy is the sampler's (our default: ratio against mu)."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    torch.manual_seed(1)
    old = [[-1.0, -0.5, -2.0], [-0.3, -0.9], [-1.2, -0.7]]
    b = batch_of(old, [0.8, -1.1, 0.3], prompt_len=3)
    start = 3 - 1  # the completion's positions in the (B, T-1) tensors
    mask = b.completion_mask[:, start:]
    sampler = b.old_logprobs[:, start:]
    logp = (b.old_logprobs + 0.4 * torch.randn_like(b.old_logprobs)) * b.completion_mask
    ref = b.old_logprobs + 0.2 * torch.randn_like(b.old_logprobs)
    correction = SamplerCorrection(mode, clip_min=0.6, clip_max=1.5) if mode else None
    ours = logp.clone().requires_grad_(True)
    loss, _ = grpo_loss(
        ours, b, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, is_cap=1e9, beta=beta, ref_logprobs=ref,
        max_completion_tokens=4, importance_sampling_level=level, sampler_correction=correction,
        use_bias_correction_kl=True,
    )  # fmt: skip
    loss.backward()
    theirs = logp[:, start:].clone().requires_grad_(True)
    inputs = {
        "prompt_ids": b.input_ids[:, :3],
        "prompt_mask": b.attention_mask[:, :3],
        "completion_ids": b.input_ids[:, 3:],
        "completion_mask": mask,
        "advantages": b.advantages,
        "old_per_token_logps": theirs.detach() if mode else sampler,
        "ref_per_token_logps": ref[:, start:],
    }
    if mode:
        inputs["importance_sampling_ratio"] = sampler_weights(theirs.detach(), sampler, mask, correction)
    trl = _TRLTrainer(
        theirs, importance_sampling_level=level, beta=beta, loss_type=loss_type, epsilon_low=0.2,
        epsilon_high=0.28, vllm_importance_sampling_correction=mode is not None, max_completion_length=4,
        use_bias_correction_kl=True,
    )  # fmt: skip
    expected = GRPOTrainer._compute_loss(trl, None, inputs)
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(ours.grad[:, start:], theirs.grad, rtol=1e-5, atol=1e-7)


def test_importance_sampling_options_are_checked_by_field():
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.vllm_importance_sampling_cap: TRL's deprecated name"):
        load_config(None, ["train.vllm_importance_sampling_cap=2"])
    with pytest.raises(ConfigError, match="clip_min=3.0 and clip_max=2.0"):
        load_config(
            None, ["train.vllm_importance_sampling_clip_min=3", "train.vllm_importance_sampling_clip_max=2"]
        )
    with pytest.raises(ConfigError, match="token_truncate: needs clip_max"):
        load_config(
            None,
            [
                "train.vllm_importance_sampling_mode=token_truncate",
                "train.vllm_importance_sampling_clip_max=null",
            ],
        )
    with pytest.raises(ConfigError, match="importance_sampling_level"):
        load_config(None, ["train.importance_sampling_level=tokens"])
    ok = load_config(
        None,
        [
            "train.vllm_importance_sampling_mode=token_mask",
            "train.vllm_importance_sampling_clip_max=null",
            "train.vllm_importance_sampling_clip_min=0.5",
        ],
    )
    assert ok.train.vllm_importance_sampling_clip_max is None


def test_the_metrics_row_has_trls_sampling_columns_only_with_the_correction():
    from pipeline.trainer.metrics import metrics_row

    s = dict.fromkeys(("count", "tokens", "reward_total", "strict", "correct", "length", "truncated"), 4.0)
    s |= dict.fromkeys(("reasoning_steps", "reasoning_correct", "entropy_sum", "loss", "clipped_tokens"), 0.0)
    s |= {"ratio_sum": 4.0, "capped_tokens": 0.0}
    mx = {"length_max": 1.0, "grad_norm": 1.0, "ratio_max": 1.0}
    assert "sampling/importance_sampling_ratio/mean" not in metrics_row(1, s, mx, [], {})
    s |= {"sampler_weight_sum": 3.0, "sampler_masked_tokens": 1.0}
    row = metrics_row(1, s, mx | {"sampler_weight_max": 1.5}, [], {})
    assert row["sampling/importance_sampling_ratio/mean"] == 0.75
    assert row["sampling/importance_sampling_ratio/max"] == 1.5
    assert row["sampling/importance_sampling_masked_frac"] == 0.25


# --- DAPO's dynamic sampling ----------------------------------------------------------------------------


def _groups(*rewards):
    """Completions as (group name, reward) pairs, G = 2 per group."""
    return [(name, r) for name, pair in rewards for r in pair]


def test_dynamic_sampling_replaces_groups_without_signal_by_drawing_more():
    from pipeline.trainer.rollout import keep_informative_groups

    def totals(pool):
        return torch.tensor([r for _, r in pool], dtype=torch.float64).view(-1, 2)

    first = _groups(("a", (1, 0)), ("b", (1, 1)), ("c", (0, 0)), ("d", (0, 2)))
    draws = {1: _groups(("e", (2, 2)), ("f", (1, 3)), ("g", (0, 0)), ("h", (5, 5))),
             2: _groups(("i", (0, 1)), ("j", (1, 0)), ("k", (0, 0)), ("l", (1, 1)))}  # fmt: skip
    asked = []
    kept, stats = keep_informative_groups(first, 2, totals, lambda k: asked.append(k) or draws[k], 3)
    assert [name for name, _ in kept[::2]] == ["a", "d", "f", "i"]  # in order; j was one too many
    assert asked == [1, 2] and (stats.draws, stats.filtered, stats.short) == (2, 7, 0)
    ready, stats = keep_informative_groups(draws[2][:4] * 2, 2, totals, lambda k: 1 / 0, 3)
    assert len(ready) == 8 and stats.draws == 0  # every group has signal: nothing drawn


def test_dynamic_sampling_fills_a_step_from_what_it_filtered_when_the_draws_run_out():
    from pipeline.trainer.rollout import keep_informative_groups

    def totals(pool):
        return torch.tensor([r for _, r in pool], dtype=torch.float64).view(-1, 2)

    flat = _groups(("a", (1, 1)), ("b", (0, 1)), ("c", (0, 0)))
    kept, stats = keep_informative_groups(flat, 2, totals, lambda k: _groups(("x", (3, 3)), ("y", (2, 2)), ("z", (4, 4))), 1)  # fmt: skip
    assert [name for name, _ in kept[::2]] == ["b", "a", "c"]  # the step keeps its shape
    assert (stats.draws, stats.filtered, stats.short) == (1, 5, 2)


def test_dynamic_sampling_draws_are_seeded_and_leave_the_epoch_order_alone():
    from pipeline.task.example import Example
    from pipeline.trainer.build import StepData

    examples = [Example(f"q{i}", str(i), str(i), f"test:{i}") for i in range(50)]
    data = StepData(examples, 4, seed=7)
    before = [data.indices(s) for s in range(5)]
    a, b = data.extra(3, 1), StepData(examples, 4, seed=7).extra(3, 1)
    assert [e.question for e in a] == [e.question for e in b] and len(a) == 4
    assert [e.question for e in a] != [e.question for e in data.extra(3, 2)]
    assert [data.indices(s) for s in range(5)] == before
