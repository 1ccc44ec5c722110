"""SLURM for real: launch/srun_rank.py's variable mapping, and launch/slurm.sbatch on a one-host cluster.

The cluster (munged, slurmctld, slurmd; config, state, logs and the munge socket in a temp dir, on
free loopback ports, no systemd) is started by the `slurm` fixture and torn down after the session.
Without SLURM it installs Debian's `slurm-wlm` and `munge` with apt-get when root (CI), and fails if
that fails; elsewhere (not root, no apt-get) the test skips with the reason.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import RUN_TAG, TEST_SCALE, run_processes

from launch.srun_rank import expand_hostnames, tasks_on_node, torch_env
from pipeline.generation.client import free_port

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
TOKEN = "slurm-test-token-not-secret"
SLURM_TASK = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
              "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_ID": "1234",
              "SLURM_STEP_NODELIST": "gpu[07-08]"}


# --- launch/srun_rank.py: pure functions --------------------------------------------------------
def test_srun_task_maps_to_torch_variables():
    env = torch_env(SLURM_TASK, expand=lambda nodes: {"gpu[07-08]": ["gpu07", "gpu08"]}[nodes])
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                   "CROSS_RANK": "1", "CROSS_SIZE": "2", "MASTER_ADDR": "gpu07", "MASTER_PORT": "21234"}


def test_variables_already_set_win():
    given = {**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "0"}
    env = torch_env(given, expand=lambda nodes: pytest.fail("the node list must not be looked up"))
    assert not {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"} & set(env) and env["RANK"] == "3"


def test_job_nodelist_and_tasks_per_node_fallbacks():
    task = {"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
            "SLURM_TASKS_PER_NODE": "2,1", "SLURM_JOB_NODELIST": "a,b"}
    env = torch_env(task, expand=lambda nodes: nodes.split(","))
    assert env["MASTER_ADDR"] == "a" and env["LOCAL_WORLD_SIZE"] == "1" and env["MASTER_PORT"] == "20000"
    assert torch_env({**task, "SLURM_TASKS_PER_NODE": "", "SLURM_NTASKS_PER_NODE": "2"},
                     expand=lambda n: ["a"])["LOCAL_WORLD_SIZE"] == "2"
    with pytest.raises(SystemExit, match="runs under srun"):
        torch_env({"SLURM_PROCID": "0"})


def test_tasks_per_node_and_host_list_forms(monkeypatch):
    assert [tasks_on_node("2(x3),1", n) for n in range(5)] == [2, 2, 2, 1, None]
    assert tasks_on_node("garbage", 0) is None
    monkeypatch.setenv("PATH", "")  # no scontrol: the small parser
    assert expand_hostnames("node[1-3],other") == ["node1", "node2", "node3", "other"]
    assert expand_hostnames("gpu[07-09,12]") == ["gpu07", "gpu08", "gpu09", "gpu12"]
    assert expand_hostnames("login") == ["login"]


def test_srun_rank_runs_the_trainer_module():
    """As srun starts it: the variables set, then `pipeline.trainer.train` as __main__ with the arguments."""
    # from elsewhere, no PYTHONPATH: the entry puts the repository first on sys.path itself
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_", "PYTHONPATH"))}
    proc = subprocess.run([sys.executable, "-u", str(REPO / "launch" / "srun_rank.py"), "--help"], cwd="/",
                          capture_output=True, text=True, timeout=300,
                          env={**env, **SLURM_TASK, "MASTER_ADDR": "127.0.0.1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: pipeline.trainer.train" in proc.stdout and "--token-file" in proc.stdout
    assert "srun_rank: rank 3 of 4 (local 1)" in proc.stderr and "master 127.0.0.1:21234" in proc.stderr


# --- a one-host SLURM cluster --------------------------------------------------------------------
@dataclass
class Cluster:
    root: Path
    host: str
    env: dict[str, str]

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        out = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            out.append(f"--- {name} (tail) ---\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(out)


def ensure_slurm() -> None:
    """SLURM and munge here, or installed (root with apt-get), or a skip naming what is missing."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if os.geteuid() != 0:
        pytest.skip("the one-host SLURM cluster runs slurmd and munged as root; not root here")
    if not missing:
        return
    if shutil.which("apt-get") is None:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get")
    install = ["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    proc = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0:  # stale or empty package lists (a fresh container): update once
        subprocess.run(["apt-get", "update"], capture_output=True, text=True, timeout=600, env=env)
        proc = subprocess.run(install, capture_output=True, text=True, timeout=900, env=env)
    if proc.returncode != 0 or any(shutil.which(d) is None for d in DAEMONS):
        pytest.fail(f"`{' '.join(install)}` failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-2000:]}")


def slurm_conf(root: Path, host: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    """The smallest slurm.conf for one node on loopback: no cgroups, no accounting, state in `root`."""
    return "\n".join([
        "ClusterName=grpotest", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}", f"SlurmdPort={slurmd_port}",
        "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={root / 'munge.socket'}",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none", "MpiDefault=none", "ReturnToService=2",
        "SlurmdParameters=config_overrides",  # the node is what this file says, whatever slurmd detects
        "KillWait=10", "MinJobAge=600",  # finished jobs stay visible to `scontrol show job`
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in reversed(procs):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A running one-host cluster (Cluster.env: SLURM_CONF for every client command); afterwards its
    jobs cancelled, its daemons stopped and anything they left (slurmstepd) killed."""
    ensure_slurm()
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool"):
        (root / d).mkdir()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root, host, os.cpu_count() or 1, free_port(), free_port()))
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = Cluster(root, host, {"SLURM_CONF": str(conf)})
    # RUN_TAG: whatever the daemons start (slurmstepd) is found and killed at the end
    env = {**os.environ, **cluster.env, RUN_TAG: str(root)}
    commands = {  # -f: munged accepts a socket directory others cannot reach (root's temp dir)
        "munged.out": ["munged", "-F", "-f", f"--socket={root / 'munge.socket'}", f"--key-file={key}",
                       f"--pid-file={root / 'munged.pid'}", f"--seed-file={root / 'munged.seed'}",
                       f"--log-file={root / 'munged.log'}"],
        "slurmctld.out": ["slurmctld", "-D", "-f", str(conf)],
        "slurmd.out": ["slurmd", "-D", "-f", str(conf), "-N", host],
    }
    procs: list[subprocess.Popen] = []
    try:
        for log, cmd in commands.items():
            with open(root / log, "wb") as out:
                procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                              start_new_session=True))
            if cmd[0] == "munged":
                deadline = time.monotonic() + 30
                while not (root / "munge.socket").exists():
                    if procs[-1].poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"munged did not start\n{cluster.logs()}")
                    time.sleep(0.2)
        deadline, state = time.monotonic() + 90, ""
        while state != "idle":
            dead = [c[0] for c, p in zip(commands.values(), procs, strict=True) if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"SLURM node not idle within 90 s (state {state!r}, exited: {dead})\n{cluster.logs()}")
            time.sleep(1)
            state = cluster.run("sinfo", "-h", "-N", "-n", host, "-o", "%T").stdout.strip()
        yield cluster
    finally:
        if procs:
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                cluster.run("scancel", "--full", "--user", "root", timeout=30)
                end = time.monotonic() + 60
                while cluster.run("squeue", "-h", "-t", "R,CG,PD").stdout.strip() and time.monotonic() < end:
                    time.sleep(1)
        stop(procs)
        leftovers = run_processes(str(root))
        for proc in leftovers:
            with contextlib.suppress(Exception):
                proc.kill()
        if leftovers:
            print(f"\nkilled {len(leftovers)} process(es) the SLURM daemons left", file=sys.stderr)


def job_state(cluster: Cluster, job: str) -> dict[str, str]:
    out = cluster.run("scontrol", "show", "job", job).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def submit(cluster: Cluster, tmp_path: Path, overrides: list[str]):
    """`sbatch --wait launch/slurm.sbatch configs/tiny-cpu.yaml` on one CPU node (run `one` under
    tmp_path/runs); returns (sbatch's exit code, the job's state, a failure report)."""
    env = {**os.environ, **cluster.env, RUN_TAG: str(tmp_path), "PYTHON": sys.executable, "GPUS_PER_NODE": "0",
           "TRAIN_SET": " ".join([f"run.root={tmp_path / 'runs'}", *overrides]), "RUN_NAME": "one",
           "PORT": str(free_port()), "MASTER_PORT": str(free_port()), "GRPO_SERVER_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    out = tmp_path / "job.out"
    cmd = ["sbatch", "--wait", "--parsable", "--nodes=1", "--gpus-per-node=0", f"--output={out}", "--export=ALL",
           "launch/slurm.sbatch", "configs/tiny-cpu.yaml"]

    def report(what: str) -> str:
        server = tmp_path / "runs" / "one" / "server.log"
        return "\n".join([what, "--- job output (tail) ---", out.read_text()[-6000:] if out.exists() else "(none)",
                          "--- server.log (tail) ---", server.read_text()[-3000:] if server.exists() else "(none)",
                          cluster.logs()])

    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        cluster.run("scancel", "--user", "root")
        pytest.fail(report("sbatch --wait: the job did not finish within 900 s (cancelled)"))
    state = job_state(cluster, proc.stdout.strip().split(";")[0])
    return proc.returncode, state, report(f"sbatch exit {proc.returncode} {proc.stderr}; job {state}")


def assert_nothing_left(tmp_path: Path) -> None:
    """Nothing of the job outlives it: no server, engine or rank (the job's processes carry RUN_TAG)."""
    deadline = time.monotonic() + 60
    while (left := run_processes(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, [" ".join(p.cmdline()) for p in left]


@pytest.mark.slow
def test_sbatch_one_node_cpu_trains_with_two_ranks_and_two_engines(slurm, tiny_model_dir, tmp_path):
    """launch/slurm.sbatch on one CPU node: two engine steps (server.data_parallel_size=2) and a two-rank
    srun step share the node; both engines generate every step."""
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    code, state, report = submit(slurm, tmp_path, [
        f"model.path={tiny_model_dir}", "model.build=", "train.max_steps=2", "eval.enabled=false",
        "server.kv_cache_gib=1", "server.data_parallel_size=2", *TEST_SCALE[1::2]])
    assert code == 0 and state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", report
    run_dir, output = tmp_path / "runs" / "one", (tmp_path / "job.out").read_text()

    # Two ranks of one job: srun started both tasks, and they formed one DeepSpeed group (ZeRO-2
    # partitions the optimizer state in two), whose rank 0 wrote each step once.
    assert "srun_rank: rank 0 of 2 (local 0)" in output and "srun_rank: rank 1 of 2 (local 1)" in output, report
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["server/engines"] == 2 and r["sync/engines_verified"] == 2 for r in rows), report
    step = run_dir / "checkpoints" / "step-2"
    assert sorted(p.name for p in step.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["ranks"] == 2 and info["transport"] == "gloo" and info["device"] == "cpu"
    for log in (tmp_path / "job.out", run_dir / "trainer.log", run_dir / "server.log", run_dir / "server-1.log",
                run_dir / "config.yaml"):
        assert TOKEN not in log.read_text(errors="replace"), f"token leaked into {log}"
    assert_nothing_left(tmp_path)
    assert not set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before


@pytest.mark.slow
def test_sbatch_fails_fast_when_the_server_cannot_start(slurm, tmp_path):
    code, state, report = submit(slurm, tmp_path, [f"model.path={tmp_path / 'no-model'}", "model.build="])
    assert code != 0 and state.get("JobState") == "FAILED" and state.get("ExitCode") == "1:0", report
    output = (tmp_path / "job.out").read_text()
    assert "error: generation server: the server process exited before it became healthy" in output, report
    assert not (tmp_path / "runs" / "one" / "metrics.jsonl").exists()
    assert_nothing_left(tmp_path)
