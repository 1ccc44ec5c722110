"""Rollout collection against a scripted fake server: stale rollouts are discarded and regenerated
(overlapped mode), and synchronous mode refuses anything but the current weights."""

import pytest
import torch.distributed as dist

from pipeline.generation.client import free_port
from pipeline.task.data import Example
from pipeline.trainer.rollout import Rollouts, StaleRolloutError, score_slice


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield


class ScriptedServer:
    """Answers generate calls with the weight versions it is given, in order."""

    def __init__(self, versions: list[int]):
        self.versions, self.calls = list(versions), []

    def generate(self, prompt_ids, *, seed, n, **params):
        self.calls.append(seed)
        version = self.versions.pop(0)
        return {
            "version": version,
            "results": [
                {
                    "completions": [
                        {
                            "token_ids": [7, version],
                            "logprobs": [-0.5, -0.25],
                            "text": f"v{version}",
                            "finish_reason": "stop",
                        }
                        for _ in range(n)
                    ]
                }
                for _ in prompt_ids
            ],
        }


def example(answer: str) -> Example:
    return Example(question="q", answer=answer, solution=answer, source="test", columns={"level": 1})


def rollouts(server, max_staleness: int) -> Rollouts:
    return Rollouts(
        server, n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=3, max_staleness=max_staleness
    )


def test_overlapped_discards_too_stale_rollouts_and_regenerates():
    server = ScriptedServer([3, 5])  # first answer 2 versions old (allowed: 1), the retry is current
    r = rollouts(server, max_staleness=1)
    r.request(5, [[1, 2], [3]], [example("a"), example("b")])
    completions, generated_by = r.collect(5, version=5)
    assert generated_by == 5 and r.discarded == 1
    assert len(completions) == 4 and {c.text for c in completions} == {"v5"}
    assert [c.answer for c in completions] == ["a", "a", "b", "b"]
    assert server.calls == [r.step_seed(5)] * 2  # the regeneration uses the step's seed again
    r.close()


def test_overlapped_keeps_rollouts_within_the_staleness_bound():
    r = rollouts(ScriptedServer([4]), max_staleness=1)
    r.request(5, [[1]], [example("a")])
    _, generated_by = r.collect(5, version=5)
    assert generated_by == 4 and r.discarded == 0
    r.close()


def test_synchronous_mode_refuses_rollouts_from_other_weights():
    r = rollouts(ScriptedServer([4, 4]), max_staleness=0)
    r.request(5, [[1]], [example("a")])
    with pytest.raises(
        StaleRolloutError, match="server generated with weights version 4, the trainer is at version 5"
    ):
        r.collect(5, version=5)
    r.close()


def test_step_seeds_stay_in_the_servers_range():
    r = Rollouts(
        ScriptedServer([]), n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=2**32 - 1, max_staleness=0
    )
    seeds = {r.step_seed(step) for step in (0, 1, 10**12)}
    assert len(seeds) == 3 and all(0 <= s < 2**62 for s in seeds)
    r.close()


def test_reward_functions_get_prompts_answers_and_every_other_column():
    """TRL's convention: prompts, completions, answer, and each extra column as a list per completion."""
    from pipeline.task.reward_functions import BUILTIN_REWARDS, Reward

    seen = {}

    def spy(prompts, completions, answer, level, **kwargs):
        seen.update(prompts=prompts, answer=answer, level=level, rest=sorted(kwargs))
        return [float(v) for v in level]

    r = rollouts(ScriptedServer([5]), max_staleness=0)
    r.request(
        5,
        [[1], [2]],
        [
            Example("q1", "1", "1", "t:1", {"level": 2, "topic": "x"}),
            Example("q2", "2", "2", "t:2", {"level": 3}),
        ],
    )
    completions, _ = r.collect(5, version=5)
    r.close()
    rewards = {**BUILTIN_REWARDS, "spy": Reward("spy", spy, None, weight=0.5, source="tests:spy")}
    totals, per = score_slice(completions, {}, rewards, "SYS")
    assert per["spy"] == [2.0, 2.0, 3.0, 3.0] and seen["answer"] == ["1", "1", "2", "2"]
    assert seen["rest"] == ["topic"]  # present in one row only: None for the others
    assert seen["prompts"][0] == [{"role": "system", "content": "SYS"}, {"role": "user", "content": "q1"}]
    assert totals == pytest.approx(
        [
            0.5 * v + sum(per[n][i] for n in BUILTIN_REWARDS if BUILTIN_REWARDS[n].weight)
            for i, v in enumerate(per["spy"])
        ]
    )
