"""Publishing: the dry run writes exactly what would be uploaded; no upload without repo and token."""

import os
import shutil
import subprocess
import sys

import yaml
from support.processes import one_line_error
from support.runs import fake_run
from transformers import AutoModelForCausalLM


def publish(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline.report.publish", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_dry_run_folder(tmp_path, tiny_model_dir):
    run, _ = fake_run(tmp_path, overrides=["data.source=hub"])
    shutil.copytree(tiny_model_dir, run / "final")
    out = tmp_path / "upload"
    proc = publish(str(run), "--dry-run", str(out))
    assert proc.returncode == 0, proc.stderr
    card = (out / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "premai-io/prem-1B-chat"
    assert meta["datasets"] == ["openai/gsm8k"]
    assert {"metrics", "tags", "license", "pipeline_tag"} <= set(meta)
    assert "](training/reward_curves.png)" in card
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training/metrics.jsonl",
        "training/reward_curves.png",
        "training/eval_after.json",
        "training/config.yaml",
    ):
        assert (out / name).exists(), name
    assert not (out / "checkpoints").exists()
    AutoModelForCausalLM.from_pretrained(out)  # what would be uploaded loads as a model


def test_no_upload_without_repo_or_token(tmp_path, tiny_model_dir):
    run, _ = fake_run(tmp_path)
    shutil.copytree(tiny_model_dir, run / "final")
    no_repo = publish(str(run))
    assert no_repo.returncode == 2 and "--repo user/name is required" in one_line_error(no_repo)
    no_token = publish(str(run), "--repo", "someone/model")
    assert no_token.returncode == 2 and "no Hugging Face token" in one_line_error(no_token)
    unfinished = publish(str(tmp_path), "--dry-run", str(tmp_path / "x"))
    assert unfinished.returncode == 2 and "no final model" in one_line_error(unfinished)
