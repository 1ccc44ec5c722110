"""The CPU/GPU choices in pipeline/device.py and the process set-up a GPU needs, checked on a CPU."""

import os
import subprocess
import sys

import pytest
import torch

from pipeline import device
from pipeline.config import ConfigError, load_config


@pytest.fixture
def on_gpu_with_flash_attn(monkeypatch):
    monkeypatch.setattr(device, "accelerator", lambda: "cuda")
    real = device.importlib.util.find_spec
    monkeypatch.setattr(
        device.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else real(name)
    )


def test_flash_attention_only_with_16_bit_dtypes(on_gpu_with_flash_attn):
    assert device.resolve_attn("auto", torch.bfloat16) == "flash_attention_2"
    assert device.resolve_attn("auto", torch.float16) == "flash_attention_2"
    assert device.resolve_attn("auto", torch.float32) == "sdpa"  # FA2 would fail at the first forward
    with pytest.raises(
        ConfigError, match="flash_attention_2 needs model.dtype bfloat16 or float16, got float32"
    ):
        device.resolve_attn("flash_attention_2", torch.float32)


def test_without_flash_attn_auto_is_sdpa_and_explicit_fa2_says_how_to_install(monkeypatch):
    monkeypatch.setattr(device, "accelerator", lambda: "cuda")
    real = device.importlib.util.find_spec
    monkeypatch.setattr(
        device.importlib.util, "find_spec", lambda name: None if name == "flash_attn" else real(name)
    )
    assert device.resolve_attn("auto", torch.bfloat16) == "sdpa"
    with pytest.raises(ConfigError, match="make install-flash-attn"):
        device.resolve_attn("flash_attention_2", torch.bfloat16)


def test_cpu_choices():
    assert device.resolve_attn("auto", torch.float32) == "sdpa"
    assert device.sync_backend("auto", "cpu") == "gloo" and device.sync_backend("auto", "cuda") == "nccl"
    assert device.sync_backend("ipc", "cuda") == "ipc"
    assert device.resolve_enforce_eager(None, "cuda") is False  # CUDA graphs on GPU
    assert device.resolve_enforce_eager(None, "cpu") is True
    assert device.resolve_enforce_eager(True, "cuda") is True
    assert device.probe_tolerance(torch.float32) == 1e-3 and device.probe_tolerance(torch.bfloat16) > 1e-2
    # server.gpu_memory_utilization 0 = auto: a server started alone takes vLLM's default; a set share is kept
    assert (
        device.resolve_gpu_memory_utilization(0.0) == 0.9
        and device.resolve_gpu_memory_utilization(0.4) == 0.4
    )


def test_server_sets_spawn_before_torch_is_imported():
    """vLLM forks its engine on GPU unless told otherwise; the server must say spawn before anything
    imports torch (a CUDA probe before a fork breaks the child)."""
    code = (
        "import sys, os; os.environ.pop('VLLM_WORKER_MULTIPROC_METHOD', None); import pipeline.generation.serve as s; "
        "assert 'torch' not in sys.modules, 'pipeline.generation.serve imports torch at module level'; "
        "s.set_engine_process_env(); print(os.environ['VLLM_WORKER_MULTIPROC_METHOD'], "
        "os.environ['PYTORCH_NVML_BASED_CUDA_CHECK'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["spawn", "1"]


def test_tokenizer_without_pad_token_pads_with_eos(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.trainer.build import load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token_id is None  # like prem-1B-chat
    loaded = load_tokenizer(load_config(None, [f"model.path={tmp_path}"]))
    assert loaded.pad_token_id == loaded.eos_token_id is not None


def test_config_accepts_the_vllm_backends():
    assert load_config(None, ["sync.transport=ipc"]).sync.transport == "ipc"
    assert load_config(None, ["server.enforce_eager=null"]).server.enforce_eager is None
    with pytest.raises(ConfigError, match="sync.transport: expected one of auto, nccl, ipc, gloo"):
        load_config(None, ["sync.transport=pynccl"])


def test_gpu_check_says_it_needs_a_gpu():
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert (
        out.returncode == 2
        and out.stderr == "error: make gpu-check needs CUDA GPUs (nvidia-smi lists none)\n"
    )


@pytest.mark.integration  # DeepSpeed ZeRO-2/3 steps
def test_the_gpu_trainer_check_runs_on_cpu(tmp_path):
    """tests/harness/gpu_trainer.py (run on a lent GPU box) with --cpu: its logic, DeepSpeed ZeRO-2/3 GRPO
    steps with and without LoRA, the merged export against PEFT's own merge, and (vLLM being importable
    here) the real save_final_model, adapter reload included. Keeps the GPU check from rotting."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [
            sys.executable,
            "tests/harness/gpu_trainer.py",
            "--cpu",
            "--steps",
            "2",
            "--lora-steps",
            "2",
            "--out",
            str(out),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "ALL PASS" in proc.stdout
    import json

    summary = json.loads(out.read_text())
    assert summary["ok"] and summary["failed"] == 0 and summary["passed"] >= 50
