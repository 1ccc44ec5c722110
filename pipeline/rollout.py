"""Stage 1-2 of a step: generate the step's completions and score this rank's share of them.

Rank 0 makes one generate request for all of the step's prompts (one batch for vLLM, one weight
version to check) and broadcasts the result; every rank then owns a contiguous slice of the
step's `prompts x G` completions (its micro-batches) and scores only that slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from pipeline.rewards import score_completions


class StaleRolloutError(RuntimeError):
    """The server generated with weights other than the trainer's current ones."""


@dataclass
class Completion:
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # the server's (behaviour policy), per token
    text: str
    truncated: bool  # cut at max_completion_tokens rather than ended by EOS/stop
    answer: str  # the reference answer of its prompt


def generate_step(client, prompt_ids: list[list[int]], answers: list[str], *, n: int, max_tokens: int,
                  temperature: float, top_p: float, seed: int, expected_version: int) -> list[Completion]:
    """On rank 0: request n completions per prompt, refuse stale ones; broadcast to all ranks.

    Returns all prompts x n completions, prompt-major, on every rank.
    """
    payload = [None]
    if dist.get_rank() == 0:
        try:
            out = client.generate(prompt_ids, n=n, max_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, seed=seed)
            if out["version"] != expected_version:
                raise StaleRolloutError(f"server generated with weights version {out['version']}, "
                                        f"the trainer is at version {expected_version}")
            payload = [[
                Completion(ids, c["token_ids"], c["logprobs"], c["text"], c["finish_reason"] == "length", answer)
                for ids, answer, result in zip(prompt_ids, answers, out["results"], strict=True)
                for c in result["completions"]
            ]]
        except Exception as e:  # let every rank fail with the same message instead of hanging
            payload = [e]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], Exception):
        raise payload[0]
    return payload[0]


def score_slice(completions: list[Completion], weights: dict[str, float]):
    """Weighted total reward and each reward's values for this rank's completions."""
    return score_completions([c.text for c in completions], [c.answer for c in completions], weights)
