"""The GPU path: what only CUDA can show (`make test-gpu`; every test skips without enough GPUs).

vLLM's `nccl` and `ipc` weight-transfer engines, two engines in one NCCL group, tensor-parallel servers, ZeRO-3 gathers on GPUs,
FlashAttention-2 against sdpa, CUDA graphs across pushes, a server killed mid-NCCL-push, the one-GPU
layout and a short bf16 run of the real launcher. Models are the suite's tiny Qwen2s, in bf16.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.models import perturb
from support.reference import hf_logprobs
from support.servers import killed_mid_push, local_server

from pipeline.device import probe_tolerance
from pipeline.generation.client import free_port
from pipeline.generation.server_process import ServerProcess
from pipeline.sync.weight_sync import WeightSync, WeightSyncError

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[1]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
TOKEN = "gpu-suite-token"
BF16_TOL = probe_tolerance(torch.bfloat16)


def need(gpus: int):
    return pytest.mark.skipif(GPUS < gpus, reason=f"needs {gpus} CUDA GPU(s), found {GPUS}")


def gpu_server(model_dir: Path, log_dir: Path, gpus: list[int], *extra: str) -> ServerProcess:
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), "VLLM_WORKER_MULTIPROC_METHOD": "spawn"}
    return local_server(
        model_dir,
        log_dir,
        "--set",
        "model.dtype=bfloat16",
        "--set",
        "server.gpu_memory_utilization=0.3",
        "--set",
        f"server.tensor_parallel_size={len(gpus)}",
        *extra,
        token=TOKEN,
        env=env,
        settings=(),
        healthy_within=600,
    )


def hf_model(model_dir: Path, device: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation=attn).to(
        device
    )


PROMPT = [5, 17, 42, 8, 99, 3, 64, 12]


def push_and_check(server, model, device: str, version: int, **kw) -> WeightSync:
    """Push `model` (already on `device`), then: checksums equal on every shard and the
    served logprobs within the bf16 tolerance of HF's."""
    sync = WeightSync(model, 0, 0, torch.device(device), server.client, host="127.0.0.1", timeout_s=120, **kw)
    sync.connect()
    stats = sync.push(version)
    # every tensor (a tiny model fits the sample) verified on every worker: with tensor parallelism each
    # rank's qkv / gate_up / o / down / vocabulary shard as pipeline/sync/shards.py computes it
    names = {n for n, _ in model.named_parameters()}
    assert set(sync.verified_names) == names, sorted(names - set(sync.verified_names))
    assert stats["verified_tensors"] > 0 and stats["verified_bytes_frac"] == 1.0
    out = server.client.generate([PROMPT], n=1, max_tokens=16, seed=0)
    assert out["version"] == version
    completion = out["results"][0]["completions"][0]
    decoded = torch.tensor(completion["logprobs"])  # the decode path (CUDA graphs when enabled)
    assert (decoded - hf_logprobs(model, PROMPT, completion["token_ids"])).abs().max() <= BF16_TOL
    scored = torch.tensor(server.client.score([(PROMPT, completion["token_ids"])])["logprobs"][0])
    assert (scored - hf_logprobs(model, PROMPT, completion["token_ids"])).abs().max() <= BF16_TOL
    return sync


@pytest.mark.integration
@need(2)
def test_nccl_push_into_a_server_on_another_gpu(tiny_model_dir, tmp_path):
    server = gpu_server(tiny_model_dir, tmp_path, [0])
    try:
        model = hf_model(tiny_model_dir, "cuda:1")
        sync = push_and_check(server, model, "cuda:1", 1)
        assert sync.backend == "nccl"
        perturb(model, 2)
        sync.push(2)  # a second round through the same communicator
        completion = server.client.generate([PROMPT], n=1, max_tokens=8, seed=1)["results"][0]["completions"][
            0
        ]
        assert (
            torch.tensor(completion["logprobs"]) - hf_logprobs(model, PROMPT, completion["token_ids"])
        ).abs().max() <= BF16_TOL
        sync.close()
    finally:
        server.stop()


@pytest.mark.integration
@need(1)
def test_ipc_push_when_trainer_and_server_share_one_gpu(tiny_model_dir, tmp_path):
    server = gpu_server(tiny_model_dir, tmp_path, [0], "--set", "sync.transport=ipc")
    try:
        model = hf_model(tiny_model_dir, "cuda:0")
        perturb(model, 3)
        sync = push_and_check(server, model, "cuda:0", 1)
        assert sync.backend == "ipc"
        sync.close()
    finally:
        server.stop()


@pytest.mark.integration
@need(3)
def test_tensor_parallel_server(tiny_untied_model_dir, tmp_path):
    server = gpu_server(tiny_untied_model_dir, tmp_path, [0, 1])
    try:
        model = hf_model(tiny_untied_model_dir, "cuda:2")
        perturb(model, 4)
        sync = push_and_check(server, model, "cuda:2", 1)
        assert server.client.model_info()["tensor_parallel_size"] == 2
        sync.close()
    finally:
        server.stop()


@pytest.mark.integration
@need(3)
def test_two_engines_one_nccl_broadcast(tiny_model_dir, tmp_path):
    """server.data_parallel_size=2: engines on GPUs 0 and 1, the trainer on GPU 2; one NCCL group holds
    both engines' workers (rank offsets 1 and 2), one push verifies on both, both generate with it."""
    from pipeline.generation.engines import Engines

    (tmp_path / "e0").mkdir()
    (tmp_path / "e1").mkdir()
    servers = [
        gpu_server(
            tiny_model_dir,
            tmp_path / f"e{i}",
            [i],
            "--set",
            "server.data_parallel_size=2",
            "--engine-index",
            str(i),
        )
        for i in range(2)
    ]
    try:
        engines = Engines.of([s.client for s in servers])
        model = hf_model(tiny_model_dir, "cuda:2")
        perturb(model, 5)
        sync = WeightSync(model, 0, 0, torch.device("cuda:2"), engines, host="127.0.0.1", timeout_s=120)
        sync.connect()
        stats = sync.push(1)
        assert (
            sync.backend == "nccl" and sync.sync_client.offsets == [0, 1] and stats["engines_verified"] == 2
        )
        assert set(sync.verified_names) == {n for n, _ in model.named_parameters()}
        out = engines.generate([PROMPT, PROMPT[:5]], n=2, max_tokens=12, seed=0)
        assert {(c["engine"], c["version"]) for r in out["results"] for c in r["completions"]} == {
            (0, 1),
            (1, 1),
        }
        for server in servers:
            completion = server.client.generate([PROMPT], n=1, max_tokens=12, seed=1)["results"][0][
                "completions"
            ][0]
            assert (
                torch.tensor(completion["logprobs"]) - hf_logprobs(model, PROMPT, completion["token_ids"])
            ).abs().max() <= BF16_TOL
        sync.close()
    finally:
        for server in servers:
            server.stop()


@pytest.mark.integration
@need(3)
def test_an_engine_killed_mid_nccl_push_leaves_the_other_torn_not_dead(tiny_model_dir, tmp_path):
    """Two engines in one NCCL group, one killed mid-broadcast: the survivor's worker, stuck in a receive
    NCCL would never end, aborts its communicator at sync.timeout_s (pipeline/sync/nccl_deadline.py) and its
    server marks the weights torn instead of exiting; the recovery push (the survivor alone) repairs it."""
    from pipeline.generation.engines import Engines

    timeout_s = 20
    for i in range(2):
        (tmp_path / f"e{i}").mkdir()
    servers = [
        gpu_server(
            tiny_model_dir,
            tmp_path / f"e{i}",
            [i],
            "--set",
            "server.data_parallel_size=2",
            "--engine-index",
            str(i),
            "--set",
            f"sync.timeout_s={timeout_s}",
        )
        for i in range(2)
    ]
    try:
        engines = Engines.of([s.client for s in servers])
        model = hf_model(tiny_model_dir, "cuda:2")
        sync = WeightSync(
            model,
            0,
            0,
            torch.device("cuda:2"),
            engines,
            host="127.0.0.1",
            timeout_s=timeout_s,
            bucket_bytes=64 * 1024,
        )
        sync.connect()
        sync.push(1)
        start = time.monotonic()
        with (
            killed_mid_push(sync, servers[1].kill) as killed,
            pytest.raises(WeightSyncError, match="version 2"),
        ):
            sync.push(2)
        assert killed.is_set() and time.monotonic() - start < timeout_s + 15
        time.sleep(5)  # the survivor's deadline has passed: torn, alive, serving nothing
        assert servers[0].proc.poll() is None and servers[0].client.health()["torn"]
        assert "NCCL weight receive: aborted after" in (tmp_path / "e0" / "server.log").read_text()
        perturb(model, 3)
        sync.connect()  # the survivor alone
        assert sync.push(3)["engines_verified"] == 1
        completion = servers[0].client.generate([PROMPT], n=1, max_tokens=12, seed=3)["results"][0][
            "completions"
        ][0]
        assert (
            torch.tensor(completion["logprobs"]) - hf_logprobs(model, PROMPT, completion["token_ids"])
        ).abs().max() <= BF16_TOL
        sync.close()
    finally:
        for server in servers:
            server.stop()


@pytest.mark.integration
@need(2)
def test_cuda_graphs_survive_pushes(tiny_model_dir, tmp_path):
    server = gpu_server(tiny_model_dir, tmp_path, [0])  # enforce_eager unset: CUDA graphs on GPU
    try:
        assert server.client.model_info()["enforce_eager"] is False
        model = hf_model(tiny_model_dir, "cuda:1")
        sync = push_and_check(server, model, "cuda:1", 1)
        for version in (2, 3):
            perturb(model, version)
            sync.push(version)
            completion = server.client.generate([PROMPT], n=1, max_tokens=16, seed=version)["results"][0]
            completion = completion["completions"][0]
            assert (
                torch.tensor(completion["logprobs"]) - hf_logprobs(model, PROMPT, completion["token_ids"])
            ).abs().max() <= BF16_TOL
        sync.close()
    finally:
        server.stop()


@pytest.mark.integration
@need(2)
def test_an_nccl_push_into_a_running_cuda_generation(tiny_model_dir, tmp_path):
    """train.max_staleness >= 2 on GPUs: a push over NCCL while the engine decodes (CUDA graphs on) pauses
    it, and every completion that spans the two versions has each token's logprob from the version that
    sampled it (HF's, within bf16's tolerance), its KV recomputed by the new weights."""
    import copy
    import threading
    import time

    server = gpu_server(tiny_model_dir, tmp_path, [0])
    try:
        model = hf_model(tiny_model_dir, "cuda:1")
        sync = push_and_check(server, model, "cuda:1", 1)
        old = copy.deepcopy(model)
        answer: dict = {}

        def generate():
            answer["out"] = server.client.generate(
                [PROMPT], n=16, max_tokens=400, temperature=1.0, seed=3, ignore_eos=True
            )

        generate()
        start = time.monotonic()
        generate()
        took = time.monotonic() - start
        thread = threading.Thread(target=generate)
        thread.start()
        time.sleep(took / 3)
        perturb(model, 2)
        sync.push(2)
        thread.join(120)
        sync.close()
        spanning = 0
        for c in answer["out"]["results"][0]["completions"]:
            if len(c["versions"]) != 2:
                continue
            spanning += 1
            (_, _, cut), _ = c["versions"]
            served = torch.tensor(c["logprobs"])
            assert (served[:cut] - hf_logprobs(old, PROMPT, c["token_ids"])[:cut]).abs().max() <= BF16_TOL
            assert (served[cut:] - hf_logprobs(model, PROMPT, c["token_ids"])[cut:]).abs().max() <= BF16_TOL
        assert spanning >= 8, took
    finally:
        server.stop()


@pytest.mark.integration
@need(2)
def test_server_killed_mid_nccl_push_fails_within_the_deadline(tiny_model_dir, tmp_path):
    server = gpu_server(tiny_model_dir, tmp_path, [0])
    model = hf_model(tiny_model_dir, "cuda:1")
    timeout_s = 20
    sync = WeightSync(
        model,
        0,
        0,
        torch.device("cuda:1"),
        server.client,
        host="127.0.0.1",
        timeout_s=timeout_s,
        bucket_bytes=64 * 1024,
    )
    sync.connect()
    sync.push(1)
    start = time.monotonic()
    try:
        with killed_mid_push(sync, server.kill) as killed, pytest.raises(WeightSyncError, match="version 2"):
            sync.push(2)
    finally:
        server.stop()
    assert killed.is_set() and time.monotonic() - start < timeout_s + 10


@need(1)
def test_the_weight_digest_on_a_gpu_is_the_digest_on_the_cpu():
    """Both sides of a push digest on their own device (the trainer's GPU, each worker's GPU, or a CPU):
    the same bytes must give the same string on either, the layout (transposed, sliced, chunked) and the
    dtype notwithstanding, with the temporaries on the GPU bounded (a 2-block table, one block's products)."""
    from pipeline.sync.digest import tensor_digest

    g = torch.Generator().manual_seed(0)
    big = torch.randn(4099, 1031, generator=g).to(torch.bfloat16)  # 2 blocks and a bit, an odd word count
    cases = [
        big,
        big.T,
        big[:, 1::3],
        torch.randn(7, generator=g),
        torch.randint(-128, 127, (13,), generator=g, dtype=torch.int8),
        torch.randn(33, 65, generator=g, dtype=torch.float64).T,
    ]
    for t in cases:
        on_gpu = t.to("cuda:0")
        assert tensor_digest(on_gpu) == tensor_digest(t), (t.dtype, tuple(t.shape))
        assert tensor_digest(on_gpu, chunk_bytes=12_345) == tensor_digest(t)
    flipped = big.to("cuda:0")
    flipped.view(-1)[-1] += 1
    assert tensor_digest(flipped) != tensor_digest(big)
    sample = torch.randn(350 * 2**20 // 2, device="cuda:0").to(torch.bfloat16)  # prem-1B's sample, in bf16
    tensor_digest(sample[:1])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    tensor_digest(sample)
    assert torch.cuda.max_memory_allocated() - before <= 64 * 2**20


@need(1)
def test_flash_attention_matches_sdpa(tiny_model_dir):
    pytest.importorskip("flash_attn")
    completion = [7, 9, 11, 13, 15, 17]
    fa2 = hf_logprobs(hf_model(tiny_model_dir, "cuda:0", "flash_attention_2"), PROMPT, completion)
    sdpa = hf_logprobs(hf_model(tiny_model_dir, "cuda:0", "sdpa"), PROMPT, completion)
    assert (fa2 - sdpa).abs().max() <= BF16_TOL


def launch_run(
    tmp_path: Path, model_dir: Path, *extra: str, timeout: int = 900
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "launch/train.py",
        "--name",
        "gpu",
        "--set",
        f"run.root={tmp_path}",
        "--set",
        f"model.path={model_dir}",
        "--set",
        "model.build=",
        "--set",
        "model.dtype=bfloat16",
        "--set",
        "eval.enabled=false",
        "--set",
        f"server.port={free_port()}",
        *extra,
    ]
    return subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"},
    )


def check_run(tmp_path: Path, proc, steps: int, transport: str) -> list[dict]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "gpu" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["sync/verified_tensors"] > 0 and r["sync/logprob_max_abs_diff"] <= BF16_TOL for r in rows)
    assert json.loads((tmp_path / "gpu" / "run_info.json").read_text())["transport"] == transport
    return rows


@pytest.mark.e2e
@need(1)
def test_one_gpu_layout_runs(warm_model_dir, tmp_path):
    proc = launch_run(tmp_path, warm_model_dir, "--gpus", "1", "--set", "train.max_steps=3")
    check_run(tmp_path, proc, 3, "ipc")


@pytest.mark.e2e
@need(2)
def test_five_bf16_steps_of_make_train(warm_model_dir, tmp_path):
    gpus = min(GPUS, 3)  # the server + 1 or 2 ranks
    ranks = gpus - 1
    proc = launch_run(
        tmp_path,
        warm_model_dir,
        "--gpus",
        str(gpus),
        "--set",
        "train.max_steps=5",
        "--set",
        f"train.micro_batch_size={16 // ranks}",
        "--set",
        "train.gradient_accumulation_steps=1",
    )
    rows = check_run(tmp_path, proc, 5, "nccl")
    assert all(r["time/sync"] > 0 for r in rows)


@pytest.mark.e2e
@need(3)
def test_zero3_gathers_and_pushes_on_gpus(warm_model_dir, tmp_path):
    proc = launch_run(
        tmp_path,
        warm_model_dir,
        "--gpus",
        "3",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.deepspeed_config=configs/ds_zero3_gpu.json",
    )
    check_run(tmp_path, proc, 3, "nccl")


@pytest.mark.integration
@need(1)
def test_lora_adapter_push_into_a_bf16_server(tiny_model_dir, tmp_path):
    """model.lora_sync adapter on CUDA: vLLM's Triton LoRA kernels in bf16 serve what PEFT computes, within
    the bf16 tolerance that a merged bf16 push of a small update fails (pipeline/device.py), and all of
    the adapter's effect (`adapter_effect`)."""
    from peft import LoraConfig, get_peft_model

    from pipeline.sync.lora_export import adapter_file, adapter_state
    from pipeline.trainer.server_link import adapter_effect

    server = gpu_server(tiny_model_dir, tmp_path, [0], "--set", "model.lora_rank=8")
    try:
        assert server.client.model_info()["lora_adapters"]
        model = get_peft_model(
            hf_model(tiny_model_dir, "cuda:0"),
            LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.05)
        server.client.request(
            "POST", "/weights/adapter", data=adapter_file(model, adapter_state(model, 0), 1)
        )
        out = server.client.generate([PROMPT], n=1, max_tokens=16, seed=0)
        completion = out["results"][0]["completions"][0]["token_ids"]
        on = hf_logprobs(model, PROMPT, completion)
        with model.disable_adapter():
            off = hf_logprobs(model, PROMPT, completion)
        served = torch.tensor(server.client.score([(PROMPT, completion)])["logprobs"][0])
        assert out["version"] == 1 and (served - on).abs().max() <= BF16_TOL
        assert adapter_effect(served, on, off)[0] == pytest.approx(1.0, abs=0.2)
    finally:
        server.stop()
