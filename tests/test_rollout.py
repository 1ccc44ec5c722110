"""Rollout collection against a scripted fake server: stale groups are dropped and regenerated
(train.max_staleness), synchronous mode refuses anything but the current weights, and the staleness
and version-span metrics."""

import time

import pytest
import torch.distributed as dist

from pipeline.generation.client import free_port
from pipeline.rollout.completion import Completion
from pipeline.task.data import Example
from pipeline.trainer.rollout import Busy, Rollouts, StaleRolloutError, score_slice, staleness_metrics


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield


class ScriptedServer:
    """Answers generate calls with the weight versions it is given, in order."""

    def __init__(self, versions: list[int | list[int]]):
        """Each answer's version, or one per prompt (their oldest is the answer's)."""
        self.versions, self.calls, self.prompts = list(versions), [], []

    def generate(self, prompt_ids, *, seed, n, **params):
        self.calls.append(seed)
        self.prompts.append(prompt_ids)
        version = self.versions.pop(0)
        per_prompt = version if isinstance(version, list) else [version] * len(prompt_ids)
        return {
            "version": min(per_prompt),
            "results": [
                {
                    "completions": [
                        {
                            "token_ids": [7, v],
                            "logprobs": [-0.5, -0.25],
                            "text": f"v{v}",
                            "finish_reason": "stop",
                            "version": v,
                        }
                        for _ in range(n)
                    ]
                }
                for v in per_prompt
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


def test_only_the_groups_past_the_bound_are_generated_again():
    """k = 2: the group whose oldest token is 3 versions old is dropped and its prompt generated again
    from the current weights; the others are kept, however old within the bound."""
    server = ScriptedServer([[3, 6, 4], 6])
    r = rollouts(server, max_staleness=2)
    r.request(6, [[1], [2], [3]], [example("a"), example("b"), example("c")])
    completions, generated_by = r.collect(6, version=6)
    assert [c.version for c in completions] == [6, 6, 6, 6, 4, 4] and generated_by == 4
    assert [c.answer for c in completions] == ["a", "a", "b", "b", "c", "c"]  # no prompt lost or moved
    assert server.prompts[1] == [[1]] and r.dropped_stale == 1 and r.discarded == 1
    r.close()


def completion(spans: list[tuple[int, int, int]]) -> Completion:
    return Completion(
        [1],
        [2] * spans[-1][2],
        [0.0] * spans[-1][2],
        "",
        False,
        example("a"),
        version=spans[0][0],
        versions=tuple(spans),
    )


def test_staleness_is_counted_from_each_groups_oldest_token():
    group_a = [completion([(3, 0, 4), (4, 4, 9)]), completion([(4, 0, 5)])]  # spans versions 3 and 4
    group_b = [completion([(5, 0, 2)]), completion([(5, 0, 2), (6, 2, 3), (7, 3, 8)])]  # 5, 6 and 7
    row = staleness_metrics(group_a + group_b, 2, version=7)
    assert row == {
        "rollout/staleness_mean": 3.0,
        "rollout/staleness_max": 4.0,
        "rollout/version_span_max": 2.0,
    }
    assert staleness_metrics([completion([(7, 0, 3)])] * 2, 2, version=7)["rollout/version_span_max"] == 0.0


def test_busy_counts_the_request_under_way():
    busy = Busy()
    with busy:
        time.sleep(0.05)
        assert busy.seconds() >= 0.05
    assert 0.05 <= busy.total == busy.seconds() < 1


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
