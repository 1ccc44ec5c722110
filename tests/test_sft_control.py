"""launch/sft_control.py: more warm start for GRPO's wall time instead, evaluated the same way."""

import json
import subprocess
import sys

import pytest
import yaml
from support.constants import REPO
from support.processes import one_line_error

SCRIPT = [sys.executable, str(REPO / "launch" / "sft_control.py")]


def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    proc = subprocess.run([*SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "config.yaml" in one_line_error(proc)


@pytest.mark.integration  # launch/sft_control.py evaluates through a real server (pipeline/report/evaluate.py)
@pytest.mark.parametrize("recipe", ["tiny-cpu.yaml", "tiny-cpu-tools.yaml"])
def test_the_control_spends_grpo_time_on_more_of_the_same_warm_start_and_is_reported(recipe, tmp_path):
    """The sloppy-teacher default, and the calculator demo (its warm start has tool-call demonstrations,
    its evaluation runs the multi-turn loop)."""
    from transformers import AutoTokenizer

    from pipeline.config import load_config, to_dict
    from pipeline.embedded.default_model import build_default_model
    from pipeline.report.card import write_report

    config = load_config(
        REPO / "configs" / recipe,
        [
            f"run.root={tmp_path}",
            "model.build_hidden_size=64",
            "model.build_layers=2",
            "model.build_sft_steps=6",
            "data.synthetic_test=8",
            "eval.maj_k=0",
            "server.kv_cache_gib=1",
        ],
    )
    warm = build_default_model(config)
    built = json.loads((warm / "build.json").read_text())
    tools = recipe == "tiny-cpu-tools.yaml"
    assert (
        built["sft_steps"] == 6
        and built["early_answers"] == (0.0 if tools else 0.7)
        and built["sft_seconds"] > 0
    )
    assert built.get("tool_demos") == (0.3 if tools else None)
    tokenizer = AutoTokenizer.from_pretrained(
        warm
    )  # the call tags are tokens of their own only for tool demos
    assert (len(tokenizer("<tool_call>", add_special_tokens=False)["input_ids"]) == 1) == tools
    run = tmp_path / "run"
    run.mkdir()
    config.model.path, config.model.build = str(warm), ""
    (run / "config.yaml").write_text(yaml.safe_dump(to_dict(config)))
    step = built["sft_seconds"] / 6 * 2  # two GRPO steps that each took as long as 2 warm-start steps
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i, "time/step": step}) + "\n" for i in (1, 2))
    )

    proc = subprocess.run([*SCRIPT, str(run)], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    control = json.loads((run / "sft_control.json").read_text())
    assert control["control/extra_sft_steps"] == 4
    assert control["examples"] == 8 and 0 <= control["pass@1/strict_accuracy"] <= 1
    assert ("tools/call_rate" in control) == tools  # evaluated through the tool loop, as the run was
    longer = json.loads((tmp_path / control["control/model"] / "build.json").read_text())
    assert longer["sft_steps"] == 10 and {
        k: v for k, v in longer.items() if k not in ("sft_steps", "sft_seconds")
    } == {k: v for k, v in built.items() if k not in ("sft_steps", "sft_seconds")}
    # the very same tokenizer: a longer warm start changes the training, not the starting point
    assert (warm / "tokenizer.json").read_text() == (
        tmp_path / control["control/model"] / "tokenizer.json"
    ).read_text()
    assert len((run / "sft_control.jsonl").read_text().splitlines()) == 8

    (run / "eval_before.json").write_text(json.dumps(control))
    (run / "eval_after.json").write_text(json.dumps(control))
    card = write_report(run).read_text()
    assert "more SFT instead (same time)" in card and "4 more warm-start steps" in card
    # the card says what is special about the warm start: the sloppy teacher, or the calculator demos
    assert ("one step early" in card) != tools and ("asking the built-in calculator" in card) == tools
