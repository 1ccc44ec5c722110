"""What users expect of a trainer: trackers (tensorboard, wandb offline, trackio's local store),
sampled-completion tables, evaluation during training, RL diagnostics, and LoRA with merged pushes."""

import json
import sqlite3

import pytest
import torch
from support.launcher import launch
from support.models import lora_model
from support.processes import one_line_error
from support.reference import hf_logprobs
from support.runs import read_metrics
from transformers import AutoModelForCausalLM

from pipeline.sync.lora_export import exported_weights
from pipeline.sync.weight_sync import ModelSource

NEW_METRICS = {
    "grad_norm",
    "entropy",
    "reward/std_within_group",
    "frac_zero_std_groups",
    "completion_len/max",
}


def test_lora_exports_merged_weights_under_the_base_names(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    names = [name for name, _, _ in exported_weights(model)]
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert names == [name for name, _ in plain.named_parameters()]  # the server's names, no adapter tensors
    sent = dict(iter(ModelSource(model, 0, True, torch.float32, torch.device("cpu"))))
    merged = model.merge_and_unload()  # PEFT's own merge, the reference
    for name, tensor in merged.named_parameters():
        torch.testing.assert_close(sent[name], tensor.detach(), rtol=0, atol=1e-6)
    assert any(
        not torch.equal(sent[n], p) for n, p in plain.named_parameters()
    )  # the adapter does change weights


@pytest.mark.integration
def test_a_missing_tracker_is_a_one_line_error_before_start(tiny_model_dir, tmp_path):
    # a PYTHONPATH entry whose `wandb` cannot be found by any finder: a module that hides itself
    hider = tmp_path / "hide"
    hider.mkdir()
    (hider / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'wandb' else real(name, *a)\n"
    )
    proc = launch(
        "--name",
        "t",
        "--set",
        f"model.path={tiny_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "train.report_to=[tensorboard,wandb]",
        root=tmp_path,
        timeout=120,
        env={"PYTHONPATH": str(hider)},
    )
    assert proc.returncode == 2
    assert one_line_error(proc).startswith(
        "error: train.report_to: wandb is not installed (pip install wandb"
    )
    assert not (tmp_path / "t").exists()


@pytest.mark.e2e
def test_trackers_completion_tables_eval_during_training_and_diagnostics(server, warm_model_dir, tmp_path):
    proc = launch(
        "--name",
        "track",
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "train.max_steps=3",
        "--set",
        "train.report_to=[tensorboard,wandb,trackio]",
        "--set",
        "train.log_completions_every=2",
        "--set",
        "train.log_completions=3",
        "--set",
        "eval.every=2",
        "--set",
        "eval.limit=4",
        "--set",
        "eval.maj_k=0",
        "--set",
        "eval.enabled=false",
        server=server,
        root=tmp_path,
        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = tmp_path / "track"
    rows = read_metrics(run)
    for row in rows:
        assert NEW_METRICS <= set(row), NEW_METRICS - set(row)
        assert row["grad_norm"] > 0 and row["entropy"] > 0 and 0 <= row["frac_zero_std_groups"] <= 1
        assert row["completion_len/max"] >= row["completion_len/mean"]
    # evaluated at steps 2 and 3 (the last), with the weights just pushed
    assert [r["step"] for r in rows if "eval/pass@1/strict_accuracy" in r] == [2, 3]
    assert all(r["eval/examples"] == 4 for r in rows if "eval/examples" in r)
    samples = [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2, 2, 2]
    assert {"prompt", "completion", "reference", "reward/correctness", "reward/total", "advantage"} <= set(
        samples[0]
    )
    # the stores: tensorboard events, wandb's offline run, trackio's sqlite
    assert list((run / "tensorboard").iterdir())
    (wandb_run,) = (run / "wandb").glob("offline-run-*/run-*.wandb")
    assert b"reward/total" in wandb_run.read_bytes() and b"completions" in wandb_run.read_bytes()
    db = sqlite3.connect(run / "trackio" / "grpo-pipeline.db")
    logged = [json.loads(m) for (m,) in db.execute("select metrics from metrics")]
    assert any("grad_norm" in m for m in logged) and any("completions" in m for m in logged)
    assert (run / "health_curves.png").exists() and (run / "eval_curves.png").exists()
    assert "](eval_curves.png)" in (run / "README.md").read_text()


@pytest.mark.e2e
def test_lora_run_with_merged_pushes_saves_merged_final_and_resumes(server, warm_model_dir, tmp_path):
    common = [
        "--name",
        "lora",
        "--set",
        f"model.path={warm_model_dir}",
        "--set",
        "model.build=",
        "--set",
        "model.lora_rank=8",
        "--set",
        "train.learning_rate=1e-3",
        "--set",
        "eval.enabled=false",
        "--set",
        "train.save_every=2",
        "--set",
        "train.beta=0.04",  # KL: the reference is the adapter off
        "--set",
        "model.lora_sync=merged",
    ]
    proc = launch(*common, "--set", "train.max_steps=2", server=server, root=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    resumed = launch(
        *common, "--resume", "--force", "--set", "train.max_steps=3", server=server, root=tmp_path
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    run = tmp_path / "lora"
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["sync/logprob_max_abs_diff"] <= 1e-3 and r["sync/verified_tensors"] > 0 for r in rows)
    model_bytes = sum(f.stat().st_size for f in warm_model_dir.glob("*.safetensors"))
    assert all(
        r["sync/adapter"] == 0 and r["sync/bytes"] > model_bytes / 2 for r in rows
    )  # every weight, merged
    assert all(r["sync/adapter_effect"] == pytest.approx(1.0, abs=0.05) for r in rows)  # fp32: nothing lost
    assert "LoRA rank 8" in (run / "train.log").read_text()
    assert all("kl" in r for r in rows) and rows[-1]["kl"] > 0
    final = run / "final"
    # the adapter alone reloads with PEFT and, merged into the warm start, gives final/'s weights
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, final / "adapter").merge_and_unload()
    saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    for (name, a), (_, b) in zip(merged.named_parameters(), saved.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    assert "lora" not in (final / "config.json").read_text().lower()  # a plain model, not a PEFT one
    # the server serves exactly the merged final model, which differs from the warm start
    assert server.client.health()["version"] == 3
    prompt = server.client.request("POST", "/generate", {"prompts": ["Tom has 3 apples."], "max_tokens": 1})
    prompt = [int(t) for t in prompt["results"][0]["prompt_token_ids"]]
    completion = server.client.generate([prompt], n=1, max_tokens=16, seed=0)["results"][0]["completions"][0][
        "token_ids"
    ]
    served = torch.tensor(server.client.score([(prompt, completion)])["logprobs"][0])
    assert (served - hf_logprobs(final, prompt, completion)).abs().max() <= 1e-3
    assert (served - hf_logprobs(warm_model_dir, prompt, completion)).abs().max() > 1e-4
