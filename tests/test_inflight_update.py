"""A weight push while a generation is under way (train.max_staleness >= 2): the engine pauses between
decode steps, loads the new weights, recomputes the running requests' KV and goes on. Each completion
says which version sampled which of its tokens, and each token's logprob is exactly that version's
(HF's, teacher-forced over the whole sequence)."""

import copy
import threading
import time

import pytest
import torch
from support.models import perturb
from support.reference import hf_logprobs
from transformers import AutoModelForCausalLM

from pipeline.rollout.completion import Completion
from pipeline.sync.weight_sync import WeightSync
from pipeline.task.example import Example


def under_way(server, answer: dict, generate) -> threading.Thread:
    """`generate` started in a thread, returned once the server runs it and it has decoded a while (a
    quarter of the time the same request took just before, at most 0.3 s: it runs for seconds)."""
    start = time.monotonic()
    generate()
    took = time.monotonic() - start
    answer.clear()
    thread = threading.Thread(target=generate)
    thread.start()
    end = time.monotonic() + 30
    while not server.client.health().get("running"):
        assert time.monotonic() < end, "the generation never started"
        time.sleep(0.01)
    time.sleep(min(took / 4, 0.3))
    return thread


def test_a_push_mid_generation_splits_completions_into_versions_each_exact(server, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sync = WeightSync(model, 0, 0, torch.device("cpu"), server.client, host="127.0.0.1", timeout_s=60)
    sync.connect()
    try:
        before = server.client.health()["version"] + 1
        perturb(model, seed=before)
        sync.push(before)  # the server serves `model` as `before`
        old = copy.deepcopy(model)
        perturb(model, seed=before + 1)
        prompt = list(range(5, 45))
        answer: dict = {}

        def generate():
            answer["out"] = server.client.generate(
                [prompt, prompt[::-1]], n=8, max_tokens=450, temperature=1.0, seed=3, ignore_eos=True
            )

        generate()  # the engine's first call warms it up
        thread = under_way(server, answer, generate)
        sync.push(before + 1)  # does not wait for the generation
        thread.join(120)
        assert not thread.is_alive()
    finally:
        sync.close()

    out = answer["out"]
    assert out["version"] == before  # the oldest token's
    spanning = 0
    for result in out["results"]:
        for c in result["completions"]:
            spans = c["versions"]
            assert spans[0][1] == 0 and spans[-1][2] == len(c["token_ids"]) == 450
            assert [v for v, _, _ in spans] in ([before], [before + 1], [before, before + 1])
            if len(spans) < 2:
                continue
            spanning += 1
            (_, _, cut), (_, start, _) = spans
            assert cut == start and 0 < cut < 450
            served = torch.tensor(c["logprobs"])
            ids = c["token_ids"]
            by_old = hf_logprobs(old, result["prompt_token_ids"], ids)
            by_new = hf_logprobs(model, result["prompt_token_ids"], ids)
            # each token as the weights that sampled it compute it from its whole prefix: the KV of the
            # tokens before the update was recomputed by the new weights, not kept
            assert (served[:cut] - by_old[:cut]).abs().max() <= 1e-3
            assert (served[cut:] - by_new[cut:]).abs().max() <= 1e-3
            assert (served[cut:] - by_old[cut:]).abs().max() > 1e-2, "the push did not change the weights"
            completion = Completion.of_answer(
                result["prompt_token_ids"], c, Example("q", "a", "a", "test"), out["version"]
            )
            assert (completion.version, completion.newest_version) == (before, before + 1)
    assert spanning >= 8, [c["versions"] for r in out["results"] for c in r["completions"]]


@pytest.mark.integration
def test_a_push_that_breaks_off_mid_generation_aborts_it_instead_of_sampling_torn_weights(
    tiny_model_dir, tmp_path
):
    """The trainer dies half-way through a push that paused a generation: the generation is not resumed
    on the torn weights but answers 503, and the server stays up for the repairing full push."""
    import subprocess
    import sys

    from support.servers import TRAINER_DIES_MID_PUSH, local_server

    from pipeline.generation.client import ServerError

    server = local_server(tiny_model_dir, tmp_path)
    try:
        version = server.client.health()["version"]
        answer: dict = {}

        def generate():
            try:
                # 64 sequences: seconds of decoding, so the dying push (another process) lands inside it
                prompts = [
                    list(range(5, 45)),
                    list(range(45, 5, -1)),
                    list(range(7, 47)),
                    list(range(47, 7, -1)),
                ]
                answer["out"] = server.client.generate(
                    prompts, n=16, max_tokens=450, temperature=1.0, seed=3, ignore_eos=True
                )
            except ServerError as e:
                answer["error"] = e

        generate()  # warm-up
        script = [sys.executable, "-c", TRAINER_DIES_MID_PUSH, server.client.base_url, server.token]
        proc = subprocess.Popen(
            [*script, str(tiny_model_dir), str(version + 1), "wait"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "ready"
        thread = under_way(server, answer, generate)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(120) == 17
        thread.join(120)
        assert "out" not in answer, "a generation went on after its push broke off"
        assert answer["error"].status == 503 and "torn" in str(answer["error"])
        assert server.proc.poll() is None and server.client.health()["torn"]

        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        sync = WeightSync(model, 0, 0, torch.device("cpu"), server.client, host="127.0.0.1", timeout_s=60)
        sync.connect()
        try:
            sync.push(version + 2)
        finally:
            sync.close()
        out = server.client.generate([[5, 6, 7]], n=2, max_tokens=8, seed=0)
        assert out["version"] == version + 2
    finally:
        server.stop()
