"""Weight-sync benchmark: push a ~100M-parameter model into a running server.

    make bench-sync      (python bench/sync.py [--layers 8 --hidden 1024] [--repeats 3] [--engines 2])

Pushes through vLLM's weight-transfer API with our gloo engine (the CPU path). Compares, in one
run on one machine: bucketed push (sync.bucket_mb), one bucket per tensor (what per-parameter sync
costs), and a plain in-process torch copy of the same bytes (the practical limit); reports the
checksum verification's share of each push. With `--engines N` it also pushes into N engines at once
(one transfer group: the `server.data_parallel_size` layout) and reports the time against one engine.
Writes bench/results-sync.json.
"""

from __future__ import annotations

import argparse
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

from pipeline.embedded.tiny_model import build_tiny_model  # noqa: E402
from pipeline.generation.client import free_port  # noqa: E402
from pipeline.generation.engines import Engines  # noqa: E402
from pipeline.generation.server_process import ServerProcess  # noqa: E402
from pipeline.sync.weight_sync import WeightSync  # noqa: E402


def inprocess_copy_s(tensors: list[torch.Tensor]) -> float:
    targets = [torch.empty_like(t) for t in tensors]
    start = time.perf_counter()
    for dst, src in zip(targets, tensors, strict=True):
        dst.copy_(src)
    return time.perf_counter() - start


def measure_pushes(model, engines, bucket_bytes: int, repeats: int, nbytes: int) -> dict:
    """`repeats` pushes (after one warm-up push, which pays one-time allocation) into `engines`."""
    sync = WeightSync(model, 0, 0, torch.device("cpu"), engines, host="127.0.0.1", timeout_s=120,
                      bucket_bytes=bucket_bytes)
    sync.connect()
    times, verify = [], []
    for version in range(1, repeats + 2):
        stats = sync.push(version)
        times.append(stats["seconds"])
        verify.append(stats["verify_s"])
    sync.close()
    steady = times[1:]
    return {"seconds_median": statistics.median(steady), "seconds": steady,
            "verify_s_median": statistics.median(verify[1:]), "verified_tensors": stats["verified_tensors"],
            "gb_per_s": nbytes / statistics.median(steady) / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=256)
    parser.add_argument("--engines", type=int, default=1, help="also push into this many engines at once")
    parser.add_argument("--out", default=str(REPO / "bench" / "results-sync.json"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    corpus = ["Natalia sold 48 clips in April and half as many in May. <reasoning> <answer>"] * 50
    model_dir = build_tiny_model(work / "model", corpus, vocab_size=512, hidden_size=args.hidden,
                                 intermediate_size=args.hidden * 11 // 4, num_layers=args.layers,
                                 num_heads=args.hidden // 64, num_kv_heads=max(1, args.hidden // 256),
                                 tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    params = list(model.named_parameters())
    nbytes = sum(p.numel() * p.element_size() for _, p in params)
    servers = []
    for i in range(args.engines):
        port = free_port("127.0.0.1")
        # one core each, as the launcher pins several engines
        env = {"VLLM_CPU_OMP_THREADS_BIND": str(i % (os.cpu_count() or 1))} if args.engines > 1 else {}
        servers.append(ServerProcess(["--model", str(model_dir), "--port", str(port), "--set", "server.kv_cache_gib=1"],
                                     work / f"server-{i}.log", "127.0.0.1", port, env=env))
    try:
        clients = [server.wait_healthy(300) for server in servers]
        client = clients[0]
        results = {"params": sum(p.numel() for _, p in params), "bytes": nbytes, "dtype": "float32"}
        for label, bucket_bytes in (("bucketed", args.bucket_mb * 2**20), ("per_tensor", 1)):
            # bucket_bytes=1: every tensor in a bucket of its own
            results[label] = measure_pushes(model, client, bucket_bytes, args.repeats, nbytes)
        copy = statistics.median(inprocess_copy_s([p.detach() for _, p in params]) for _ in range(args.repeats))
        results["inprocess_copy"] = {"seconds_median": copy, "gb_per_s": nbytes / copy / 1e9}
        results["bucketed_vs_copy"] = results["bucketed"]["gb_per_s"] / results["inprocess_copy"]["gb_per_s"]
        if args.engines > 1:
            label = f"{args.engines}_engines"
            results[label] = measure_pushes(model, Engines.of(clients), args.bucket_mb * 2**20, args.repeats, nbytes)
            results[f"{label}_vs_1"] = results[label]["seconds_median"] / results["bucketed"]["seconds_median"]
    finally:
        for server in servers:
            server.stop()
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nweight sync, {results['params'] / 1e6:.0f}M params, {nbytes / 1e6:.0f} MB fp32, gloo on CPU")
    print(f"{'method':<16}{'s/push':>10}{'GB/s':>10}{'verify s':>10}")
    for label in ("bucketed", "per_tensor", "inprocess_copy", f"{args.engines}_engines"):
        if label not in results:
            continue
        r = results[label]
        print(f"{label:<16}{r['seconds_median']:>10.3f}{r['gb_per_s']:>10.2f}{r.get('verify_s_median', 0):>10.3f}")
    print(f"bucketed / in-process copy bandwidth: {results['bucketed_vs_copy']:.1%}   -> {args.out}")
    if args.engines > 1:
        print(f"{args.engines} engines / 1 engine push time: {results[f'{args.engines}_engines_vs_1']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
