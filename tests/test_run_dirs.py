"""Where a run writes and what it loads back (issue #32 item 7, and the ranks' import path of item 8):
run names stay inside run.root, the run directory is yours alone, `--resume` loads only checkpoints
nobody else could have written (they are pickles), and the launch directory's files never shadow the
standard library in the ranks."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from support.constants import REPO
from support.launcher import dry_run
from support.supervised import start_supervised

from launch.train import INVENTORY_ENV, Options, main, resolve, run_directory, trainer_env, write_run_dir
from pipeline.config import ConfigError, load_config
from pipeline.task.reward_functions import PLUGIN_DIR_ENV
from pipeline.trainer.trust import untrusted_checkpoints

TINY = REPO / "configs" / "tiny-cpu.yaml"


def resolved(tmp_path, monkeypatch, *overrides, **options):
    """The launcher's resolved run for configs/tiny-cpu.yaml under tmp_path/runs, on no GPU."""
    monkeypatch.setenv(INVENTORY_ENV, "")
    config = load_config(TINY, [f"run.root={tmp_path / 'runs'}", *overrides])
    return resolve(config, Options(**options))


@pytest.mark.parametrize(
    "name,why",
    [
        ("../x", "holds a path separator"),
        ("/abs/path", "holds a path separator"),
        ("a/b", "holds a path separator"),
        ("..", "starts with '.'"),
        (".", "starts with '.'"),
        (".cache", "starts with '.'"),
        ("a\nb", "holds a control character"),
        (" ", "is empty"),
    ],
)
def test_run_names_stay_inside_run_root(tmp_path, name, why):
    with pytest.raises(ConfigError) as err:
        run_directory(str(tmp_path), name)
    assert str(err.value) == (
        f"run.name (--name) {name!r} {why}: expected a directory name inside run.root ({tmp_path})"
    )
    assert run_directory(str(tmp_path), "try-1.b") == tmp_path / "try-1.b"


def test_a_run_name_that_links_out_of_run_root_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "r").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(
        ConfigError, match=r"'r' leads out of run.root \(.*/runs/r is a link to .*/elsewhere\)"
    ):
        run_directory(str(tmp_path / "runs"), "r")


def test_an_empty_name_is_refused(monkeypatch, capsys):
    monkeypatch.setenv(INVENTORY_ENV, "")
    assert main(["--name", "", "--dry-run"]) == 2
    assert capsys.readouterr().err == "error: --name: empty (leave it out for a timestamped run)\n"


@pytest.mark.integration
def test_the_launcher_refuses_a_name_outside_run_root(tmp_path):
    """`--name ../x` would write beside run.root: refused before anything, even in a dry run."""
    proc, plan = dry_run("--name", "../x", tmp_path=tmp_path)
    assert proc.returncode == 2 and plan is None, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: run.name (--name) '../x' holds a path separator")
    assert not (tmp_path / "x").exists()


def test_the_run_directory_and_its_config_are_yours_alone(tmp_path, monkeypatch):
    """0700 and 0600 whatever the umask, and a run directory made before (0755) is closed too."""
    run = resolved(tmp_path, monkeypatch, "run.name=r")
    old = os.umask(0o000)
    try:
        run.run_dir.mkdir(parents=True, mode=0o777)
        (run.run_dir / "config.yaml").write_text("old")
        os.chmod(run.run_dir / "config.yaml", 0o666)
        write_run_dir(run)
    finally:
        os.umask(old)
    assert stat.S_IMODE(run.run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run.run_dir / "config.yaml").stat().st_mode) == 0o600
    assert "name: r" in (run.run_dir / "config.yaml").read_text()


# --- checkpoints are pickles: only yours, written by you alone --------------------------------------


def checkpoints(run_dir: Path) -> Path:
    """A run directory as the trainer leaves it: checkpoints/latest naming step-2, its files."""
    ckpt = run_dir / "checkpoints"
    (ckpt / "step-2").mkdir(parents=True)
    (ckpt / "latest").write_text("step-2")
    (ckpt / "step-2" / "mp_rank_00_model_states.pt").write_bytes(b"pickle")
    (run_dir / "config.yaml").write_text(f"run:\n  name: {run_dir.name}\n")  # what --resume continues with
    os.chmod(run_dir / "config.yaml", 0o600)
    for path in (run_dir, ckpt, ckpt / "step-2"):
        os.chmod(path, 0o700)
    return ckpt


def test_only_checkpoints_nobody_else_could_write_are_trusted(tmp_path):
    run_dir = tmp_path / "r"
    ckpt = checkpoints(run_dir)
    weights = ckpt / "step-2" / "mp_rank_00_model_states.pt"
    assert untrusted_checkpoints(run_dir) == ""
    os.chmod(run_dir, 0o755)  # readable by others: still only yours to write (runs made before were so)
    assert untrusted_checkpoints(run_dir) == ""
    os.chmod(weights, 0o664)
    assert untrusted_checkpoints(run_dir) == (
        f"{weights} is writable by its group (mode 0664); checkpoints are pickles that run code when "
        f"loaded: if nobody else wrote to it, chmod -R go-w {weights}"
    )
    os.chmod(weights, 0o600)
    os.chmod(ckpt / "step-2", 0o777)
    assert untrusted_checkpoints(run_dir).startswith(f"{ckpt / 'step-2'} is writable by others (mode 0777)")
    os.chmod(ckpt / "step-2", 0o700)
    (ckpt / "step-2" / "extra.pt").symlink_to(weights)
    assert untrusted_checkpoints(run_dir).startswith(f"{ckpt / 'step-2' / 'extra.pt'} is a symbolic link")
    (ckpt / "step-2" / "extra.pt").unlink()
    os.chmod(run_dir, 0o770)
    assert untrusted_checkpoints(run_dir).startswith(f"{run_dir} is writable by its group")
    os.chmod(run_dir, 0o700)
    if os.getuid() == 0:  # only root can give a file away (CI runs as root)
        os.chown(ckpt / "latest", 65534, 65534)  # nobody
        assert untrusted_checkpoints(run_dir) == (
            f"{ckpt / 'latest'} is owned by uid 65534, not by you (uid 0); checkpoints are pickles that "
            "run code when loaded"
        )


@pytest.mark.integration
def test_resume_refuses_checkpoints_another_could_have_written(tmp_path):
    """The launcher refuses before anything starts (a dry run too)."""
    ckpt = checkpoints(tmp_path / "runs" / "r")
    os.chmod(ckpt / "step-2", 0o777)
    proc, plan = dry_run("--name", "r", "--resume", tmp_path=tmp_path)
    assert proc.returncode == 2 and plan is None, proc.stdout + proc.stderr
    assert proc.stderr == (
        f"error: --resume: refusing to load {ckpt}: {ckpt / 'step-2'} is writable by others (mode 0777); "
        f"checkpoints are pickles that run code when loaded: if nobody else wrote to it, "
        f"chmod -R go-w {ckpt / 'step-2'}\n"
    )
    os.chmod(ckpt / "step-2", 0o700)
    if os.getuid() == 0:  # another user's checkpoint (only root can give a file away)
        weights = ckpt / "step-2" / "mp_rank_00_model_states.pt"
        os.chown(weights, 65534, 65534)
        proc, plan = dry_run("--name", "r", "--resume", tmp_path=tmp_path)
        assert proc.returncode == 2 and plan is None, proc.stdout + proc.stderr
        assert proc.stderr == (
            f"error: --resume: refusing to load {ckpt}: {weights} is owned by uid 65534, not by you "
            "(uid 0); checkpoints are pickles that run code when loaded\n"
        )


@pytest.mark.integration
def test_a_rank_refuses_them_before_it_starts(tmp_path):
    """Each rank checks again before anything else (the launcher's check may be old news by then)."""
    run_dir = tmp_path / "r"
    ckpt = checkpoints(run_dir)
    os.chmod(ckpt / "latest", 0o666)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.trainer", "--config", str(TINY), "--run-dir", str(run_dir)]
        + ["--server-url", "http://127.0.0.1:9", "--resume"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (
        f"error: --resume: refusing to load {ckpt}: {ckpt / 'latest'} is writable by others (mode 0666); "
        f"checkpoints are pickles that run code when loaded: if nobody else wrote to it, "
        f"chmod -R go-w {ckpt / 'latest'}"
    )


# A trainer that writes a checkpoint the way DeepSpeed does (the process's umask decides its mode).
WRITER = """
import os
from pathlib import Path

step = Path(os.environ["RUN_DIR"], "checkpoints", "step-1")
step.mkdir(parents=True)
(step / "mp_rank_00_model_states.pt").write_bytes(b"pickle")
Path(os.environ["RUN_DIR"], "checkpoints", "latest").write_text("step-1")
raise SystemExit(3)
"""


@pytest.mark.integration
def test_what_the_run_writes_is_yours_alone_and_passes_the_resume_check(tmp_path):
    """With a umask of 002 (a user-private-group setup), the ranks' checkpoints would be group-writable
    and `--resume` would refuse the run's own checkpoints: the launcher's processes run under 077."""
    proc = start_supervised(tmp_path, WRITER, env={"DRIVER_UMASK": "002"})
    assert proc.wait(120) == 3, proc.stdout.read()[-3000:]
    ckpt = tmp_path / "r" / "checkpoints"
    assert stat.S_IMODE((ckpt / "step-1").stat().st_mode) == 0o700
    assert stat.S_IMODE((ckpt / "step-1" / "mp_rank_00_model_states.pt").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "r" / "trainer.log").stat().st_mode) == 0o600
    assert untrusted_checkpoints(tmp_path / "r") == ""


# --- the ranks' import path ---------------------------------------------------------------------------


def test_the_launch_directory_never_shadows_the_standard_library_in_the_ranks(tmp_path, monkeypatch):
    """The ranks run in the repository with the launcher's environment: a reward plugin in the directory
    you launched from is found, and a file there named like a standard-library module (`colorsys.py`)
    does not replace it (on PYTHONPATH it came before the standard library)."""
    launch_dir = tmp_path / "here"
    launch_dir.mkdir()
    (launch_dir / "my_rewards.py").write_text(
        "def bonus(prompts, completions, answer, **kw):\n    return [1.0]\n"
    )
    (launch_dir / "colorsys.py").write_text("raise ImportError('the launch directory shadows colorsys')\n")
    run = resolved(tmp_path, monkeypatch, "run.name=r")
    monkeypatch.chdir(launch_dir)
    env = trainer_env(run)
    rank = (
        "from pipeline.task.reward_functions import load_rewards\n"
        "assert load_rewards({'bonus': 'my_rewards:bonus'})['bonus'].fn(None, ['c'], ['a']) == [1.0]\n"
        "import colorsys\n"
        "print(colorsys.__file__)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", rank], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert Path(proc.stdout.strip()).parent == Path(stat.__file__).parent  # the standard library's
    assert env[PLUGIN_DIR_ENV] == str(launch_dir)  # not on PYTHONPATH: at the end of sys.path
    assert str(launch_dir) not in env["PYTHONPATH"].split(os.pathsep)
