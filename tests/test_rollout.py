"""Rollout collection against a scripted fake server: stale rollouts are discarded and regenerated
(overlapped mode), and synchronous mode refuses anything but the current weights."""

import pytest
import torch.distributed as dist

from pipeline.client import free_port
from pipeline.rollout import Rollouts, StaleRolloutError


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
        return {"version": version, "results": [
            {"completions": [{"token_ids": [7, version], "logprobs": [-0.5, -0.25], "text": f"v{version}",
                              "finish_reason": "stop"} for _ in range(n)]} for _ in prompt_ids]}


def rollouts(server, max_staleness: int) -> Rollouts:
    return Rollouts(server, n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=3, max_staleness=max_staleness)


def test_overlapped_discards_too_stale_rollouts_and_regenerates():
    server = ScriptedServer([3, 5])  # first answer 2 versions old (allowed: 1), the retry is current
    r = rollouts(server, max_staleness=1)
    r.request(5, [[1, 2], [3]], ["a", "b"])
    completions, generated_by = r.collect(5, version=5)
    assert generated_by == 5 and r.discarded == 1
    assert len(completions) == 4 and {c.text for c in completions} == {"v5"}
    assert [c.answer for c in completions] == ["a", "a", "b", "b"]
    assert server.calls == [r.step_seed(5)] * 2  # the regeneration uses the step's seed again
    r.close()


def test_overlapped_keeps_rollouts_within_the_staleness_bound():
    r = rollouts(ScriptedServer([4]), max_staleness=1)
    r.request(5, [[1]], ["a"])
    _, generated_by = r.collect(5, version=5)
    assert generated_by == 4 and r.discarded == 0
    r.close()


def test_synchronous_mode_refuses_rollouts_from_other_weights():
    r = rollouts(ScriptedServer([4, 4]), max_staleness=0)
    r.request(5, [[1]], ["a"])
    with pytest.raises(StaleRolloutError, match="server generated with weights version 4, the trainer is at version 5"):
        r.collect(5, version=5)
    r.close()


def test_step_seeds_stay_in_the_servers_range():
    r = Rollouts(ScriptedServer([]), n=2, max_tokens=4, temperature=1.0, top_p=1.0, seed=2**32 - 1, max_staleness=0)
    seeds = {r.step_seed(step) for step in (0, 1, 10**12)}
    assert len(seeds) == 3 and all(0 <= s < 2**62 for s in seeds)
    r.close()
