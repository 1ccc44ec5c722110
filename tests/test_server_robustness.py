"""The generation server survives every request: hostile or odd input is a 4xx naming the field, never
a 5xx, and never leaves the engine wedged; an engine that dies or hangs makes the server say so and
exit (so the launcher's server.restart can replace it); concurrent requests queue behind a weight
update. Real `python -m pipeline.generation.serve` processes on the tiny model."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.constants import SERVER_TOKEN
from support.servers import local_server

from pipeline.sync.weight_sync import WeightSync

pytestmark = pytest.mark.integration  # every test here runs a real server
AUTH = {"Authorization": f"Bearer {SERVER_TOKEN}"}
PROMPTS = [[5, 17, 42, 8, 99], [3, 64, 12]]


@pytest.fixture(scope="module")
def hardy(tiny_model_dir, tmp_path_factory):
    """A server of its own (the fuzz must not disturb the shared one), with a short sync deadline so
    fuzzed rendezvous that cannot form fail fast."""
    proc = local_server(
        tiny_model_dir, tmp_path_factory.mktemp("hardy"), "--set", "sync.timeout_s=3", token=SERVER_TOKEN
    )
    yield proc
    proc.stop()


def post(server, path: str, body=None, raw: bytes | None = None, timeout: float = 60) -> requests.Response:
    headers = {**AUTH, "Content-Type": "application/json"}
    data = raw if raw is not None else json.dumps(body).encode()  # json.dumps writes NaN/Infinity literals
    return requests.post(server.client.base_url + path, data=data, headers=headers, timeout=timeout)


def reference(server) -> list:
    """A seeded generation: the same token ids every time while the weights stay the same."""
    out = server.client.generate(PROMPTS, n=4, max_tokens=12, seed=7)
    return [[c["token_ids"] for c in r["completions"]] for r in out["results"]]


HOSTILE = [  # (path, raw body): each a class the probe found or one of its neighbours
    (
        "/generate",
        b'{"prompt_token_ids": [[1, 2, 3]], "seed": 18446744073709551616}',
    ),  # >= 2**64: once wedged
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "seed": -1}'),
    (
        "/generate",
        b'{"prompt_token_ids": [[1, 2, 3], [4]], "seed": 9223372036854775807}',
    ),  # seed + 1 overflows
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "temperature": NaN}'),
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "top_p": Infinity}'),
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "temperature": -Infinity}'),
    ("/generate", b'{"prompts": ["\\ud800 lone surrogate"]}'),
    ("/generate", b'{"prompts": ["\xff\xfe not utf-8"]}'),
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "n": 100000000000000000000000}'),
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "stop_token_ids": [18446744073709551616]}'),
    ("/generate", b'{"prompt_token_ids": [[99999999999999999999]]}'),
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "max_tokens": 1e400}'),
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "n": 2, "temperature": 0}'),  # vLLM: greedy needs n=1
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "stop": [""]}'),
    ("/generate", b'{"prompt_token_ids": [[1, 2, 3]], "stop": ["a", "b", "c", "d", "e"]}'),
    ("/generate", b"[1, 2, 3]"),
    ("/generate", b"not json at all"),
    ("/score", b'{"sequences": [{"prompt_token_ids": [1], "completion_token_ids": [18446744073709551616]}]}'),
    ("/score", b'{"sequences": [{"prompt_token_ids": [NaN], "completion_token_ids": [1]}]}'),
    (
        "/weights/init",
        b'{"init_info": {"master_address": "127.0.0.1", "master_port": 99999999, "world_size": 2}}',
    ),
    ("/weights/init", b'{"init_info": {"master_address": "127.0.0.1", "master_port": 1, "world_size": -3}}'),
    (
        "/weights/init",
        b'{"init_info": {"master_address": "127.0.0.1", "master_port": 1, "world_size": 2, '
        b'"timeout_s": NaN}}',
    ),
    ("/weights/init", b'{"init_info": [1, 2]}'),
    ("/weights/start", b'{"version": 18446744073709551616}'),
    (
        "/weights/update",
        b'{"update_info": {"names": ["x"], "dtype_names": ["complex128"], "shapes": [[-1]]}}',
    ),
    ("/weights/finish", b'{"version": NaN}'),
    ("/weights/checksums", b'{"names": ["\\udfff"]}'),
    ("/weights/checksums", b'{"names": 5}'),
]


def test_hostile_requests_are_4xx_and_the_engine_keeps_serving(hardy):
    before = reference(hardy)
    for path, raw in HOSTILE:
        r = post(hardy, path, raw=raw)
        assert 400 <= r.status_code < 500, (path, raw, r.status_code, r.text[:300])
        assert "\n" not in r.json()["detail"] and r.json()["detail"], (path, r.text)  # one line, not empty
        assert hardy.proc.poll() is None
    assert hardy.client.health()["status"] == "ok"
    assert reference(hardy) == before  # answered, and correctly: the same seeded tokens as before


def test_oversized_body_is_413(hardy):
    r = post(hardy, "/generate", raw=b'{"prompts": ["' + b"a" * (65 * 2**20) + b'"]}', timeout=120)
    assert r.status_code == 413 and "max_request_mb" in r.text


HOSTILE_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["\ud800", "x\udfff", "", "127.0.0.1", "localhost"]),
    st.text(max_size=12),
    st.lists(st.integers(-(2**65), 2**65), max_size=6),
    st.lists(st.lists(st.integers(-3, 2000), max_size=6), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
LOOPBACK = st.sampled_from(["127.0.0.1", "localhost", "::1"])  # fuzzed rendezvous never leave this machine
FIELDS = {
    "/generate": [
        "prompt_token_ids",
        "prompts",
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "seed",
        "stop_token_ids",
        "stop",
        "ignore_eos",
        "bogus",
    ],
    "/score": ["sequences", "bogus"],
    "/weights/start": ["version", "bogus"],
    "/weights/update": ["update_info", "bogus"],
    "/weights/finish": ["version"],
    "/weights/checksums": ["names", "received"],
    "/reset_prefix_cache": ["bogus"],
}
BODIES = st.one_of(
    *[
        st.tuples(st.just(path), st.dictionaries(st.sampled_from(keys), HOSTILE_VALUES, max_size=5))
        for path, keys in FIELDS.items()
    ],
    st.tuples(
        st.just("/score"),
        st.fixed_dictionaries(
            {
                "sequences": st.lists(
                    st.fixed_dictionaries(
                        {
                            "prompt_token_ids": st.lists(st.integers(-2, 2**33), max_size=5),
                            "completion_token_ids": st.lists(st.integers(-2, 2**33), max_size=5),
                        }
                    ),
                    max_size=3,
                )
            }
        ),
    ),
    st.tuples(
        st.just("/weights/update"),
        st.fixed_dictionaries(
            {
                "update_info": st.dictionaries(
                    st.sampled_from(["names", "dtype_names", "shapes", "digest_names", "zz"]),
                    HOSTILE_VALUES,
                    max_size=4,
                )
            }
        ),
    ),
    st.tuples(
        st.just("/weights/init"),
        st.fixed_dictionaries(
            {
                "init_info": st.fixed_dictionaries(
                    {"master_address": LOOPBACK, "master_port": HOSTILE_VALUES, "world_size": HOSTILE_VALUES},
                    optional={
                        "rank_offset": HOSTILE_VALUES,
                        "timeout_s": HOSTILE_VALUES,
                        "bucket_bytes": HOSTILE_VALUES,
                    },
                )
            }
        ),
    ),
    st.tuples(st.sampled_from(list(FIELDS) + ["/weights/init"]), HOSTILE_VALUES),  # not even an object
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path_body=BODIES)
def test_fuzz_every_endpoint_never_5xx(hardy, path_body):
    path, body = path_body
    r = post(hardy, path, body)
    assert r.status_code < 500, (path, body, r.status_code, r.text[:300])


def test_after_the_fuzz_the_server_is_alive_and_correct(hardy):
    """Runs after the fuzz (file order): nothing it sent left the server unable to serve."""
    assert hardy.proc.poll() is None
    first = reference(hardy)
    assert hardy.client.health()["status"] == "ok" and reference(hardy) == first
    for name in ("/health", "/model"):
        assert requests.get(hardy.client.base_url + name, headers=AUTH, timeout=30).status_code == 200


def test_concurrent_requests_queue_while_a_weight_update_waits_its_turn(hardy, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sync = WeightSync(model, 0, 0, torch.device("cpu"), hardy.client, host="127.0.0.1", timeout_s=60)
    sync.connect()
    version = hardy.client.health()["version"]
    with ThreadPoolExecutor(max_workers=25) as pool:
        generations = [
            pool.submit(hardy.client.generate, PROMPTS, n=8, max_tokens=16, seed=i) for i in range(24)
        ]
        push = pool.submit(sync.push, version + 1)
        results = [g.result() for g in generations]
        push.result()
    assert all(len(r["results"]) == 2 and len(r["results"][0]["completions"]) == 8 for r in results)
    assert {r["version"] for r in results} <= {version, version + 1}
    assert hardy.client.health()["version"] == version + 1
    sync.close()


def test_a_request_its_client_abandons_wedges_nothing(hardy):
    with pytest.raises(requests.Timeout):
        requests.post(
            hardy.client.base_url + "/generate",
            headers=AUTH,
            timeout=0.2,
            json={"prompt_token_ids": PROMPTS * 4, "n": 32, "max_tokens": 200, "ignore_eos": True},
        )
    start = time.monotonic()
    assert len(hardy.client.generate(PROMPTS, n=2, max_tokens=4, seed=1)["results"]) == 2
    assert time.monotonic() - start < 120


def engine_core(server) -> psutil.Process:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    core = [p for p in children if "EngineCore" in " ".join(p.cmdline()) + p.name()]
    assert core, [p.cmdline() for p in children]
    return core[0]


def wait_exit(server, timeout: float) -> None:
    try:
        server.proc.wait(timeout)
    except Exception:  # noqa: BLE001 - reported below
        pass
    assert server.proc.poll() is not None, f"the server did not exit within {timeout:.0f}s"


def test_dead_engine_makes_the_server_unhealthy_and_exit(tiny_model_dir, tmp_path):
    server = local_server(tiny_model_dir, tmp_path, token=SERVER_TOKEN)
    try:
        engine_core(server).kill()
        end = time.monotonic() + 60
        health = None
        while time.monotonic() < end and server.proc.poll() is None:  # vLLM's monitor flags the death
            health = requests.get(server.client.base_url + "/health", headers=AUTH, timeout=10)
            if health.status_code == 503:
                break
            time.sleep(0.5)
        assert health is not None and health.status_code == 503, health and health.text
        assert health.json()["detail"] == "the engine-core process died"
        r = post(server, "/generate", {"prompt_token_ids": PROMPTS, "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and "server exiting" in r.json()["detail"]
        wait_exit(server, 60)
    finally:
        server.stop()


def test_stuck_engine_trips_the_watchdog_and_the_server_exits(tiny_model_dir, tmp_path):
    server = local_server(tiny_model_dir, tmp_path, "--set", "server.request_timeout_s=5", token=SERVER_TOKEN)
    core = engine_core(server)
    try:
        core.send_signal(signal.SIGSTOP)  # alive, silent: no error will ever come from it
        start = time.monotonic()
        try:
            r = post(server, "/generate", {"prompt_token_ids": PROMPTS, "max_tokens": 2}, timeout=60)
            assert r.status_code == 503, r.text
        except requests.ConnectionError:
            pass  # the server went down under the request: the client's error is immediate too
        assert time.monotonic() - start < 45
        wait_exit(server, 60)
        assert "ran past server.request_timeout_s=5s" in server.log_path.read_text()
    finally:
        if core.is_running():
            os.kill(core.pid, signal.SIGCONT)
        server.stop()
