"""Weight sync into a running server: after a push, the server's logprobs are the trainer's."""

import threading
import time

import pytest
import torch
from conftest import start_server
from transformers import AutoModelForCausalLM

from pipeline.data import prompt_token_ids, read_jsonl
from pipeline.weight_push import WeightPusher, WeightSyncError


def hf_logprobs(model, prompt, completion):
    """Teacher-forced per-token logprobs of `completion` after `prompt`, straight from HF."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    return logprobs.gather(-1, targets[:, None])[:, 0][len(prompt) - 1:]


def perturb(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def check_pushes_land(server, model_dir, prompt, version0):
    """Three pushes in a row; each time the server's logprobs == HF logprobs of the pushed weights.

    The first push makes the (shared) server serve `model_dir`, whatever it served before."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    pusher = WeightPusher(server.client, transport="gloo", timeout_s=60, bucket_mb=1)
    try:
        pusher.push(model.named_parameters(), version=version0 + 1)
        completion = server.client.generate([prompt], n=1, max_tokens=24, seed=0)["results"][0]["completions"][0]
        completion = completion["token_ids"]
        before = torch.tensor(server.client.score([(prompt, completion)])["logprobs"][0])
        assert (before - hf_logprobs(model, prompt, completion)).abs().max() <= 1e-3
        for version in (version0 + 2, version0 + 3):
            perturb(model, seed=version)
            stats = pusher.push(model.named_parameters(), version=version)
            assert stats["buckets"] >= 1 and stats["bytes"] > 0
            scored = server.client.score([(prompt, completion)])
            assert scored["version"] == version
            after = torch.tensor(scored["logprobs"][0])
            assert (after - hf_logprobs(model, prompt, completion)).abs().max() <= 1e-3
            assert (after - before).abs().max() > 1e-2, "the push did not change the served weights"
            before = after
            assert server.client.health()["version"] == version
            assert server.client.generate([prompt], n=2, max_tokens=4, seed=0)["version"] == version
    finally:
        pusher.close()


@pytest.fixture(scope="module")
def prompt(gsm8k_dir, tiny_tokenizer):
    return prompt_token_ids(tiny_tokenizer, read_jsonl(gsm8k_dir / "test.jsonl")[0])


def test_push_tied_model(server, tiny_model_dir, prompt):
    check_pushes_land(server, tiny_model_dir, prompt, server.client.health()["version"])


@pytest.fixture(scope="module")
def untied_server(tiny_untied_model_dir, tmp_path_factory):
    proc = start_server(tiny_untied_model_dir, tmp_path_factory.mktemp("untied-server"))
    yield proc
    proc.stop()


def test_push_untied_model(untied_server, tiny_untied_model_dir, prompt):
    check_pushes_land(untied_server, tiny_untied_model_dir, prompt, 0)


def test_server_killed_mid_push_raises_within_timeout(untied_server, tiny_untied_model_dir):
    """Runs last in this module: it kills the module's server."""
    model = AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir, dtype=torch.float32)
    timeout_s = 10
    pusher = WeightPusher(untied_server.client, transport="gloo", timeout_s=timeout_s, bucket_mb=1)
    killed = threading.Event()

    def tensors_then_kill():
        for i, item in enumerate(model.named_parameters()):
            if i == 3:  # the first bucket has gone through; kill everything mid-push
                untied_server.kill()
                killed.set()
            yield item

    start = time.monotonic()
    with pytest.raises(WeightSyncError) as err:
        pusher.push(tensors_then_kill(), version=5)
    elapsed = time.monotonic() - start
    assert killed.is_set()
    assert elapsed < 2 * timeout_s + 5, f"took {elapsed:.1f}s"
    assert "version 5" in str(err.value) or "bucket" in str(err.value)
