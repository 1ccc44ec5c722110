"""The generation server as a real process: generation, scoring, limits, auth."""

import subprocess
import sys

import pytest
import requests
from support.constants import SERVER_TOKEN
from support.processes import one_line_error

from pipeline.task.data import read_jsonl


@pytest.fixture(scope="module")
def prompt_ids(gsm8k_dir, tiny_tokenizer):
    from pipeline.task.data import prompt_token_ids

    return [prompt_token_ids(tiny_tokenizer, e) for e in read_jsonl(gsm8k_dir / "test.jsonl")[:2]]


def test_generate_n16_shapes_and_logprobs(server, prompt_ids):
    out = server.client.generate(prompt_ids, n=16, max_tokens=24, temperature=1.0, seed=7)
    assert out["version"] == server.client.health()["version"]
    assert len(out["results"]) == 2
    for ids, result in zip(prompt_ids, out["results"], strict=True):
        assert result["prompt_token_ids"] == ids
        assert len(result["completions"]) == 16
        for c in result["completions"]:
            assert 1 <= len(c["token_ids"]) <= 24
            assert len(c["logprobs"]) == len(c["token_ids"])
            assert all(lp <= 0.0 for lp in c["logprobs"])
            assert c["finish_reason"] in ("stop", "length")
    # 16 samples of a random model are not all the same
    assert len({tuple(c["token_ids"]) for c in out["results"][0]["completions"]}) > 1


def test_seed_makes_sampling_reproducible(server, prompt_ids):
    def sample(seed):
        out = server.client.generate(prompt_ids[:1], n=4, max_tokens=16, seed=seed)
        return [c["token_ids"] for c in out["results"][0]["completions"]]

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)


def test_seeded_batch_larger_than_one_scheduler_step(server):
    """Regression: seeded requests whose prefill was split across scheduler steps killed vLLM-CPU's
    engine ("CPU Generator does not use offset")."""
    vocab = server.client.model_info()["vocab_size"]
    prompts = [[(7 * i + j) % (vocab - 3) + 3 for j in range(120)] for i in range(80)]  # 9,600 prompt tokens
    out = server.client.generate(prompts, n=2, max_tokens=4, seed=11)
    assert len(out["results"]) == 80
    assert server.client.health()["status"] == "ok"


def test_text_prompts_and_model_info(server):
    info = server.client.model_info()
    assert info["dtype"] == "float32" and info["device"] == "cpu" and info["max_model_len"] == 512
    assert info["sync_backend"] == "gloo" and info["worker_multiproc_method"] == "spawn"
    out = server.client.request("POST", "/generate", {"prompts": ["Natalia sold"], "n": 2, "max_tokens": 4})
    assert len(out["results"][0]["completions"]) == 2
    assert server.client.request("POST", "/reset_prefix_cache") == {"reset": True}


@pytest.mark.parametrize(
    "body,status,message",
    [
        ({"prompt_token_ids": [[1, 2]], "n": 1, "bogus": 1}, 422, "bogus"),
        ({"prompt_token_ids": [[1, 2]], "n": 0}, 422, "n"),
        ({"prompt_token_ids": [[1, 2]], "temperature": -0.5}, 422, "temperature"),
        ({"prompt_token_ids": [[1, 2]], "n": 65}, 400, "n must be at most 64"),
        ({"prompt_token_ids": [[1, 2]], "max_tokens": 5000}, 400, "max_tokens must be at most"),
        ({"prompt_token_ids": [[1] * 600]}, 400, "exceeds max_model_len=512"),
        ({"prompt_token_ids": [[1, 999999]]}, 400, "outside the vocabulary"),
        ({"prompt_token_ids": [[]]}, 400, "prompt 0 is empty"),
        ({"prompt_token_ids": []}, 400, "number of prompts"),
        ({"prompts": ["a"], "prompt_token_ids": [[1]]}, 400, "exactly one"),
        ({"prompt_token_ids": [[-1]]}, 422, "prompt_token_ids"),
    ],
)
def test_bad_generate_requests_get_4xx(server, body, status, message):
    r = requests.post(
        server.client.base_url + "/generate",
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {SERVER_TOKEN}"},
    )
    assert r.status_code == status, r.text
    assert message in r.text


def test_bad_score_and_weight_requests(server):
    post = server.client.session.post
    url = server.client.base_url
    r = post(
        url + "/score",
        json={"sequences": [{"prompt_token_ids": [1], "completion_token_ids": [1] * 600}]},
        timeout=30,
    )
    assert r.status_code == 400 and "max_model_len" in r.text
    r = post(
        url + "/weights/update",
        json={"update_info": {"names": ["x"], "dtype_names": ["float32"], "shapes": [[2]]}},
        timeout=30,
    )
    assert r.status_code == 409 and "start" in r.text
    r = post(url + "/weights/init", json={"init_info": {"master_address": "127.0.0.1"}}, timeout=30)
    assert r.status_code == 400 and "gloo init info" in r.text  # the backend's own dataclass rejects it
    r = post(url + "/weights/finish", json={"version": 1}, timeout=30)
    assert r.status_code == 409
    assert server.client.health()["status"] == "ok"


def test_token_required(server):
    url = server.client.base_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SERVER_TOKEN}):
        for path in ("/health", "/model"):
            assert requests.get(url + path, headers=headers, timeout=10).status_code == 401
        for path in (
            "/weights/init",
            "/weights/start",
            "/weights/update",
            "/weights/finish",
            "/weights/checksums",
        ):
            assert requests.post(url + path, json={}, headers=headers, timeout=10).status_code == 401
    ok = requests.get(url + "/health", headers={"Authorization": f"Bearer {SERVER_TOKEN}"}, timeout=10)
    assert ok.status_code == 200


def test_off_loopback_without_token_refuses_to_start(tiny_model_dir):
    env = {k: v for k, v in __import__("os").environ.items() if k != "GRPO_SERVER_TOKEN"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.generation.serve",
            "--model",
            str(tiny_model_dir),
            "--host",
            "0.0.0.0",
            "--port",
            "8799",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2
    assert "refusing to start without a token" in one_line_error(proc)


def test_bad_config_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  prot: 1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.generation.serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert one_line_error(proc).startswith("error: server.prot: unknown key")


def test_a_second_transfer_group_releases_the_first(monkeypatch):
    """/weights/init when a group exists (a new trainer, or one recovering from a lost server) shuts the
    workers' old engine down first: vLLM's NCCL engine would otherwise keep the old communicator (its
    init only overwrites the reference). The engine is a recorder here; the sequence is the server's."""
    import threading

    from pipeline.config import load_config
    from pipeline.generation.serve import GenerationServer, SyncInitRequest

    calls = []

    class Engine:
        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            calls.append(method)
            return [None]

    server = object.__new__(GenerationServer)
    server.config, server.backend, server.llm = load_config(None, []), "gloo", Engine()
    server.fatal = server.error = ""
    server.updating = server.sync_ready = server.paused = False
    server.engine, server.weights, server.state = threading.Lock(), threading.RLock(), threading.Condition()
    info = {"master_address": "127.0.0.1", "master_port": 29999, "world_size": 2}
    server.init_sync(SyncInitRequest(init_info=info))
    server.init_sync(SyncInitRequest(init_info=info))
    assert calls == [
        "init_weight_transfer_engine",
        "shutdown_weight_transfer_engine",
        "init_weight_transfer_engine",
    ]
