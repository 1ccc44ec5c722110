"""Weight-sync benchmark: push a ~100M-parameter model into a running server.

    make bench-sync      (python bench/sync.py [--layers 8 --hidden 1024] [--repeats 3] [--engines 2])

Pushes through vLLM's weight-transfer API with our gloo engine (the CPU path). Compares, in one
run on one machine: bucketed push (sync.bucket_mb), one bucket per tensor (what per-parameter sync
costs), and a plain in-process torch copy of the same bytes (the practical limit); reports the
checksum verification's share of each push. With `--engines N` it also pushes into N engines at once
(one transfer group: the `server.data_parallel_size` layout) and reports the time against one engine.

It also measures what verifying a push costs at prem-1B's scale (`verify_cost`, alone with
`--verify-cost-only`): the sample a push of prem-1B checks (embedding and lm_head 32004 x 2048, the final
norm and one decoder layer: hidden 2048, intermediate 5632, 32 heads, 4 KV heads; 350 MB in bf16),
digested the old way (sha256 of its bytes on the host, after a copy off the device) and with
`tensor_digest` (pipeline/sync/digest.py: torch on a GPU, numpy on a CPU tensor's memory): on the CPU
in fp32 and bf16, and in bf16 on a GPU when there is one; seconds per digest of the sample and, for a
push (which digests the sample twice, one after the other: the workers' loaded copy, then the
trainer's), as a fraction of a 2.5 s prem-1B step on GPUs (on the CPU rows only a yardstick).
Writes bench/results-sync.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))  # the test suite's library: its one way to start a local server

from support.servers import local_server  # noqa: E402

from pipeline.embedded.tiny_model import build_tiny_model  # noqa: E402
from pipeline.generation.engines import Engines  # noqa: E402
from pipeline.sync.digest import tensor_digest  # noqa: E402
from pipeline.sync.weight_sync import WeightSync  # noqa: E402

# prem-1B (launch/memory.py KNOWN_MODELS): what its checksum sample holds at sync.verify_mb 64: the two
# ends (embedding; final norm and lm_head) and one decoder layer
PREM_1B_SAMPLE = {
    "model.embed_tokens.weight": (32004, 2048),
    "lm_head.weight": (32004, 2048),
    "model.norm.weight": (2048,),
    **{
        f"model.layers.0.{name}.weight": shape
        for name, shape in [
            ("self_attn.q_proj", (2048, 2048)),
            ("self_attn.k_proj", (256, 2048)),
            ("self_attn.v_proj", (256, 2048)),
            ("self_attn.o_proj", (2048, 2048)),
            ("mlp.gate_proj", (5632, 2048)),
            ("mlp.up_proj", (5632, 2048)),
            ("mlp.down_proj", (2048, 5632)),
            ("input_layernorm", (2048,)),
            ("post_attention_layernorm", (2048,)),
        ]
    },
}
STEP_S = 2.5  # a prem-1B step on the GPUs (issue #30): what the verification is measured against


def sha256_on_host(tensor: torch.Tensor) -> str:
    """The digest before pipeline/sync/digest.py: sha256 of the bytes, copied to the host first."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def digest_seconds(tensors: list[torch.Tensor], fn, repeats: int) -> float:
    """Median seconds to digest all of `tensors` with `fn` (after one warm-up pass)."""
    times = []
    for _ in range(repeats + 1):
        if tensors[0].is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for t in tensors:
            fn(t)  # both return a str: the device work is done when they return
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def verify_cost(repeats: int) -> dict:
    """The old and the new digest of prem-1B's checksum sample, on the CPU (fp32, bf16) and on a GPU."""
    nbytes = {
        dtype: sum(torch.Size(s).numel() for s in PREM_1B_SAMPLE.values()) * dtype.itemsize
        for dtype in (torch.float32, torch.bfloat16)
    }
    out = {
        "sample": "prem-1B: embedding + lm_head 32004 x 2048, final norm, one decoder layer (hidden 2048, "
        "intermediate 5632, 32 heads, 4 KV heads)",
        "tensors": len(PREM_1B_SAMPLE),
        "bytes_bf16": nbytes[torch.bfloat16],
        "step_s": STEP_S,
        "per_push": "2 x the sample (the workers', then the trainer's)",
    }
    places = [("cpu", torch.float32), ("cpu", torch.bfloat16)]
    if torch.cuda.is_available():
        places.append(("cuda", torch.bfloat16))
        out["cuda_device"] = torch.cuda.get_device_name(0)
    g = torch.Generator().manual_seed(0)
    for device, dtype in places:
        tensors = [
            torch.randn(shape, generator=g).to(device=device, dtype=dtype)
            for shape in PREM_1B_SAMPLE.values()
        ]
        old = digest_seconds(tensors, sha256_on_host, repeats)
        new = digest_seconds(tensors, tensor_digest, repeats)
        out[f"{device}_{str(dtype).removeprefix('torch.')}"] = {
            "bytes": nbytes[dtype],
            "tensor_digest_runs": "numpy on the tensor's host memory"
            if device == "cpu"
            else "torch on the GPU",
            "sha256_host_s": old,
            "tensor_digest_s": new,
            "speedup": old / new,
            "sha256_host_push_frac_of_step": 2 * old / STEP_S,
            "tensor_digest_push_frac_of_step": 2 * new / STEP_S,
        }
        del tensors
    return out


def print_verify_cost(cost: dict) -> None:
    print(
        f"\nverifying a push at prem-1B scale: {cost['tensors']} tensors, {cost['bytes_bf16'] / 1e6:.0f} MB in bf16, "
        f"digested twice per push; a push's fraction of a {cost['step_s']} s prem-1B GPU step"
    )
    print(
        f"{'where':<18}{'MB':>7}{'sha256 host s':>15}{'tensor_digest s':>17}{'x':>7}{'push/step old':>15}{'new':>8}"
    )
    for key, r in cost.items():
        if isinstance(r, dict):
            print(
                f"{key:<18}{r['bytes'] / 1e6:>7.0f}{r['sha256_host_s']:>15.3f}{r['tensor_digest_s']:>17.3f}"
                f"{r['speedup']:>7.1f}{r['sha256_host_push_frac_of_step']:>15.1%}{r['tensor_digest_push_frac_of_step']:>8.1%}"
            )


def inprocess_copy_s(tensors: list[torch.Tensor]) -> float:
    targets = [torch.empty_like(t) for t in tensors]
    start = time.perf_counter()
    for dst, src in zip(targets, tensors, strict=True):
        dst.copy_(src)
    return time.perf_counter() - start


def measure_pushes(model, engines, bucket_bytes: int, repeats: int, nbytes: int) -> dict:
    """`repeats` pushes (after one warm-up push, which pays one-time allocation) into `engines`."""
    sync = WeightSync(
        model, 0, 0, torch.device("cpu"), engines, host="127.0.0.1", timeout_s=120, bucket_bytes=bucket_bytes
    )
    sync.connect()
    times, verify = [], []
    for version in range(1, repeats + 2):
        stats = sync.push(version)
        times.append(stats["seconds"])
        verify.append(stats["verify_s"])
    sync.close()
    steady = times[1:]
    return {
        "seconds_median": statistics.median(steady),
        "seconds": steady,
        "verify_s_median": statistics.median(verify[1:]),
        "verified_tensors": stats["verified_tensors"],
        "gb_per_s": nbytes / statistics.median(steady) / 1e9,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--engines", type=int, default=1, help="also push into this many engines at once")
    parser.add_argument("--out", default=str(REPO / "bench" / "results-sync.json"))
    parser.add_argument(
        "--verify-cost-only",
        action="store_true",
        help="only the digest cost of prem-1B's checksum sample (no server; updates --out)",
    )
    args = parser.parse_args()
    if args.verify_cost_only:
        cost = verify_cost(args.repeats)
        out = Path(args.out)
        results = json.loads(out.read_text()) if out.exists() else {}  # a full run's push numbers stay
        out.write_text(json.dumps({**results, "verify_cost": cost}, indent=2) + "\n")
        print_verify_cost(cost)
        return 0

    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    corpus = ["Natalia sold 48 clips in April and half as many in May. <reasoning> <answer>"] * 50
    model_dir = build_tiny_model(
        work / "model",
        corpus,
        vocab_size=512,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 256),
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = list(model.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for _, p in params)
    servers = []
    for i in range(args.engines):
        # one core each, as the launcher pins several engines
        env = {"VLLM_CPU_OMP_THREADS_BIND": str(i % (os.cpu_count() or 1))} if args.engines > 1 else {}
        servers.append(
            local_server(
                model_dir,
                work,
                settings=("--set", "server.kv_cache_gib=1"),
                env=env,
                log_name=f"server-{i}.log",
                healthy_within=None,
            )
        )  # loading side by side
    try:
        clients = [server.wait_healthy(300) for server in servers]
        client = clients[0]
        results = {"params": sum(p.numel() for _, p in params), "bytes": nbytes, "dtype": "float32"}
        for label, bucket_bytes in (("bucketed", args.bucket_mb * 2**20), ("per_tensor", 1)):
            # bucket_bytes=1: every tensor in a bucket of its own
            results[label] = measure_pushes(model, client, bucket_bytes, args.repeats, nbytes)
        copy = statistics.median(
            inprocess_copy_s([p.detach() for _, p in params]) for _ in range(args.repeats)
        )
        results["inprocess_copy"] = {"seconds_median": copy, "gb_per_s": nbytes / copy / 1e9}
        results["bucketed_vs_copy"] = results["bucketed"]["gb_per_s"] / results["inprocess_copy"]["gb_per_s"]
        if args.engines > 1:
            label = f"{args.engines}_engines"
            results[label] = measure_pushes(
                model, Engines.of(clients), args.bucket_mb * 2**20, args.repeats, nbytes
            )
            results[f"{label}_vs_1"] = (
                results[label]["seconds_median"] / results["bucketed"]["seconds_median"]
            )
    finally:
        for server in servers:
            server.stop()
    results["verify_cost"] = verify_cost(args.repeats)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nweight sync, {results['params'] / 1e6:.0f}M params, {nbytes / 1e6:.0f} MB fp32, gloo on CPU")
    print(f"{'method':<16}{'s/push':>10}{'GB/s':>10}{'verify s':>10}")
    for label in ("bucketed", "per_tensor", "inprocess_copy", f"{args.engines}_engines"):
        if label not in results:
            continue
        r = results[label]
        print(
            f"{label:<16}{r['seconds_median']:>10.3f}{r['gb_per_s']:>10.2f}{r.get('verify_s_median', 0):>10.3f}"
        )
    print(f"bucketed / in-process copy bandwidth: {results['bucketed_vs_copy']:.1%}   -> {args.out}")
    if args.engines > 1:
        print(f"{args.engines} engines / 1 engine push time: {results[f'{args.engines}_engines_vs_1']:.2f}x")
    print_verify_cost(results["verify_cost"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
