"""`--resume` without the processes: the run's own config comes back (a tools run keeps its tools), the
changes that would make a resumed run differ from an uninterrupted one are refused without --force,
and what a killed session wrote past the checkpoint is dropped (metrics.jsonl, completions.jsonl,
TensorBoard's events); the random generators come back as they were. The kill-and-resume run itself:
tests/test_faults.py `test_kill_9_then_resume_equals_the_uninterrupted_run`."""

import json
import random

import numpy as np
import pytest
import torch
import yaml
from support.constants import REPO
from support.launcher import dry_run
from support.processes import one_line_error

import launch.train
from launch.resume import check_changes, resume_config
from launch.train import Options, Outcome, resolve
from pipeline.config import ConfigError, load_config, to_dict
from pipeline.trainer.checkpoint import restore_rng, rng_state, trim_rows
from pipeline.trainer.metrics import _TensorBoard

TINY = REPO / "configs" / "tiny-cpu.yaml"


def saved_run(root, name="r", overrides=(), ranks=2):
    """A run directory as an interrupted run leaves it: the resolved config (the token redacted, the
    model built: build empty, the DeepSpeed JSON's path absolute), a checkpoint with `ranks` ranks'
    generator files."""
    config = load_config(
        TINY,
        [
            f"run.root={root}",
            f"run.name={name}",
            "model.path=/models/built",
            "model.build=",
            "server.token=secret",
            f"train.deepspeed_config={REPO / 'configs' / 'ds_zero2.json'}",  # as resolve made it
            *overrides,
        ],
    )
    run_dir = root / name
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step-2")
    for rank in range(ranks):
        (run_dir / "checkpoints" / "step-2" / f"rng_state_rank{rank}.pkl").write_bytes(b"")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return run_dir


def test_resume_continues_with_the_runs_own_config_plus_set(tmp_path, monkeypatch, capsys):
    """`--resume --name R` with no --config: R/config.yaml, not the default recipe, so a tools run keeps
    its tools (and its batch, seed, ...); a --set still applies; the redacted token is not a token."""
    saved_run(tmp_path, overrides=["rollout.tools=[calculator]", "run.seed=7", "train.max_steps=9"])
    given = []
    monkeypatch.setattr(
        launch.train, "train", lambda config, options: given.append((config, options)) or Outcome(0)
    )
    argv = ["--resume", "--name", "r", "--set", f"run.root={tmp_path}", "--set", "train.save_every=3"]
    assert launch.train.main(argv) == 0
    config, options = given[-1]
    assert config.rollout.tools == ["calculator"] and config.run.seed == 7 and config.train.max_steps == 9
    assert config.train.save_every == 3 and config.model.path == "/models/built" and not config.model.build
    assert config.server.token == "" and options.resume and not options.force
    assert config.run.root == str(tmp_path)
    # --config with --resume: used only to find run.root, and said so
    assert launch.train.main([*argv, "--config", str(TINY), "--force"]) == 0
    assert given[-1][0].rollout.tools == ["calculator"] and given[-1][1].force
    assert "only located run.root" in capsys.readouterr().out


def test_resume_refusals_before_anything(tmp_path, capsys):
    assert launch.train.main(["--resume", "--name", "nothing", "--set", f"run.root={tmp_path}"]) == 2
    assert "config.yaml not found" in capsys.readouterr().err
    assert launch.train.main(["--force", "--name", "x", "--set", f"run.root={tmp_path}"]) == 2
    assert "--force: only with --resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="needs --name"):
        resume_config(None, [f"run.root={tmp_path}"], TINY)


def test_a_moved_run_continues_where_it_was_found(tmp_path):
    saved_run(tmp_path / "before")
    (tmp_path / "before").rename(tmp_path / "after")
    config = resume_config(None, [f"run.root={tmp_path / 'after'}", "run.name=r"], TINY)
    assert config.run.root == str(tmp_path / "after")


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("run.seed=1", "run.seed"),
        ("data.synthetic_train=100", "data.synthetic_train"),
        ("model.path=/models/other", "model.path"),
        ("train.deepspeed_config=configs/ds_zero3.json", "train.deepspeed_config"),
        ("train.num_generations=8", "train.num_generations"),
        ("train.micro_batch_size=4", "train.micro_batch_size"),
        ("train.learning_rate=1e-3", "train.learning_rate"),
        ("train.overlap=true", "train.max_staleness"),  # its alias
        ("train.max_staleness=2", "train.max_staleness"),
        ("train.max_steps=300", "train.max_steps"),  # the cosine schedule spans the run's steps
        ("rollout.tools=[calculator]", "rollout.tools"),
        ("rewards.correctness=3.0", "rewards"),
    ],
)
def test_a_change_that_breaks_exactness_is_refused_naming_the_key(tmp_path, change, key):
    run_dir = saved_run(tmp_path)
    config = resume_config(None, [f"run.root={tmp_path}", "run.name=r", change], TINY)
    with pytest.raises(ConfigError, match=r"^--resume: .*or add --force\)$") as refused:
        check_changes(config, run_dir, 2, force=False)
    assert str(refused.value).startswith(f"--resume: {key} ") and "\n" not in str(refused.value)
    said = []
    check_changes(config, run_dir, 2, force=True, say=lambda line, **_: said.append(line))
    assert said and said[0].startswith(f"--resume --force: {key} ")


def test_changes_that_leave_the_numbers_alone_are_allowed(tmp_path):
    run_dir = saved_run(tmp_path)
    bookkeeping = [
        "train.save_every=5",
        "train.keep_checkpoints=4",
        "train.log_completions_every=2",
        "train.report_to=[]",
        "server.request_timeout_s=30",
        "server.port=9999",
        "sync.timeout_s=120",
        "eval.every=2",
        "run.project=elsewhere",
    ]
    config = resume_config(None, [f"run.root={tmp_path}", "run.name=r", *bookkeeping], TINY)
    check_changes(config, run_dir, 2, force=False)  # nothing refused
    # under a constant schedule the run's length changes nothing before the old end
    constant = saved_run(tmp_path, "c", ["train.lr_scheduler=constant", "train.min_lr_ratio=0"])
    longer = resume_config(None, [f"run.root={tmp_path}", "run.name=c", "train.max_steps=400"], TINY)
    check_changes(longer, constant, 2, force=False)
    # ... but a warm-up spans a share of the run
    warm = saved_run(tmp_path, "w", ["train.lr_scheduler=constant_with_warmup", "train.min_lr_ratio=0"])
    longer = resume_config(None, [f"run.root={tmp_path}", "run.name=w", "train.max_steps=400"], TINY)
    with pytest.raises(ConfigError, match="train.max_steps"):
        check_changes(longer, warm, 2, force=False)


def test_another_number_of_trainer_ranks_is_refused(tmp_path):
    run_dir = saved_run(tmp_path, ranks=2)
    config = resume_config(None, [f"run.root={tmp_path}", "run.name=r"], TINY)
    with pytest.raises(ConfigError, match=r"trainer ranks 2 -> 4"):
        check_changes(config, run_dir, 4, force=False)


def test_resolve_refuses_a_changed_seed_in_process(tmp_path, monkeypatch):
    """`train(config, Options(resume=True))` checks the same as the command line, in `resolve`."""
    monkeypatch.setenv("GRPO_GPU_INVENTORY", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    saved_run(tmp_path)
    same = resume_config(None, [f"run.root={tmp_path}", "run.name=r"], TINY)
    assert resolve(same, Options(resume=True)).config.run.seed == same.run.seed
    other = resume_config(None, [f"run.root={tmp_path}", "run.name=r", "run.seed=3"], TINY)
    with pytest.raises(ConfigError, match="run.seed 42 -> 3"):
        resolve(other, Options(resume=True))
    assert resolve(other, Options(resume=True, force=True)).config.run.seed == 3


@pytest.mark.integration
def test_resume_refusal_is_one_line_from_the_command(tmp_path):
    saved_run(tmp_path / "runs")
    proc, _ = dry_run("--name", "r", "--resume", "--set", "train.learning_rate=1e-3", tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert one_line_error(proc).startswith("error: --resume: train.learning_rate 0.0002 -> 0.001: ")
    forced, _ = dry_run(
        "--name", "r", "--resume", "--force", "--set", "train.learning_rate=1e-3", tmp_path=tmp_path
    )
    assert forced.returncode == 0, forced.stderr
    assert "--resume --force: train.learning_rate 0.0002 -> 0.001" in forced.stdout


def test_trim_rows_drops_what_came_after_the_checkpoint_and_torn_lines(tmp_path):
    for name in ("metrics.jsonl", "completions.jsonl"):
        path = tmp_path / name
        rows = [{"step": s, "x": i} for s in range(1, 6) for i in range(2)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "x"')
        assert trim_rows(path, 3) == 5  # steps 4 and 5 (two rows each) and the torn line
        assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:6]
    assert trim_rows(tmp_path / "absent.jsonl", 3) == 0


def test_a_resumed_tensorboard_hides_what_the_killed_session_wrote_past_the_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = _TensorBoard(tmp_path)
    for step in range(1, 6):  # killed after step 5, its checkpoint at step 2
        first.log({"loss": float(step)}, step)
    first.close()
    resumed = _TensorBoard(tmp_path, resumed_at=2)
    for step in range(3, 7):
        resumed.log({"loss": 10.0 * step}, step)
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (1, 1.0),
        (2, 2.0),
        (3, 30.0),
        (4, 40.0),
        (5, 50.0),
        (6, 60.0),
    ]


def test_random_generators_come_back_as_they_were():
    state = rng_state()
    draws = (
        random.random(),
        np.random.rand(),
        torch.rand(3),
        torch.nn.functional.dropout(torch.ones(8), 0.5),
    )
    random.random(), np.random.rand(), torch.rand(5)  # the run went on
    restore_rng(state)
    again = (
        random.random(),
        np.random.rand(),
        torch.rand(3),
        torch.nn.functional.dropout(torch.ones(8), 0.5),
    )
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2]) and torch.equal(draws[3], again[3])
