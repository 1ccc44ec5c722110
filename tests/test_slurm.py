"""SLURM for real: launch/srun_rank.py's variable mapping, and launch/slurm.sbatch on a one-host cluster.

The cluster (munged, slurmctld, slurmd; config, state, logs and the munge socket in a temp dir, on
free loopback ports, no systemd) is started by the `slurm` fixture and torn down after the session.
Its node has 4 fake GPUs for Slurm's gres/gpu plugin (character device files in the temp dir, which
nothing opens): a step that holds them gets CUDA_VISIBLE_DEVICES from Slurm, as on a GPU cluster.
The tests install nothing: CI's set-up (.ci/run) installs Debian's `slurm-wlm` and `munge`; where they
are missing, or the tests do not run as root, the cluster's tests skip with the reason (a failure on CI,
tests/conftest.py).
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.constants import RUN_TAG, TEST_SCALE
from support.processes import run_processes

from launch.srun_rank import expand_hostnames, tasks_on_node, torch_env
from pipeline.generation import serve
from pipeline.generation.client import free_port

REPO = Path(__file__).resolve().parents[1]
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo")
TOKEN = "slurm-test-token-not-secret"
SLURM_TASK = {
    "SLURM_PROCID": "3",
    "SLURM_NTASKS": "4",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    "SLURM_STEP_NUM_NODES": "2",
    "SLURM_JOB_ID": "1234",
    "SLURM_STEP_NODELIST": "gpu[07-08]",
}
FAKE_GPUS = 4


# --- launch/srun_rank.py: pure functions --------------------------------------------------------
def test_srun_task_maps_to_torch_variables():
    env = torch_env(SLURM_TASK, expand=lambda nodes: {"gpu[07-08]": ["gpu07", "gpu08"]}[nodes])
    assert env == {
        "RANK": "3",
        "WORLD_SIZE": "4",
        "LOCAL_RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "LOCAL_SIZE": "2",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": "21234",
    }


def test_variables_already_set_win():
    given = {**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "LOCAL_RANK": "0"}
    env = torch_env(given, expand=lambda nodes: pytest.fail("the node list must not be looked up"))
    assert not {"MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"} & set(env) and env["RANK"] == "3"


def test_job_nodelist_and_tasks_per_node_fallbacks():
    task = {
        "SLURM_PROCID": "0",
        "SLURM_NTASKS": "3",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "1",
        "SLURM_TASKS_PER_NODE": "2,1",
        "SLURM_JOB_NODELIST": "a,b",
    }
    env = torch_env(task, expand=lambda nodes: nodes.split(","))
    assert env["MASTER_ADDR"] == "a" and env["LOCAL_WORLD_SIZE"] == "1" and env["MASTER_PORT"] == "20000"
    assert (
        torch_env({**task, "SLURM_TASKS_PER_NODE": "", "SLURM_NTASKS_PER_NODE": "2"}, expand=lambda n: ["a"])[
            "LOCAL_WORLD_SIZE"
        ]
        == "2"
    )
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
    """As srun starts it: the variables set, then `pipeline.trainer` as __main__ with the arguments."""
    # from elsewhere, no PYTHONPATH: the entry puts the repository first on sys.path itself
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "MASTER_", "RANK", "LOCAL_", "PYTHONPATH"))
    }
    proc = subprocess.run(
        [sys.executable, "-u", str(REPO / "launch" / "srun_rank.py"), "--help"],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, **SLURM_TASK, "MASTER_ADDR": "127.0.0.1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: pipeline.trainer " in proc.stdout and "--token-file" in proc.stdout
    assert "srun_rank: rank 3 of 4 (local 1)" in proc.stderr and "master 127.0.0.1:21234" in proc.stderr


# --- serve --gpus: positions in the GPUs the task was given -------------------------------------
@pytest.mark.parametrize(
    ("given", "spec", "chosen"),
    [
        ("0,1,2,3", "2,3", "2,3"),  # Slurm: a step holding the node's 4 GPUs
        ("4,5,6,7", "1", "5"),  # Slurm without ConstrainDevices: the physical ids of the job's GPUs
        ("0,1", "1", "1"),  # Slurm with ConstrainDevices: the step's GPUs renumbered from 0
        ("GPU-a, GPU-b", "1", "GPU-b"),  # UUIDs as given
        (None, "2,3", "2,3"),  # no list: the host's GPUs (physical, PCI bus order)
    ],
)
def test_serve_gpus_are_positions_in_the_gpus_the_task_was_given(given, spec, chosen):
    environ = {} if given is None else {"CUDA_VISIBLE_DEVICES": given}
    assert serve.set_engine_gpus(spec, environ) == chosen.split(",")
    assert environ == {"CUDA_VISIBLE_DEVICES": chosen, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def test_serve_gpus_errors_name_the_flag(monkeypatch, capsys):
    """One line each, before the engine is started."""
    for name, value in (
        ("VLLM_WORKER_MULTIPROC_METHOD", "spawn"),
        ("PYTORCH_NVML_BASED_CUDA_CHECK", "1"),
        ("CUDA_DEVICE_ORDER", "PCI_BUS_ID"),
    ):
        monkeypatch.setenv(name, value)  # main sets them in os.environ: restored afterwards
    for spec, message in {
        "2": "--gpus 2: this process was given 2 GPU(s) (CUDA_VISIBLE_DEVICES=0,1)",
        "a": "--gpus a: expected GPU positions separated by commas, e.g. 0 or 2,3",
        "1,1": "--gpus 1,1: expected distinct GPU positions >= 0",
        "0,1": "--gpus 0,1: 2 GPU(s) for server.tensor_parallel_size=1",
    }.items():
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
        assert serve.main(["--model", "unused", "--gpus", spec]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


# --- a one-host SLURM cluster --------------------------------------------------------------------
@dataclass
class Cluster:
    root: Path
    host: str
    env: dict[str, str]
    gpus: int = 0
    """fake GPUs in the node's gres (0: mknod refused, see no_gpus)"""
    no_gpus: str = ""

    def run(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd, env={**os.environ, **self.env}, capture_output=True, text=True, timeout=timeout
        )

    def logs(self) -> str:
        out = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            out.append(f"--- {name} (tail) ---\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(out)


def require_slurm() -> None:
    """SLURM and munge here, run as root, or a skip naming what is missing. The tests install nothing:
    CI's set-up (.ci/run) installs Debian's `slurm-wlm` and `munge`; elsewhere install them yourself."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if os.geteuid() != 0:
        pytest.skip("the one-host SLURM cluster runs slurmd and munged as root; not root here")
    if missing:
        pytest.skip(
            f"SLURM is not installed ({', '.join(missing)} missing): `apt-get install slurm-wlm munge` "
            "(.ci/run does it on CI)"
        )


def slurm_conf(root: Path, host: str, cpus: int, ctld_port: int, slurmd_port: int, gpus: int = 0) -> str:
    """The smallest slurm.conf for one node on loopback: no cgroups, no accounting, state in `root`;
    `gpus` GPUs as gres (gres.conf beside it names their device files)."""
    return "\n".join(
        [
            "ClusterName=grpotest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={root / 'munge.socket'}",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"StateSaveLocation={root / 'state'}",
            f"SlurmdSpoolDir={root / 'spool'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",  # the node is what this file says, whatever slurmd detects
            "KillWait=10",
            "MinJobAge=600",  # finished jobs stay visible to `scontrol show job`
            *(["GresTypes=gpu"] if gpus else []),
            f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000{f' Gres=gpu:{gpus}' if gpus else ''} "
            "State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]
    )


def fake_gpus(root: Path, count: int) -> str:
    """`count` fake GPUs for the node's gres: gres.conf in `root` naming character devices in root/dev
    (195:N, as /dev/nvidiaN; nothing opens them). Slurm 22.05 refuses regular files ("is not a valid
    character or block device") and then sets no CUDA_VISIBLE_DEVICES at all. Returns why not, or ""."""
    (root / "dev").mkdir()
    try:
        for i in range(count):
            os.mknod(root / "dev" / f"gpu{i}", 0o600 | stat.S_IFCHR, os.makedev(195, i))
    except OSError as e:
        return f"no fake GPU device files for Slurm's gres/gpu: mknod: {e.strerror or e}"
    (root / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={root / 'dev'}/gpu[0-{count - 1}]\n")
    return ""


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
    require_slurm()
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname().split(".")[0]
    for d in ("state", "spool"):
        (root / d).mkdir()
    conf = root / "slurm.conf"
    no_gpus = fake_gpus(root, FAKE_GPUS)  # gres.conf beside slurm.conf
    gpus = 0 if no_gpus else FAKE_GPUS
    conf.write_text(slurm_conf(root, host, os.cpu_count() or 1, free_port(), free_port(), gpus))
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    cluster = Cluster(root, host, {"SLURM_CONF": str(conf)}, gpus, no_gpus)
    # RUN_TAG: whatever the daemons start (slurmstepd) is found and killed at the end
    env = {**os.environ, **cluster.env, RUN_TAG: str(root)}
    commands = {  # -f: munged accepts a socket directory others cannot reach (root's temp dir)
        "munged.out": [
            "munged",
            "-F",
            "-f",
            f"--socket={root / 'munge.socket'}",
            f"--key-file={key}",
            f"--pid-file={root / 'munged.pid'}",
            f"--seed-file={root / 'munged.seed'}",
            f"--log-file={root / 'munged.log'}",
        ],
        "slurmctld.out": ["slurmctld", "-D", "-f", str(conf)],
        "slurmd.out": ["slurmd", "-D", "-f", str(conf), "-N", host],
    }
    procs: list[subprocess.Popen] = []
    try:
        for log, cmd in commands.items():
            with open(root / log, "wb") as out:
                procs.append(
                    subprocess.Popen(
                        cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                )
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
                pytest.fail(
                    f"SLURM node not idle within 90 s (state {state!r}, exited: {dead})\n{cluster.logs()}"
                )
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


ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
    "PREEMPTED",
}


def submit(
    cluster: Cluster, tmp_path: Path, overrides: list[str], gpus: int = 0, settings: dict | None = None
):
    """`sbatch launch/slurm.sbatch configs/tiny-cpu.yaml` on one node, CPU only unless `gpus` (run `one`
    under tmp_path/runs; `settings`: more of the script's environment settings), waited for; returns
    (the job's exit code, its state, a failure report). Polled every second, not `sbatch --wait`: that
    sleeps 2, 8, then 32 s between looks (MinJobAge=600), so a 13 s job was seen done after 42."""
    env = {
        **os.environ,
        **cluster.env,
        RUN_TAG: str(tmp_path),
        "PYTHON": sys.executable,
        "GPUS_PER_NODE": str(gpus),
        "TRAIN_SET": " ".join([f"run.root={tmp_path / 'runs'}", *overrides]),
        "RUN_NAME": "one",
        "PORT": str(free_port()),
        "MASTER_PORT": str(free_port()),
        "GRPO_SERVER_TOKEN": TOKEN,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        **(settings or {}),
    }
    out = tmp_path / "job.out"
    cmd = [
        "sbatch",
        "--parsable",
        "--nodes=1",
        f"--gpus-per-node={gpus}",
        f"--output={out}",
        "--export=ALL",
        "launch/slurm.sbatch",
        "configs/tiny-cpu.yaml",
    ]

    def report(what: str) -> str:
        server = tmp_path / "runs" / "one" / "server.log"
        return "\n".join(
            [
                what,
                "--- job output (tail) ---",
                out.read_text()[-6000:] if out.exists() else "(none)",
                "--- server.log (tail) ---",
                server.read_text()[-3000:] if server.exists() else "(none)",
                cluster.logs(),
            ]
        )

    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, report(f"sbatch exit {proc.returncode}: {proc.stderr}")
    job, deadline = proc.stdout.strip().split(";")[0], time.monotonic() + 900
    while (state := job_state(cluster, job)).get("JobState") not in ENDED:
        if time.monotonic() > deadline:
            cluster.run("scancel", job)
            pytest.fail(report(f"job {job} did not finish within 900 s (cancelled): {state}"))
        time.sleep(1)
    code = int(state.get("ExitCode", "-1:0").split(":")[0])
    return code, state, report(f"job {job} exit {code}: {state}")


def assert_nothing_left(tmp_path: Path) -> None:
    """Nothing of the job outlives it: no server, engine or rank (the job's processes carry RUN_TAG)."""
    deadline = time.monotonic() + 60
    while (left := run_processes(str(tmp_path))) and time.monotonic() < deadline:
        time.sleep(1)
    assert not left, [" ".join(p.cmdline()) for p in left]


@pytest.mark.e2e
def test_sbatch_one_node_cpu_trains_with_two_ranks_and_two_engines(slurm, tiny_model_dir, tmp_path):
    """launch/slurm.sbatch on one CPU node: two engine steps (server.data_parallel_size=2) and a two-rank
    srun step share the node; both engines generate every step."""
    shm_before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    code, state, report = submit(
        slurm,
        tmp_path,
        [
            f"model.path={tiny_model_dir}",
            "model.build=",
            "train.max_steps=2",
            "eval.enabled=false",
            "server.kv_cache_gib=1",
            "server.data_parallel_size=2",
            *TEST_SCALE[1::2],
        ],
    )
    assert code == 0 and state.get("JobState") == "COMPLETED" and state.get("ExitCode") == "0:0", report
    run_dir, output = tmp_path / "runs" / "one", (tmp_path / "job.out").read_text()

    # Two ranks of one job: srun started both tasks, and they formed one DeepSpeed group (ZeRO-2
    # partitions the optimizer state in two), whose rank 0 wrote each step once.
    assert "srun_rank: rank 0 of 2 (local 0)" in output and "srun_rank: rank 1 of 2 (local 1)" in output, (
        report
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["server/engines"] == 2 and r["sync/engines_verified"] == 2 for r in rows), report
    step = run_dir / "checkpoints" / "step-2"
    assert sorted(p.name for p in step.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["ranks"] == 2 and info["transport"] == "gloo" and info["device"] == "cpu"
    for log in (
        tmp_path / "job.out",
        run_dir / "trainer.log",
        run_dir / "server.log",
        run_dir / "server-1.log",
        run_dir / "config.yaml",
    ):
        assert TOKEN not in log.read_text(errors="replace"), f"token leaked into {log}"
    assert_nothing_left(tmp_path)
    assert not set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - shm_before


@pytest.mark.e2e
def test_sbatch_fails_fast_when_the_server_cannot_start(slurm, tmp_path):
    code, state, report = submit(slurm, tmp_path, [f"model.path={tmp_path / 'no-model'}", "model.build="])
    assert code != 0 and state.get("JobState") == "FAILED" and state.get("ExitCode") == "1:0", report
    output = (tmp_path / "job.out").read_text()
    assert "error: generation server: the server process exited before it became healthy" in output, report
    assert not (tmp_path / "runs" / "one" / "metrics.jsonl").exists()
    assert_nothing_left(tmp_path)


@pytest.mark.e2e  # about 20 s, but it needs the cluster
def test_sbatch_gres_engines_each_take_their_own_gpus(slurm, tmp_path):
    """Issue #30: Slurm's gres/gpu plugin sets CUDA_VISIBLE_DEVICES in every task of a step that holds
    GPUs, over what `srun --export` passes, so every engine the sbatch started took GPU 0. Now each
    engine picks its own inside its task (serve --gpus: positions in Slurm's list). Two engines x TP 2 on
    the node's 4 (fake) GPUs, started by the sbatch as on a server node (CHECK_ENGINES=1: one node with
    GPUs otherwise goes to launch/train.py); the model is missing, so each engine logs its devices and
    exits, and the job fails fast."""
    if not slurm.gpus:
        pytest.skip(slurm.no_gpus)
    allocated = ",".join(map(str, range(slurm.gpus)))
    # What the sbatch used to do: the exported value never reaches a task of a step with GPUs.
    old = slurm.run(
        "srun",
        "--nodes=1",
        "--ntasks=1",
        f"--gpus-per-node={slurm.gpus}",
        "--export=ALL,CUDA_VISIBLE_DEVICES=1",
        "printenv",
        "CUDA_VISIBLE_DEVICES",
    )
    assert (old.returncode, old.stdout.strip()) == (0, allocated), f"{old.stderr}\n{slurm.logs()}"

    code, state, report = submit(
        slurm,
        tmp_path,
        [f"model.path={tmp_path / 'no-model'}", "model.build=", "server.data_parallel_size=2"],
        gpus=slurm.gpus,
        settings={"TP": "2", "CHECK_ENGINES": "1"},
    )
    assert code != 0 and state.get("JobState") == "FAILED" and state.get("ExitCode") == "1:0", report
    assert (
        "error: generation server: the server process exited before it became healthy"
        in (tmp_path / "job.out").read_text()
    ), report
    run_dir = tmp_path / "runs" / "one"
    for engine, (log, gpus) in enumerate([("server.log", "0,1"), ("server-1.log", "2,3")]):
        text = (run_dir / log).read_text(errors="replace")
        assert (
            f"engine {engine}: CUDA_VISIBLE_DEVICES={gpus} (--gpus {gpus} of CUDA_VISIBLE_DEVICES={allocated})"
            in text
        ), f"{log}:\n{text[-3000:]}\n{report}"
    assert_nothing_left(tmp_path)
