"""Several generation engines (server.data_parallel_size): the split of a step's prompts, one push into
every engine's workers, and an engine that fails alone. Real server processes (gloo on CPU)."""

import os
import signal
import threading
import time

import pytest
import torch
from support.constants import SERVER_TOKEN
from support.launcher import start_launch, warm_run
from support.models import perturb
from support.processes import processes_mentioning, wait_gone
from support.reference import hf_logprobs
from support.runs import read_metrics, run_log
from support.servers import local_server
from transformers import AutoModelForCausalLM

from pipeline.generation.client import ServerError
from pipeline.generation.engines import SPLIT_SEED_STRIDE, Engine, Engines, Piece, shares
from pipeline.sync.weight_sync import WeightSync

# --- the split (pure) -------------------------------------------------------------------------------


def test_shares_follow_speed_and_add_up():
    assert shares(8, [1.0, 1.0]) == [4, 4]
    assert shares(8, [3.0, 1.0]) == [6, 2]
    assert shares(7, [1.0, 1.0, 1.0]) == [3, 2, 2]
    assert sum(shares(16, [0.7, 0.2, 0.1])) == 16


def _engines(speeds):
    engines = Engines([f"http://127.0.0.1:{9000 + i}" for i in range(len(speeds))])
    for engine, speed in zip(engines.engines, speeds, strict=True):
        engine.speed = speed
    return engines


def test_whole_groups_stay_on_one_engine_in_runs_sized_by_speed():
    engines = _engines([2.0, 1.0])
    parts = engines.split(Piece(0, 6, 16, 100), engines.engines)
    assert [(e.index, p.start, p.stop, p.n, p.seed) for e, p in parts] == [
        (0, 0, 4, 16, 100),
        (1, 4, 6, 16, 104),
    ]


def test_a_slow_engine_still_gets_a_group_so_its_speed_is_measured_again():
    engines = _engines([10.0, 1.0])
    assert [p.stop - p.start for _, p in engines.split(Piece(0, 2, 16, None), engines.engines)] == [1, 1]
    assert [p.stop - p.start for _, p in engines.split(Piece(0, 12, 16, None), engines.engines)] == [10, 2]


def test_a_restarted_engine_is_measured_afresh():
    engines = _engines([5.0, 0.5])
    slow = engines.engines[1]
    engines._note_instance(slow, "first-process")
    engines._note_instance(slow, "second-process")
    assert slow.restarts == 1 and slow.speed == 0.0


def test_an_unmeasured_engine_counts_as_the_fastest():
    engines = _engines([2.0, 0.0])
    assert [p.stop - p.start for _, p in engines.split(Piece(0, 4, 4, None), engines.engines)] == [2, 2]


def test_fewer_prompts_than_engines_split_each_group_with_distinct_seeds():
    engines = _engines([1.0, 1.0])
    parts = engines.split(Piece(0, 1, 16, 7), engines.engines)
    assert [(e.index, p.start, p.stop, p.n, p.seed) for e, p in parts] == [
        (0, 0, 1, 8, 7),
        (1, 0, 1, 8, 7 + SPLIT_SEED_STRIDE),
    ]


# --- two real engines -----------------------------------------------------------------------------------


def engine_process(model_dir, log_dir, index: int, port: int | None = None):
    """Engine `index` of a two-engine run, started (not yet healthy). From the calling thread: the
    kernel's parent-death signal follows the thread that started a process, not the process."""
    return local_server(
        model_dir,
        log_dir,
        "--set",
        "server.data_parallel_size=2",
        "--engine-index",
        str(index),
        token=SERVER_TOKEN,
        port=port,
        log_name=f"engine-{index}.log",
        healthy_within=None,
    )


@pytest.fixture(scope="module")
def two_engines(tiny_model_dir, tmp_path_factory):
    """Two engine processes of one run (engine-index 0 and 1), loading side by side."""
    log_dir = tmp_path_factory.mktemp("engines")
    started = [engine_process(tiny_model_dir, log_dir, i) for i in range(2)]
    try:
        for server in started:
            server.wait_healthy(240)
        yield started
    finally:
        for server in started:
            server.stop()


def restart(server, tiny_model_dir, log_dir):
    """A new process at the same address (what the launcher does), healthy."""
    fresh = engine_process(tiny_model_dir, log_dir, 1, port=int(server.client.base_url.rsplit(":", 1)[1]))
    fresh.wait_healthy(240)
    return fresh


def test_one_push_lands_on_both_engines_and_both_generate(two_engines, tiny_model_dir, tmp_path):
    engines = Engines.of([s.client for s in two_engines])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    perturb(model, seed=1)
    sync = WeightSync(model, 0, 0, torch.device("cpu"), engines, host="127.0.0.1", timeout_s=60)
    sync.connect()
    try:
        stats = sync.push(1)
        # one group: the trainer + engine 0's worker (rank 1) + engine 1's worker (rank 2)
        assert [e.index for e in sync.group] == [0, 1] and sync.sync_client.offsets == [0, 1]
        assert stats["engines_verified"] == 2 and stats["verified_bytes_frac"] == 1.0
        prompts = [[5, 6, 7, 8 + i] for i in range(4)]
        out = engines.generate(prompts, n=4, max_tokens=12, seed=3)
        made = [(c["engine"], c["version"]) for r in out["results"] for c in r["completions"]]
        assert len(made) == 16 and {m for m in made} == {(0, 1), (1, 1)} and out["version"] == 1
        assert out["split"]["engines"] == 2 and out["split"]["imbalance"] >= 1.0
        # the probe on each engine: its logprobs are the pushed weights'
        completion = out["results"][0]["completions"][0]["token_ids"]
        want = hf_logprobs(model, prompts[0], completion)
        for server in two_engines:
            served = torch.tensor(server.client.score([(prompts[0], completion)])["logprobs"][0])
            assert (served - want).abs().max() <= 1e-5
        # one prompt, two engines: its group is split between them
        one = engines.generate(prompts[:1], n=8, max_tokens=8, seed=3)
        assert sorted({c["engine"] for c in one["results"][0]["completions"]}) == [0, 1]
        assert len(one["results"][0]["completions"]) == 8
    finally:
        sync.close()


def test_a_dead_engine_is_left_out_and_rejoins_only_with_the_current_weights(
    two_engines, tiny_model_dir, tmp_path
):
    engines = Engines.of([s.client for s in two_engines])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sync = WeightSync(model, 0, 0, torch.device("cpu"), engines, host="127.0.0.1", timeout_s=60)
    sync.connect()
    sync.push(10)
    prompts = [[5, 6, 7, 8 + i] for i in range(8)]
    # killed mid-generation: its share is re-sent to engine 0, every completion arrives
    result = {}
    worker = threading.Thread(
        target=lambda: result.update(out=engines.generate(prompts, n=16, max_tokens=200, seed=1))
    )
    worker.start()
    time.sleep(0.3)
    two_engines[1].kill()
    worker.join(120)
    out = result["out"]
    assert sum(len(r["completions"]) for r in out["results"]) == 8 * 16
    assert [e.index for e in engines.members] == [0]
    assert engines.generate(prompts, n=2, max_tokens=4, seed=1)["split"]["engines"] == 1
    # back as a new process (version 0, the weights on disk): it gets no prompts before a push...
    two_engines[1].stop()
    two_engines[1] = restart(two_engines[1], tiny_model_dir, tmp_path)
    assert engines.engines[1].client.health()["version"] == 0
    only_zero = engines.generate(prompts, n=2, max_tokens=4, seed=1)
    assert {c["engine"] for r in only_zero["results"] for c in r["completions"]} == {0}
    # ...and the next push, into the group formed again, gives it the current weights
    perturb(model, seed=11)
    sync.connect()
    assert sync.push(11)["engines_verified"] == 2
    both = engines.generate(prompts, n=2, max_tokens=4, seed=1)
    assert {(c["engine"], c["version"]) for r in both["results"] for c in r["completions"]} == {
        (0, 11),
        (1, 11),
    }
    assert engines.engines[1].restarts == 1
    sync.close()


def test_no_engine_left_is_an_error_naming_the_cause(tiny_model_dir):
    engines = Engines(["http://127.0.0.1:9", "http://127.0.0.1:10"], timeout_s=5)
    engines.set_members(list(engines.engines), 1)
    with pytest.raises(ServerError, match=r"cannot reach the server .*no generation engine left"):
        engines.generate([[1, 2, 3]], n=2, max_tokens=4)
    assert engines.members == []


def test_a_refused_request_is_not_retried_elsewhere(two_engines):
    engines = Engines.of([s.client for s in two_engines])
    with pytest.raises(ServerError, match="HTTP 400"):
        engines.generate([[1, 2, 3]], n=10_000, max_tokens=4)
    assert all(isinstance(e, Engine) for e in engines.serving()) and len(engines.serving()) == 2


# --- a run with two engines (the launcher, the deepspeed ranks, real engine processes) -----------------


def engine_group(root, index: int) -> int:
    """The process group of engine `index` of the run under `root` (its API process leads it)."""
    pids = [
        int(line.split()[0])
        for line in processes_mentioning(str(root))
        if "pipeline.generation.serve" in line and f"--engine-index {index}" in line
    ]
    assert pids, f"engine {index} not found"
    return os.getpgid(pids[0])


def wait_for(predicate, what: str, proc, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) while waiting for {what}"
        assert time.monotonic() < end, f"{what}: not within {timeout}s"
        time.sleep(0.2)


def rows_of(run_dir):
    return read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []


@pytest.mark.e2e
def test_two_engines_train_and_one_fails_alone_mid_generation_then_mid_push(warm_model_dir, tmp_path):
    run_dir = tmp_path / "two"
    # enough steps (~0.3-1 s each here) for both restarts (~30-40 s each) to happen within the run: engine 0
    # was back by step ~30 on 2 cores; every step past that costs the suite time
    proc = start_launch(
        *warm_run(
            "two",
            "--set",
            "train.max_steps=100",
            "--set",
            "server.data_parallel_size=2",
            "--set",
            "server.restart=true",
            "--set",
            "sync.timeout_s=20",
            "--set",
            "server.request_timeout_s=30",
            warm_model_dir=warm_model_dir,
        ),
        server=None,
        root=tmp_path,
    )
    try:
        wait_for(lambda: len(rows_of(run_dir)) >= 2, "step 2", proc)
        assert all(r["server/engines"] == 2 for r in rows_of(run_dir)), "both engines generate every step"
        os.killpg(engine_group(tmp_path, 1), signal.SIGKILL)  # generation is most of a step: mid-generation
        # the step goes on with engine 0; engine 1 comes back and rejoins with the current weights
        wait_for(
            lambda: any(
                r["server/restarts/engine_1"] == 1 and r["server/engines"] == 2 for r in rows_of(run_dir)
            ),
            "engine 1 back in the rollouts",
            proc,
        )
        # mid-push: engine 0 stops (SIGSTOP) as soon as an update opens (if the update wins the race, it
        # stops mid-generation instead: its request times out), then dies
        log0, group0 = run_dir / "server.log", engine_group(tmp_path, 0)
        opened = log0.read_text().count("weight update to version")
        end = time.monotonic() + 120
        while log0.read_text().count("weight update to version") == opened and time.monotonic() < end:
            time.sleep(0.02)
        os.killpg(group0, signal.SIGSTOP)
        trainer_log = run_dir / "trainer.log"
        wait_for(
            lambda: (
                "forming the transfer group again" in trainer_log.read_text()
                or "engine 0 left out" in trainer_log.read_text()
            ),
            "engine 0's loss noticed",
            proc,
            timeout=120,
        )
        os.killpg(group0, signal.SIGKILL)
        assert proc.wait(600) == 0, run_log(run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
    rows = rows_of(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 101))
    # engine 1 was restarted once (its kill); the push that engine 0 broke off tore engine 1's weights,
    # and the recovery push repaired them in place: no second restart, the steps went on with it alone
    assert rows[-1]["server/restarts/engine_0"] >= 1 and rows[-1]["server/restarts/engine_1"] == 1
    assert "weights torn" in (run_dir / "server-1.log").read_text()
    alone = [r["step"] for r in rows if r["server/engines"] == 1 and r["server/restarts/engine_1"] == 1]
    assert alone, "no step finished on engine 1 alone while engine 0 was down"
    # nothing stale: every step trained on rollouts of its own weights, and every probe matched them
    assert all(r["rollout/staleness"] == 0 for r in rows)
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 and r["sync/engines_verified"] >= 1 for r in rows)
    assert "restarting it" in (tmp_path / "launch.log").read_text()
    wait_gone(str(tmp_path))


@pytest.mark.e2e
def test_both_engines_killed_is_a_one_line_error_within_the_deadline(warm_model_dir, tmp_path):
    run_dir = tmp_path / "both"
    proc = start_launch(
        *warm_run(
            "both",
            "--set",
            "train.max_steps=40",
            "--set",
            "server.data_parallel_size=2",
            "--set",
            "server.restart=false",
            warm_model_dir=warm_model_dir,
        ),
        server=None,
        root=tmp_path,
    )
    wait_for(lambda: len(rows_of(run_dir)) >= 2, "step 2", proc)
    groups = [engine_group(tmp_path, i) for i in (0, 1)]
    for group in groups:
        os.killpg(group, signal.SIGKILL)
    killed = time.monotonic()
    code = proc.wait(120)
    assert code != 0 and time.monotonic() - killed < 60
    errors = {
        line for line in (tmp_path / "launch.log").read_text().splitlines() if line.startswith("error: ")
    }
    assert len(errors) == 1 and "no generation engine left" in errors.pop(), (
        errors
    )  # the same line from each rank
    wait_gone(str(tmp_path))


def test_an_idle_cpu_engine_does_not_spin_after_generating(server):
    """vLLM's workers spin on their shared-memory queue for 1 s after each message; on CPU, where the
    trainer ranks share the cores, our plugin makes that 5 ms (pipeline/device.py)."""
    import psutil

    workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "Worker" in p.name()]
    assert workers, "no vLLM worker process under the server"
    server.client.generate([[5, 6, 7, 8]], n=4, max_tokens=16, seed=1)
    before = sum(sum(w.cpu_times()[:2]) for w in workers)
    time.sleep(1.0)
    busy = sum(sum(w.cpu_times()[:2]) for w in workers) - before
    assert busy < 0.3, f"the worker burnt {busy:.2f} s of CPU in the second after a generation"


def test_a_rank_waits_for_restarted_engines_only_while_their_launcher_lives(monkeypatch):
    """server.restart: the ranks wait for an engine to come back only while the launcher that owns the
    engines lives (killed, it restarts nothing: the ranks then fail at once instead of waiting minutes)."""
    import subprocess

    from pipeline.generation.engines import LAUNCHER_PID_ENV, restarts_possible

    monkeypatch.delenv(LAUNCHER_PID_ENV, raising=False)
    assert not restarts_possible()  # engines started elsewhere (--server-url, SLURM): nobody restarts them
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(os.getpid()))
    assert restarts_possible()
    gone = subprocess.Popen(["true"])
    gone.wait()
    monkeypatch.setenv(LAUNCHER_PID_ENV, str(gone.pid))
    assert not restarts_possible()
