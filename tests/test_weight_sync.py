"""Weight sync into a running server through vLLM's weight-transfer API (our gloo engine on CPU):
after a push the server's logprobs are the trainer's, and its checksums match what was sent."""

import errno
import os
import time

import pytest
import torch
from support.models import perturb
from support.reference import hf_logprobs
from support.servers import TRAINER_DIES_MID_PUSH, killed_mid_push, local_server
from transformers import AutoModelForCausalLM

from pipeline.generation.client import ServerError
from pipeline.sync.weight_sync import WeightSync, WeightSyncError
from pipeline.task.data import prompt_token_ids, read_jsonl


def connect(server, model, **kw) -> WeightSync:
    sync = WeightSync(model, 0, 0, torch.device("cpu"), server.client, host="127.0.0.1", **kw)
    sync.connect()
    return sync


def check_pushes_land(server, model_dir, prompt, version0, bucket_bytes, shared_memory):
    """Three pushes in a row; each time the server's logprobs == HF logprobs of the pushed weights and
    every tensor verifies by checksum. The first push makes the (shared) server serve `model_dir`.
    The bytes go through the shared-memory file (`shared_memory`) or through gloo itself."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sync = connect(server, model, timeout_s=60, bucket_bytes=bucket_bytes, shared_memory=shared_memory)
    try:
        assert sync.backend == "gloo"
        stats = sync.push(version0 + 1)
        assert stats["shared_memory"] == float(shared_memory)
        # every parameter verified: the worker's digests of its parameters or, for the linear weights
        # vLLM-CPU hides, the digests our engine took on receipt
        assert set(sync.verified_names) == {n for n, _ in model.named_parameters()}
        assert stats["verified_bytes_frac"] == 1.0 and stats["verified_tensors"] > 0
        assert any(
            name.endswith("o_proj.weight") for name in sync.verified_names
        )  # hidden in vLLM-CPU's params
        assert any(name.endswith("norm.weight") for name in sync.verified_names)  # the loaded parameter's
        completion = server.client.generate([prompt], n=1, max_tokens=24, seed=0)["results"][0][
            "completions"
        ][0]
        completion = completion["token_ids"]
        before = torch.tensor(server.client.score([(prompt, completion)])["logprobs"][0])
        assert (before - hf_logprobs(model, prompt, completion)).abs().max() <= 1e-3
        for version in (version0 + 2, version0 + 3):
            perturb(model, seed=version)
            stats = sync.push(version)
            assert stats["bytes"] > 0 and stats["verified_tensors"] > 0
            scored = server.client.score([(prompt, completion)])
            assert scored["version"] == version
            after = torch.tensor(scored["logprobs"][0])
            assert (after - hf_logprobs(model, prompt, completion)).abs().max() <= 1e-3
            assert (after - before).abs().max() > 1e-2, "the push did not change the served weights"
            before = after
            assert server.client.health()["version"] == version
            assert server.client.generate([prompt], n=2, max_tokens=4, seed=0)["version"] == version
    finally:
        sync.close()


@pytest.fixture(scope="module")
def prompt(gsm8k_dir, tiny_tokenizer):
    return prompt_token_ids(tiny_tokenizer, read_jsonl(gsm8k_dir / "test.jsonl")[0])


def test_push_tied_model_in_many_small_buckets(server, tiny_model_dir, prompt):
    # 4 KiB buckets: every layer spans several, the production path of a large model; trainer and
    # server share this host, so the bytes go through the shared-memory file
    check_pushes_land(
        server,
        tiny_model_dir,
        prompt,
        server.client.health()["version"],
        bucket_bytes=4096,
        shared_memory=True,
    )


@pytest.fixture(scope="module")
def untied_server(tiny_untied_model_dir, tmp_path_factory):
    proc = local_server(tiny_untied_model_dir, tmp_path_factory.mktemp("untied-server"))
    yield proc
    proc.stop()


def test_push_untied_model_in_many_small_buckets(untied_server, tiny_untied_model_dir, prompt):
    # the bytes through gloo itself (engines on other hosts; sync.shared_memory=false)
    check_pushes_land(untied_server, tiny_untied_model_dir, prompt, 0, bucket_bytes=8192, shared_memory=False)


def exits_within(server, seconds: float) -> float:
    """Wait for the server process to end by itself; returns how long it took."""
    start = time.monotonic()
    while server.proc.poll() is None:
        assert time.monotonic() - start < seconds, f"the server still runs after {seconds:.0f}s"
        time.sleep(0.5)
    return time.monotonic() - start


@pytest.mark.integration
def test_a_worker_that_never_answers_ends_the_server(tiny_untied_model_dir, tmp_path):
    """SIGSTOP the server's vLLM worker alone: the API process and the engine core are alive, the worker
    never answers (what a worker stuck in a collective looks like). The trainer's push fails within its
    sync.timeout_s; the server says 503 on /health once the update has been open past sync.timeout_s
    (vLLM gives that RPC no deadline with one worker), and exits by itself, for the launcher's
    server.restart to replace."""
    import os
    import signal

    import psutil

    timeout_s = 8
    server = local_server(tiny_untied_model_dir, tmp_path, "--set", f"sync.timeout_s={timeout_s}")
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir, dtype=torch.float32)
        sync = connect(server, model, timeout_s=timeout_s)
        version = server.client.health()["version"]
        workers = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if not p.children()]
        assert workers, "no vLLM worker process found"
        for worker in workers:
            os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match=f"version {version + 1}"):
            sync.push(version + 1)
        assert time.monotonic() - start < timeout_s + 5
        statuses = []
        while server.proc.poll() is None and time.monotonic() - start < 3 * timeout_s + 40:
            try:
                statuses.append(
                    server.client.session.get(server.client.base_url + "/health", timeout=5).status_code
                )
            except Exception:  # noqa: BLE001 - the server going away
                pass
            time.sleep(0.5)
        exits_within(server, 1)
        assert 503 in statuses and statuses[-1] == 503, statuses
    finally:
        server.stop()


@pytest.mark.integration
def test_trainer_dying_mid_push_tears_the_weights_until_a_full_push(tiny_untied_model_dir, prompt, tmp_path):
    """The trainer dies after several buckets have landed: the workers' receive fails, vLLM ends its
    session with some layers new, some old, some mid-reload. The server stays up but serves nothing
    (version -1, 503) until a full push, which must load every layer from its own bytes alone: the
    repairing push carries other weights than the broken one, so a layer still holding the broken
    push's tensors would fail its checksum and the logprob probe."""
    import subprocess
    import sys

    server = local_server(tiny_untied_model_dir, tmp_path)
    try:
        version = server.client.health()["version"]
        died = subprocess.run(
            [
                sys.executable,
                "-c",
                TRAINER_DIES_MID_PUSH,
                server.client.base_url,
                server.token,
                str(tiny_untied_model_dir),
                str(version + 1),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert died.returncode == 17, died.stderr[-2000:]
        end = time.monotonic() + 60
        while not server.client.health().get("torn"):
            assert time.monotonic() < end, "the server never noticed the broken-off push"
            time.sleep(0.5)
        assert server.proc.poll() is None and server.client.health()["version"] == -1
        with pytest.raises(ServerError, match="no weights to serve until a full push") as refused:
            server.client.generate([prompt], n=1, max_tokens=4, seed=0)
        assert refused.value.status == 503
        log = (tmp_path / "server.log").read_text()
        assert "weights torn" in log and "server unusable" not in log, log[-3000:]

        model = AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir, dtype=torch.float32)
        perturb(model, seed=11)
        sync = connect(server, model, timeout_s=60, bucket_bytes=4096)
        try:
            stats = sync.push(version + 2)
        finally:
            sync.close()
        assert set(sync.verified_names) == {n for n, _ in model.named_parameters()}
        assert stats["verified_bytes_frac"] == 1.0
        health = server.client.health()
        assert health["version"] == version + 2 and not health["torn"]
        completion = server.client.generate([prompt], n=1, max_tokens=16, seed=0)["results"][0][
            "completions"
        ][0]
        served = torch.tensor(server.client.score([(prompt, completion["token_ids"])])["logprobs"][0])
        assert (served - hf_logprobs(model, prompt, completion["token_ids"])).abs().max() <= 1e-3
    finally:
        server.stop()


def test_checksums_catch_a_push_that_did_not_land(server, tiny_model_dir, monkeypatch):
    """Sabotage the data plane (the trainer sends other bytes than it hashes): the push must fail."""
    from pipeline.sync import gloo_transfer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    sync = connect(server, model, timeout_s=60)
    real = gloo_transfer.GlooTrainerWeightTransferEngine._broadcast

    def corrupting(self, pairs, *rest):
        def bent():
            for name, tensor in pairs:
                yield name, (tensor + 1.0 if name.endswith("o_proj.weight") else tensor)

        return real(self, bent(), *rest)

    monkeypatch.setattr(gloo_transfer.GlooTrainerWeightTransferEngine, "_broadcast", corrupting)
    try:
        version = server.client.health()["version"] + 1
        with pytest.raises(WeightSyncError, match="checksum mismatch.*o_proj"):
            sync.push(version)
        monkeypatch.undo()
        assert sync.push(version + 1)["verified_tensors"] > 0  # the same group still works afterwards
    finally:
        sync.close()


def test_server_killed_mid_push_raises_within_timeout(untied_server, tiny_untied_model_dir):
    """Runs last in this module: it kills the module's server after the first buckets have landed."""
    model = AutoModelForCausalLM.from_pretrained(tiny_untied_model_dir, dtype=torch.float32)
    timeout_s = 10
    sync = connect(untied_server, model, timeout_s=timeout_s, bucket_bytes=4096)
    start = time.monotonic()
    with killed_mid_push(sync, untied_server.kill) as killed, pytest.raises(WeightSyncError) as err:
        sync.push(5)
    elapsed = time.monotonic() - start
    assert killed.is_set()
    assert elapsed < timeout_s + 5, f"took {elapsed:.1f}s"
    assert "version 5" in str(err.value)


# --- the shared-memory file: only the trainer's own, never a SIGBUS ---------------------------------


def test_a_worker_uses_the_shared_file_only_when_it_is_the_trainers(tmp_path):
    from pipeline.sync.gloo_transfer import SharedBuckets

    shared = SharedBuckets.create()
    try:
        assert shared.reserve(4096)
        shared.view(0, 4096).copy_(torch.arange(4096) % 251)
        seen = SharedBuckets.open(shared.path, shared.nonce)
        assert seen is not None and torch.equal(seen.view(100, 10), torch.arange(100, 110) % 251)
        seen.close()
        assert (
            SharedBuckets.open(shared.path, "another trainer's nonce") is None
        )  # a same-named file elsewhere
        assert SharedBuckets.open(str(tmp_path / "absent"), shared.nonce) is None  # another host
        shared.unlink()  # after the group formed: a killed trainer leaves nothing in /dev/shm
        assert not os.path.exists(shared.path) and torch.equal(
            shared.view(0, 3), torch.tensor([0, 1, 2], dtype=torch.uint8)
        )
    finally:
        shared.close()


def test_a_full_dev_shm_sends_through_gloo_instead(monkeypatch):
    from pipeline.sync.gloo_transfer import SharedBuckets

    shared = SharedBuckets.create()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    try:
        assert shared.reserve(2**20) is False
    finally:
        shared.close()


def test_init_info_names_only_our_shared_files():
    from pipeline.sync.gloo_transfer import GlooWeightTransferInitInfo

    base = {"master_address": "127.0.0.1", "master_port": 29500, "world_size": 2}
    GlooWeightTransferInitInfo(**base, shm_path="/dev/shm/grpo-weights-abc", shm_nonce="x")
    for path in ("/etc/passwd", "relative/grpo-weights-x", "/dev/shm/other"):
        with pytest.raises(ValueError, match="shm_path"):
            GlooWeightTransferInitInfo(**base, shm_path=path)


# --- what each tensor-parallel rank holds, against vLLM's own weight loaders on CPU ---------------------


def vllm_shards(monkeypatch, tp: int, rank: int, hf: dict, heads: int, kv_heads: int, head_dim: int) -> dict:
    """Load the HF tensors into vLLM's own parallel layers built as rank `rank` of `tp` would build them
    (vLLM's tensor-parallel rank and size patched where its layers read them), as a model loads them."""
    import vllm.distributed as vllm_distributed
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    import vllm.model_executor.parameter as parameter
    from vllm.config import VllmConfig, set_current_vllm_config

    for module in (linear, parameter, vocab, vllm_distributed):
        for fn, value in (
            ("get_tensor_model_parallel_world_size", tp),
            ("get_tensor_model_parallel_rank", rank),
        ):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, lambda value=value: value)
    hidden, inter = hf["q_proj"].shape[1], hf["gate_proj"].shape[0]
    kw = {"params_dtype": torch.float32}
    with set_current_vllm_config(VllmConfig()):
        qkv = linear.QKVParallelLinear(hidden, head_dim, heads, kv_heads, bias=True, **kw)
        gate_up = linear.MergedColumnParallelLinear(hidden, [inter, inter], bias=False, **kw)
        o = linear.RowParallelLinear(heads * head_dim, hidden, bias=True, **kw)
        down = linear.RowParallelLinear(inter, hidden, bias=False, **kw)
        embed = vocab.VocabParallelEmbedding(hf["embed_tokens"].shape[0], hidden, **kw)
    for shard_id, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
        qkv.weight_loader_v2(qkv.weight, hf[name], shard_id)
        qkv.weight_loader(qkv.bias, hf[name + ".bias"], shard_id)
    for shard_id, name in ((0, "gate_proj"), (1, "up_proj")):
        gate_up.weight_loader_v2(gate_up.weight, hf[name], shard_id)
    o.weight_loader_v2(o.weight, hf["o_proj"])
    o.weight_loader(o.bias, hf["o_proj.bias"])
    down.weight_loader_v2(down.weight, hf["down_proj"])
    embed.weight_loader(embed.weight, hf["embed_tokens"])
    return {
        "layers.0.self_attn.qkv_proj.weight": qkv.weight,
        "layers.0.self_attn.qkv_proj.bias": qkv.bias,
        "layers.0.mlp.gate_up_proj.weight": gate_up.weight,
        "layers.0.self_attn.o_proj.weight": o.weight,
        "layers.0.self_attn.o_proj.bias": o.bias,
        "layers.0.mlp.down_proj.weight": down.weight,
        "embed_tokens.weight": embed.weight,
    }


@pytest.mark.parametrize("tp,heads,kv_heads", [(1, 4, 2), (2, 4, 2), (4, 4, 2), (4, 8, 1), (2, 8, 8)])
def test_each_ranks_shard_is_what_vllm_loads(monkeypatch, tp, heads, kv_heads):
    """pipeline/sync/shards.py's shard of every kind of parameter (qkv with KV heads split or replicated,
    merged gate|up, row-parallel weight and its whole bias, the padded vocabulary) equals, byte for byte,
    what vLLM's own loaders put on that rank."""
    from pipeline.sync.digest import tensor_digest
    from pipeline.sync.shards import Heads, worker_shards

    head_dim, hidden, inter, vocab = 16, 64, 96, 1000  # 1000 rows: padded to 1024
    g = torch.Generator().manual_seed(0)
    hf = {
        "q_proj": torch.randn(heads * head_dim, hidden, generator=g),
        "k_proj": torch.randn(kv_heads * head_dim, hidden, generator=g),
        "v_proj": torch.randn(kv_heads * head_dim, hidden, generator=g),
        "gate_proj": torch.randn(inter, hidden, generator=g),
        "up_proj": torch.randn(inter, hidden, generator=g),
        "o_proj": torch.randn(hidden, heads * head_dim, generator=g),
        "o_proj.bias": torch.randn(hidden, generator=g),
        "down_proj": torch.randn(hidden, inter, generator=g),
        "embed_tokens": torch.randn(vocab, hidden, generator=g),
    }
    for name in ("q_proj", "k_proj", "v_proj"):
        hf[name + ".bias"] = torch.randn(hf[name].shape[0], generator=g)
    named = {
        "embed_tokens.weight": hf["embed_tokens"],
        "layers.0.mlp.down_proj.weight": hf["down_proj"],
        "layers.0.self_attn.o_proj.weight": hf["o_proj"],
        "layers.0.self_attn.o_proj.bias": hf["o_proj.bias"],
        **{
            f"layers.0.self_attn.{n}.{kind}": hf[n + (".bias" if kind == "bias" else "")]
            for n in ("q_proj", "k_proj", "v_proj")
            for kind in ("weight", "bias")
        },
        **{f"layers.0.mlp.{n}.weight": hf[n] for n in ("gate_proj", "up_proj")},
    }
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for rank in range(tp):
        loaded = vllm_shards(monkeypatch, tp, rank, hf, heads, kv_heads, head_dim)
        ours = worker_shards(named, packed, Heads(heads, kv_heads), rank, tp)
        assert set(ours) == set(loaded)
        for name, param in loaded.items():
            assert list(ours[name][0].shape) == list(param.shape), (name, rank)
            assert tensor_digest(ours[name][0]) == tensor_digest(param.data), (name, rank, tp)


def test_the_checksum_sample_moves_on_and_keeps_both_ends():
    """A model larger than sync.verify_mb: every push verifies the first and the last layer group, and
    a window of the layers between that moves on, so every tensor is verified within a bounded number of
    pushes; a model that fits is verified whole."""
    from vllm.distributed.weight_transfer.base import ParamMeta

    from pipeline.sync.weight_sync import checksum_sample

    names = (
        ["model.embed_tokens.weight"]
        + [f"model.layers.{i}.{p}.weight" for i in range(10) for p in ("self_attn.qkv_proj", "mlp.down_proj")]
        + ["model.norm.weight"]
    )
    metas = [ParamMeta(n, torch.float32, (256, 256)) for n in names]
    one = 256 * 256 * 4
    assert checksum_sample(metas, len(names) * one, version=0) == names
    seen = set()
    for version in range(5):
        sample = checksum_sample(metas, 6 * one, version)  # the two ends + 2 layers of 2 tensors each
        assert sample[0] == names[0] and sample[-1] == names[-1] and len(sample) == 6
        seen.update(sample)
    assert seen == set(names)  # 10 layers, 2 per push: all within 5 pushes


def test_the_ipc_buffer_holds_the_largest_tensor():
    """vLLM's packed IPC producer raises on a tensor larger than its buffer: a Llama-3-size embedding
    (128256 x 2048 in bf16, 525 MB) must fit the buffer whatever sync.bucket_mb says."""
    from types import SimpleNamespace

    from vllm.distributed.weight_transfer.base import ParamMeta

    from pipeline.sync.weight_sync import TRAINER_INIT_INFO

    metas = [
        ParamMeta("model.embed_tokens.weight", torch.bfloat16, (128256, 2048)),
        ParamMeta("model.norm.weight", torch.bfloat16, (2048,)),
    ]
    sync = SimpleNamespace(source=SimpleNamespace(metadata=lambda: metas), bucket_bytes=256 * 2**20, rank=0)
    assert TRAINER_INIT_INFO["ipc"](sync, world_size=2).packed_buffer_size_bytes == 128256 * 2048 * 2
    sync.bucket_bytes = 2**30
    assert TRAINER_INIT_INFO["ipc"](sync, world_size=2).packed_buffer_size_bytes == 2**30


def test_ipc_handles_travel_as_json():
    import base64
    import json
    import pickle

    from pipeline.sync.weight_sync import json_safe_update_info

    plain = {"names": ["a"], "dtype_names": ["float32"], "shapes": [[2]]}
    assert json_safe_update_info(plain) is plain
    handles = [{"gpu-uuid": ("rebuild", (1, 2, b"\x00\x01"))}]
    sent = json.loads(json.dumps(json_safe_update_info({**plain, "ipc_handles": handles})))
    assert (
        "ipc_handles" not in sent and pickle.loads(base64.b64decode(sent["ipc_handles_pickled"])) == handles
    )


# --- a failed ZeRO-3 push: every rank leaves it having done the same gathers ------------------------

ZERO3_PUSH_FAILS = r"""
import json, os, sys, threading, time
from datetime import timedelta
import deepspeed, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM, Qwen2Config
from pipeline.sync.gloo_transfer import GlooTrainerWeightTransferEngine
from pipeline.generation.client import ServerClient, free_port
from pipeline.sync.weight_sync import ModelSource, ServerSyncClient, WeightSync, WeightSyncError
from pipeline.trainer.loop import release_shm_name

TIMEOUT_S, AT, LATE_S = 2.0, 5, 3.5
deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=30))
rank, cpu = dist.get_rank(), torch.device("cpu")
release_shm_name(rank)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(Qwen2Config(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, tie_word_embeddings=False))
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config={
    "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
module = engine.module
assert all(p.numel() == 0 for p in module.parameters()), "not partitioned"
reference = dict(iter(ModelSource(module, 3, rank == 0, torch.float32, cpu)))

# Every gather this rank enters, with the thread that entered it. Rank 1 can arrive late at one of
# them, so that rank 0's push thread sits inside that gather's collective when its deadline fires.
gathers, late = [], {}
Real = deepspeed.zero.GatheredParameters


class Counted(Real):
    def __enter__(self):
        index = sum(1 for _, s in gathers if s == scenario)
        if rank == 1 and late.get(scenario) == index:
            time.sleep(LATE_S)
        gathers.append((threading.get_ident(), scenario))
        return super().__enter__()


deepspeed.zero.GatheredParameters = Counted


class Sender:
    # Rank 0's consumer of the source, as a transfer engine's broadcast: `stall` stops after that many
    # tensors (a broadcast into a stuck server) until released; `refuse` fails before the pass begins.
    def __init__(self, source, stall=None, refuse=False):
        self.source, self.stall, self.refuse = source, stall, refuse
        self.release, self.done, self.error = threading.Event(), threading.Event(), None

    def send_weights(self):
        try:
            if self.refuse:
                raise ConnectionError("the server refused /weights/start")
            for i, _ in enumerate(self.source):
                if i == self.stall:
                    self.release.wait()
        except Exception as e:
            self.error = e
            raise
        finally:
            self.done.set()


results, main = {}, threading.get_ident()
for scenario, kw in [("stall", {"stall": AT}), ("late", {}), ("refused", {"refuse": True})]:
    late[scenario] = AT if scenario == "late" else None
    sync = WeightSync(module, 3, rank, cpu, None, host="127.0.0.1", timeout_s=TIMEOUT_S)
    sync.source = ModelSource(module, 3, rank == 0, torch.float32, cpu, chunk_bytes=1)  # a gather per tensor
    sync.transfer = consumer = (Sender(sync.source, **kw) if rank == 0 else GlooTrainerWeightTransferEngine(
        client=None, source=sync.source, is_sender=False, bucket_bytes=2**20, timeout_s=TIMEOUT_S))
    if rank == 0:  # after the failure rank 0 aborts the update: nothing listens there
        sync.sync_client = ServerSyncClient(ServerClient(f"http://127.0.0.1:{free_port('127.0.0.1')}"), TIMEOUT_S)
    start = time.monotonic()
    try:
        sync.push(1)
        raised = None
    except WeightSyncError as e:
        raised = str(e)
    seconds = time.monotonic() - start
    out = {"raised": raised, "seconds": seconds}
    if rank == 0:  # the abandoned thread resumes (its broadcast returns): it must gather nothing more
        before = len(gathers)
        consumer.release.set()
        out["consumer_ended"] = consumer.done.wait(10)
        out["gathers_after_release"] = len(gathers) - before
        out["consumer_error"] = repr(consumer.error)
    mine = [thread for thread, s in gathers if s == scenario]
    out.update(gathers=len(mine), by_main=sum(t == main for t in mine))
    results[scenario] = out
    print(f"rank {rank}: {scenario}: {out}", file=sys.stderr, flush=True)
    dist.barrier()

# The ranks' next collectives still pair up: a full pass gathers the same weights as before.
final = dict(iter(ModelSource(module, 3, rank == 0, torch.float32, cpu)))
everyone = [None, None]
dist.all_gather_object(everyone, results)
if rank == 0:
    assert final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in final)
    print("RESULT " + json.dumps({"ranks": everyone, "tensors": len(reference)}), flush=True)
dist.barrier()
dist.destroy_process_group()
# The abandoned pushes' daemon threads may still hold gloo state: without this, the interpreter's teardown
# can abort the process ("terminate called without an active exception") after every check passed.
os._exit(0)
"""


@pytest.mark.integration
def test_a_failed_zero3_push_leaves_every_rank_with_the_same_gathers(tmp_path):
    """Two ranks under real ZeRO-3 (gloo, CPU). Rank 0 pushes under its deadline in a thread while rank
    1 iterates the source in its main thread (each gather a collective on both). The push fails three
    ways on rank 0: its consumer stalls between tensors (a broadcast into a stuck server); its thread
    sits inside a gather when the deadline fires (rank 1 arrives late); its consumer fails before the
    pass begins. Each time both ranks leave the push within the deadline, with the error, having
    done every gather once; rank 0's main thread did exactly those its abandoned thread had not,
    and that thread, when it resumes, gathers nothing more and ends with an error (not a pass that
    looks complete). The ranks' collectives still pair up afterwards."""
    import json
    import subprocess
    import sys

    from support.constants import RUN_TAG

    from pipeline.generation.client import free_port

    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port("127.0.0.1")),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        RUN_TAG: str(tmp_path),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ZERO3_PUSH_FAILS],
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=120))
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    line = next(x for x in outputs[0][0].splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    ranks, total = result["ranks"], result["tensors"]
    for scenario, consumer_did in (("stall", 6), ("late", 6), ("refused", 0)):
        zero, one = ranks[0][scenario], ranks[1][scenario]
        assert (
            "server refused" if scenario == "refused" else "no progress within sync.timeout_s=2s"
        ) in zero["raised"], zero
        assert one["raised"] == zero["raised"] is not None, (scenario, zero, one)
        assert zero["gathers"] == one["gathers"] == total, (scenario, zero, one)
        assert one["by_main"] == total
        assert zero["by_main"] == total - consumer_did, (scenario, zero)
        assert zero["consumer_ended"] and zero["gathers_after_release"] == 0, (scenario, zero)
        assert zero["consumer_error"].startswith(
            "ConnectionError" if scenario == "refused" else "PassAbandoned("
        ), zero
        assert max(zero["seconds"], one["seconds"]) < 10, (scenario, zero, one)
