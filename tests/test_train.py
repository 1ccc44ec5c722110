"""The trainer end to end: launcher -> deepspeed ranks -> shared server, on CPU."""

import json
from pathlib import Path

import pytest
import torch
from support.constants import SERVER_TOKEN
from support.launcher import launch
from support.processes import one_line_error, processes_mentioning
from support.reference import hf_logprobs
from support.runs import read_metrics

from pipeline.config import TrainConfig
from pipeline.task.synthetic import generate
from pipeline.trainer.build import StepData, lr_schedule

REPO = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = {
    "step",
    "epoch",
    "lr",
    "loss",
    "reward/total",
    "reward/strict_format",
    "reward/soft_format",
    "reward/int_answer",
    "reward/xml_count",
    "reward/correctness",
    "format/strict_rate",
    "accuracy",
    "completion_len/mean",
    "completions/truncated_rate",
    "clip_ratio",
    "sync/logprob_max_abs_diff",
    "time/generate",
    "time/reward",
    "time/train",
    "time/sync",
    "time/step",
}


def test_lr_schedule_warms_up_and_ends_at_the_floor():
    def lrs(**fields):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
        scheduler = lr_schedule(optimizer, TrainConfig(learning_rate=1e-4, warmup_ratio=0.1, **fields), 100)
        out = []
        for _ in range(100):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return out + [optimizer.param_groups[0]["lr"]]

    plain, floored = lrs(), lrs(min_lr_ratio=0.1)
    assert plain[0] == floored[0] == 0 and plain[10] == floored[10] == pytest.approx(1e-4)
    assert plain[-1] == pytest.approx(0, abs=1e-12) and floored[-1] == pytest.approx(1e-5)
    assert min(floored[10:]) == pytest.approx(1e-5) and floored[55] > plain[55]


def test_step_data_is_deterministic_and_resumable():
    examples = generate(10, 0)
    a, b = StepData(examples, 3, seed=1), StepData(examples, 3, seed=1)
    assert a.steps_per_epoch == 3
    assert [a(s) for s in range(6)] == [b(s) for s in reversed(range(6))][::-1]  # any order of calls
    assert {e.question for s in range(3) for e in a(s)} <= {e.question for e in examples}
    assert len({e.question for s in range(3) for e in a(s)}) == 9  # no repeats within an epoch
    assert a(0) != a(3)  # each epoch is reshuffled


@pytest.mark.e2e
@pytest.mark.parametrize("zero", [2, 3])
def test_two_ranks_three_steps(zero, server, warm_model_dir, tmp_path):
    name = f"zero{zero}"
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    common = [
        "--name",
        name,
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        f"train.deepspeed_config=configs/ds_zero{zero}.json",
        "--set",
        "train.save_every=2",
    ]
    proc = launch(*common, "--set", "train.max_steps=3", server=server, root=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (66 MB per rank) are not left in /dev/shm, i.e. in RAM
    assert not set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before
    run_dir = tmp_path / name
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert REQUIRED_KEYS <= set(row), REQUIRED_KEYS - set(row)
        assert row["sync/logprob_max_abs_diff"] <= 1e-3
        assert row["sync/verified_tensors"] > 0  # every push checked by checksums, ZeRO-3 gathers included
        # fp32, synchronous: the server's sampling logprobs are the trainer's own policy, so a temperature
        # or offset error in them (or a stale server) moves this ratio off 1
        assert abs(row["is_ratio/mean"] - 1) < 1e-3 and row["is_ratio/max"] < 1.01, row
        assert row["time/step"] > 0
    assert any(r["reward/total"] > 0 for r in rows), "warm model should earn some reward"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-3"
    for f in ("config.yaml", "train.log", "trainer.log"):  # server.log: the shared server is not the run's
        assert (run_dir / f).exists(), f
    assert SERVER_TOKEN not in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "tensorboard").iterdir())
    # the report of a real run: the card's numbers are this run's, the curves are real PNGs
    card = (run_dir / "README.md").read_text()
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    strict = "format/strict_rate"
    assert f"| {strict} | {before[strict]:.3f} | {after[strict]:.3f} |" in card
    assert "over gloo" in card and "2 DeepSpeed trainer ranks" in card
    for png in ("reward_curves.png", "format_curves.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in card

    # The server serves exactly the final model, which differs from where training started.
    assert server.client.health()["version"] == 3
    prompt = [
        int(t)
        for t in server.client.request(
            "POST", "/generate", {"prompts": ["Tom has 3 apples."], "max_tokens": 1}
        )["results"][0]["prompt_token_ids"]
    ]
    completion = server.client.generate([prompt], n=1, max_tokens=16, seed=0)["results"][0]["completions"][0][
        "token_ids"
    ]
    served = torch.tensor(server.client.score([(prompt, completion)])["logprobs"][0])
    assert (served - hf_logprobs(run_dir / "final", prompt, completion)).abs().max() <= 1e-3
    assert (served - hf_logprobs(warm_model_dir, prompt, completion)).abs().max() > 1e-4

    # --- the same run again: refused without --resume; with it, continued from the last checkpoint ---
    again = launch(*common, "--set", "train.max_steps=3", server=server, root=tmp_path)
    assert again.returncode == 2 and "already holds a run" in one_line_error(again)
    resumed = launch(
        *common, "--resume", "--force", "--set", "train.max_steps=4", server=server, root=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints'}" in (run_dir / "train.log").read_text()
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert server.client.health()["version"] == 4


@pytest.mark.e2e
def test_overlapped_mode_with_dynamic_sampling(server, warm_model_dir, tmp_path):
    proc = launch(
        "--name",
        "overlap",
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.overlap=true",
        "--set",
        "train.dynamic_sampling=true",
        "--set",
        "eval.enabled=false",
        server=server,
        root=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "overlap")
    # a group without signal trains only where the draws ran out, and each one is counted
    for r in rows:
        assert (r["frac_zero_std_groups"] > 0) == (r["rollout/short_groups"] > 0)
        assert r["rollout/dynamic_draws"] <= 3 and r["rollout/filtered_groups"] >= r["rollout/short_groups"]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the first step's rollouts come from the starting weights; later ones are exactly one step stale
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 1]
    assert all(r["rollout/discarded_total"] == 0 for r in rows)
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in rows)
    assert server.client.health()["version"] == 3
    prompt = server.client.request("POST", "/generate", {"prompts": ["Ana has 5 books."], "max_tokens": 1})
    prompt = prompt["results"][0]["prompt_token_ids"]
    completion = server.client.generate([prompt], n=1, max_tokens=16, seed=1)["results"][0]["completions"][0]
    served = torch.tensor(server.client.score([(prompt, completion["token_ids"])])["logprobs"][0])
    final = hf_logprobs(tmp_path / "overlap" / "final", prompt, completion["token_ids"])
    assert (served - final).abs().max() <= 1e-3


@pytest.mark.e2e
def test_async_mode_trains_with_weight_updates_mid_generation(server, warm_model_dir, tmp_path):
    """train.max_staleness=2 with dynamic sampling: up to two steps generated ahead, pushes into the
    generation under way; every row has the staleness, version spans, buffer and idle columns, the
    bound holds, and the final weights are the engines'."""
    proc = launch(
        *("--name", "async", "--set", f"model.path={warm_model_dir}", "--set", "model.build="),
        *("--set", "train.max_steps=5", "--set", "train.max_staleness=2"),
        *("--set", "train.dynamic_sampling=true", "--set", "eval.enabled=false"),
        server=server,
        root=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "async")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:
        assert 0 <= r["rollout/staleness_mean"] <= r["rollout/staleness_max"] <= 2
        assert r["rollout/version_span_max"] <= r["rollout/staleness_max"]
        assert r["rollout/dropped_stale"] == 0 and 0 <= r["rollout/buffer_steps"] <= 1
        assert 0 <= r["time/generation_idle_frac"] <= 1 and 0 <= r["time/trainer_idle_frac"] <= 1
        assert (r["frac_zero_std_groups"] > 0) == (r["rollout/short_groups"] > 0)
    # steps 1 and 2 were requested before any update; step 1 trains version 0's rollouts
    assert rows[0]["rollout/staleness_max"] == 0 and rows[1]["rollout/staleness_max"] >= 1
    probed = [r for r in rows if r.get("sync/probed")]
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in probed)
    assert server.client.health()["version"] == 5
    prompt = server.client.request("POST", "/generate", {"prompts": ["Ana has 5 books."], "max_tokens": 1})
    prompt = prompt["results"][0]["prompt_token_ids"]
    completion = server.client.generate([prompt], n=1, max_tokens=16, seed=1)["results"][0]["completions"][0]
    served = torch.tensor(server.client.score([(prompt, completion["token_ids"])])["logprobs"][0])
    final = hf_logprobs(tmp_path / "async" / "final", prompt, completion["token_ids"])
    assert (served - final).abs().max() <= 1e-3


@pytest.mark.e2e
def test_kl_token_aggregation_and_truncation_masking_end_to_end(server, warm_model_dir, tmp_path):
    """beta > 0 (a reference model under DeepSpeed), the step-global token mean across 2 ranks x 2
    micro-batches, no gradient for truncated completions, and TRL's sampler correction, through the
    real launcher."""
    proc = launch(
        "--name",
        "kl",
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "eval.enabled=false",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.beta=0.05",
        "--set",
        "train.loss_type=dapo",
        "--set",
        "train.mask_truncated_completions=true",
        "--set",
        "train.max_completion_tokens=24",
        "--set",
        "train.vllm_importance_sampling_correction=true",  # TRL's correction, its default mode
        "--set",
        "train.use_bias_correction_kl=true",
        server=server,
        root=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(tmp_path / "kl")
    # synchronous fp32: the sampler is the trainer, so no completion is masked and the weights are ~1
    assert all(r["sampling/importance_sampling_masked_frac"] == 0 for r in rows)
    assert all(abs(r["sampling/importance_sampling_ratio/mean"] - 1) < 1e-2 for r in rows)
    assert [r["step"] for r in rows] == [1, 2, 3]
    # the reference is the starting model: KL is 0 before the first update, then grows from 0
    assert abs(rows[0]["kl"]) < 1e-5 and rows[-1]["kl"] > 0
    assert all(r["completions/truncated_rate"] > 0 for r in rows)  # 24 tokens: some are cut, and masked
    assert all(abs(r["is_ratio/mean"] - 1) < 1e-3 for r in rows)
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 for r in rows)


def test_port_in_use_is_refused_before_anything_starts(server, tmp_path):
    port = int(server.client.base_url.rsplit(":", 1)[1])
    proc = launch("--name", "clash", "--set", f"server.port={port}", root=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert one_line_error(proc) == (
        f"error: server.port: 127.0.0.1:{port} is already in use (another run's server?); "
        "pick another with --set server.port=N"
    )
    assert not (tmp_path / "clash").exists()


def test_port_left_in_time_wait_is_not_refused():
    """A stopped server's closed connections linger in TIME_WAIT: `make train` twice in a row must
    still get the port (the check once refused it, the server itself binds with SO_REUSEADDR)."""
    import socket
    import time

    import launch.train as launcher

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn, _ = listener.accept()
    conn.close()  # the server side closes first, so its end of the connection enters TIME_WAIT
    client.close()
    listener.close()
    time.sleep(0.2)
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the situation is real: a plain bind is refused
    launcher.hold_port("127.0.0.1", port).close()


@pytest.mark.e2e
def test_trainer_crash_stops_everything(tiny_model_dir, tmp_path):
    """The trainer fails after the server is up (only the ranks tokenize the prompts: every one is
    over max_prompt_tokens): both stop, the error is one line."""
    from pipeline.generation.client import free_port

    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "q?", "answer": "#### 1"}\n{"question": "r?", "answer": "#### 2"}\n')
    port = free_port("127.0.0.1")
    proc = launch(
        "--name",
        "crash",
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        "--set",
        f"server.port={port}",
        "--set",
        "data.source=jsonl",
        "--set",
        f"data.train_file={data}",
        "--set",
        "data.max_prompt_tokens=5",
        "--set",
        "eval.enabled=false",
        root=tmp_path,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "error: all 2 prompts are longer than max_prompt_tokens=5" in proc.stdout + proc.stderr
    assert "starting generation server" in proc.stdout  # the server was up when the trainer failed
    assert not processes_mentioning(str(tmp_path)), "orphan processes left behind"
    with pytest.raises(Exception):  # noqa: B017 - nothing listens on the server port any more
        __import__("requests").get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_ranks_wait_out_rank_zeros_deadlines():
    """Ranks other than 0 wait in a collective while rank 0 alone talks to the server: their timeout
    must outlast rank 0's own deadlines, or a slow generation kills them with a bare gloo timeout."""
    from pipeline.config import Config
    from pipeline.trainer.loop import collective_timeout

    config = Config()
    config.server.request_timeout_s = 1200
    waited = collective_timeout(config).total_seconds()
    assert waited > config.server.request_timeout_s + config.server.startup_timeout_s + config.sync.timeout_s


def test_ranks_wait_out_rank_zeros_tool_turns():
    """With tools, rank 0's generation is up to max_tool_calling_iterations turns more, each the turn's
    calls (bounded as a whole by rollout.tool_timeout_s) and a request: the other ranks wait them out,
    in training and in evaluation during training."""
    from pipeline.config import Config
    from pipeline.trainer.loop import collective_timeout

    config = Config()
    plain = collective_timeout(config).total_seconds()
    config.rollout.tools = ["calculator"]
    config.rollout.tool_timeout_s = 300
    r, s = config.rollout, config.server
    turns = r.max_tool_calling_iterations * (r.tool_timeout_s + s.request_timeout_s)
    assert collective_timeout(config).total_seconds() > plain + turns
    config.eval.every, config.eval.limit, config.eval.maj_k = 5, 128, 0  # one request, and its turns
    assert collective_timeout(config).total_seconds() > plain + 2 * turns + s.request_timeout_s
