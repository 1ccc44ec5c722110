"""The launch plan on any machine: which GPUs, hosts, commands and environment each process gets.

`launch/train.py --dry-run --gpus N --plan-json F` starts nothing and loads no model; the real launch
starts exactly the plan's processes, so these tests check the GPU layouts on a CPU box.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import one_line_error

from launch.plan import PlanError, make_plan, read_hostfile, redacted

REPO = Path(__file__).resolve().parents[1]
SECRET = "plan-test-secret"


def dry_run(*args: str, tmp_path: Path, config: str = "configs/tiny-cpu.yaml", env: dict | None = None):
    out = tmp_path / "plan.json"
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", config, "--dry-run", "--plan-json",
                           str(out), "--set", f"run.root={tmp_path / 'runs'}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GRPO_SERVER_TOKEN": SECRET, **(env or {})})
    plan = json.loads(out.read_text()) if out.exists() else None
    return proc, plan


def include(plan) -> str:
    cmd = plan["trainer"]["command"]
    return cmd[cmd.index("--include") + 1]


@pytest.mark.parametrize("gpus,tp,ranks,server_gpus,trainer_gpus,transport", [
    (1, 1, 1, [0], [0], "ipc"),           # one GPU: both on it, CUDA IPC (NCCL cannot hold a device twice)
    (2, 1, 1, [0], [1], "nccl"),
    (4, 1, 3, [0], [1, 2, 3], "nccl"),
    (4, 2, 2, [0, 1], [2, 3], "nccl"),
    (8, 1, 7, [0], [1, 2, 3, 4, 5, 6, 7], "nccl"),
    (8, 2, 6, [0, 1], [2, 3, 4, 5, 6, 7], "nccl"),
])
def test_gpu_layouts_never_share_a_gpu(tmp_path, gpus, tp, ranks, server_gpus, trainer_gpus, transport):
    # 16 completions per rank and step: any rank count splits into whole groups
    proc, plan = dry_run("--gpus", str(gpus), "--set", f"server.tensor_parallel_size={tp}",
                         "--set", "train.micro_batch_size=8", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    server, trainer = plan["server"], plan["trainer"]
    assert server["gpus"] == server_gpus and server["tensor_parallel_size"] == tp
    assert server["env"]["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, server_gpus))
    assert trainer["ranks"] == ranks and trainer["gpus"] == {"localhost": trainer_gpus}
    assert include(plan) == "localhost:" + ",".join(map(str, trainer_gpus))
    assert "--num_gpus" not in trainer["command"]  # DeepSpeed forbids mixing it with --include
    if gpus > 1:
        assert not set(server_gpus) & set(trainer_gpus)
    assert plan["sync"]["transport"] == transport
    # spawn for vLLM's engine/worker processes; secrets redacted, named in the printed plan only by name
    assert server["env"]["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert server["env"]["GRPO_SERVER_TOKEN"] == trainer["env"]["GRPO_SERVER_TOKEN"] == "<redacted>"
    assert SECRET not in proc.stdout + proc.stderr + json.dumps(plan)
    assert "GRPO_SERVER_TOKEN" in proc.stdout and "--include" in proc.stdout
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing but the plan"


def test_cpu_layout_is_the_real_launch(tmp_path):
    proc, plan = dry_run(tmp_path=tmp_path, env={"GRPO_SERVER_TOKEN": ""})
    assert proc.returncode == 0, proc.stderr
    assert plan["server"]["gpus"] == [] and "CUDA_VISIBLE_DEVICES" not in plan["server"]["env"]
    assert plan["trainer"]["ranks"] == 2 and plan["trainer"]["device"] == "cpu"
    assert plan["trainer"]["command"][1:3] == ["--num_gpus", "2"]
    assert plan["sync"]["transport"] == "gloo"
    # no token given: the launcher made one for this run anyway (redacted here)
    assert plan["server"]["env"]["GRPO_SERVER_TOKEN"] == "<redacted>"


@pytest.mark.parametrize("args,message", [
    (["--gpus", "4", "--set", "train.num_ranks=4"],
     "error: train.num_ranks=4 needs 4 GPUs, but only 3 of 4 are left after the server's tensor_parallel_size=1"),
    (["--gpus", "2", "--set", "server.tensor_parallel_size=2"],
     "error: server.tensor_parallel_size=2 leaves no GPU for training on this host (2 GPUs); use tp <= 1"),
    (["--gpus", "1", "--set", "server.tensor_parallel_size=2"],
     "error: server.tensor_parallel_size=2 needs 2 GPUs; this host has 1"),
    (["--gpus", "2", "--set", "sync.transport=ipc"],
     "error: sync.transport=ipc: trainer and server must share one GPU (use nccl with several)"),
    (["--set", "sync.transport=nccl"], "error: sync.transport=nccl needs GPUs; use gloo (or auto) on CPU"),
    (["--gpus", "4", "--set", "train.micro_batch_size=2"],  # 3 ranks: 24 completions, not whole groups of 16
     "error: train.micro_batch_size x train.gradient_accumulation_steps x ranks = 2 x 4 x 3 = 24"),
])
def test_impossible_layouts_are_one_line_errors(tmp_path, args, message):
    proc, plan = dry_run(*args, tmp_path=tmp_path)
    assert proc.returncode == 2 and plan is None
    assert one_line_error(proc).startswith(message)


def test_real_launch_refuses_gpus_it_does_not_have(tmp_path):
    proc = subprocess.run([sys.executable, "launch/train.py", "--gpus", "8", "--set", f"run.root={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and one_line_error(proc).startswith("error: --gpus 8: this host has 0 GPU(s)")


def test_two_node_hostfile_plan(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two trainer nodes\nnode1 slots=8\nnode2 slots=8\n")
    proc, plan = dry_run("--hostfile", str(hostfile), "--server-url", "http://node0:8710", "--launcher", "slurm",
                         "--set", "train.micro_batch_size=8", tmp_path=tmp_path, config="configs/prem-1b-gsm8k.yaml")
    assert proc.returncode == 2 and "train.num_ranks=4 but" in one_line_error(proc)  # the recipe pins 4 ranks
    proc, plan = dry_run("--hostfile", str(hostfile), "--server-url", "http://node0:8710", "--launcher", "slurm",
                         "--set", "train.num_ranks=0", tmp_path=tmp_path, config="configs/prem-1b-gsm8k.yaml")
    assert proc.returncode == 0, proc.stderr
    assert plan["server"] is None and plan["server_url"] == "http://node0:8710"
    trainer = plan["trainer"]
    assert trainer["ranks"] == 16 and trainer["gpus"] == {"node1": list(range(8)), "node2": list(range(8))}
    # one srun step, a task per GPU, on exactly the trainer nodes (srun places by count: without the
    # list it could use the server's node); each task a rank through launch/srun_rank.py, which runs
    # the trainer as a module (DeepSpeed's SLURM runner would start `python -u pipeline.trainer.train`)
    cmd = trainer["command"]
    assert cmd[:7] == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--nodelist=node1,node2",
                       "--kill-on-bad-exit=1", "--export=ALL"]
    assert cmd[7:10] == [sys.executable, "-u", str(REPO / "launch" / "srun_rank.py")]
    assert cmd[10] == "--config" and cmd[cmd.index("--run-dir") + 1] == str(Path(trainer["token_file"]).parent)
    assert "deepspeed" not in " ".join(cmd) and "--module" not in cmd
    # the rendezvous on the first trainer node; srun --export=ALL takes it to every task
    assert trainer["env"]["MASTER_ADDR"] == "node1" and trainer["env"]["MASTER_PORT"] == "29500"
    # other nodes get the token from a 0600 file in the (shared) run directory, never the environment
    assert "GRPO_SERVER_TOKEN" not in trainer["env"]
    assert cmd[cmd.index("--token-file") + 1] == trainer["token_file"]
    assert trainer["token_file"].endswith("server.token") and plan["sync"]["transport"] == "nccl"
    assert "srun --nodes=2" in proc.stdout and "MASTER_ADDR MASTER_PORT" in proc.stdout


def test_other_multinode_launchers_stay_on_deepspeed(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    proc, plan = dry_run("--hostfile", str(hostfile), "--server-url", "http://node0:8710", "--launcher", "pdsh",
                         "--set", "train.num_ranks=0", tmp_path=tmp_path, config="configs/prem-1b-gsm8k.yaml")
    assert proc.returncode == 0, proc.stderr
    cmd = plan["trainer"]["command"]
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:3] == ["--hostfile", str(hostfile)]
    assert cmd[cmd.index("--master_addr") + 1] == "node1" and cmd[cmd.index("--launcher") + 1] == "pdsh"
    assert cmd[cmd.index("--module") + 1] == "pipeline.trainer.train" and plan["trainer"]["env"] == {}


def test_one_node_cpu_slurm_plan(tmp_path):
    """launch/slurm.sbatch on one CPU node: the ranks beside the server, CPU, gloo, all on loopback."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("vm slots=2\n")
    proc, plan = dry_run("--hostfile", str(hostfile), "--server-url", "http://127.0.0.1:8710", "--launcher", "slurm",
                         "--gpus", "0", "--master-addr", "127.0.0.1", "--master-port", "20007",
                         "--set", "train.num_ranks=0", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    trainer = plan["trainer"]
    assert trainer["ranks"] == 2 and trainer["device"] == "cpu" and trainer["gpus"] == {"vm": []}
    assert trainer["command"][:5] == ["srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--nodelist=vm"]
    assert trainer["env"] == {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": "20007"}
    assert plan["sync"]["transport"] == "gloo" and plan["server"] is None


@pytest.mark.parametrize("hosts,args,message", [
    ("node1 slots=8\nnode2 slots=4\n", ["--launcher", "slurm"],
     "error: --launcher slurm: every host needs the same slots (srun --ntasks-per-node), got node1 slots=8, "
     "node2 slots=4"),
    ("node1 slots=2\n", ["--launcher", "pdsh", "--gpus", "0"],
     "error: --gpus 0 with --hostfile: CPU ranks on several hosts need --launcher slurm"),
    ("node1 slots=2\n", ["--launcher", "slurm", "--gpus", "0", "--set", "sync.transport=nccl"],
     "error: sync.transport=nccl needs GPUs; use gloo (or auto) on CPU"),
])
def test_impossible_multinode_layouts_are_one_line_errors(tmp_path, hosts, args, message):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(hosts)
    proc, plan = dry_run("--hostfile", str(hostfile), "--server-url", "http://node0:8710", *args,
                         "--set", "train.num_ranks=0", tmp_path=tmp_path)
    assert proc.returncode == 2 and plan is None
    assert one_line_error(proc).startswith(message)


def test_hostfile_errors(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("node1 slots=8\nnode2\n")
    with pytest.raises(PlanError, match=r"hosts:2: expected 'hostname slots=N'"):
        read_hostfile(str(bad))
    bad.write_text("node1 slots=8\n")
    with pytest.raises(PlanError, match="--hostfile: start the server on its own node"):
        make_plan(gpus=0, tp=1, num_ranks=0, server_host="127.0.0.1", server_port=1, server_url=None,
                  hostfile=str(bad), transport="auto", config_path="c", run_dir="r", resume=False,
                  master_port=1, token="t")


def test_redacted_keeps_the_real_plan_intact():
    plan = make_plan(gpus=2, tp=1, num_ranks=0, server_host="127.0.0.1", server_port=8710, server_url=None,
                     hostfile=None, transport="auto", config_path="c.yaml", run_dir="r", resume=True,
                     master_port=29501, token="s3cret")
    shown = redacted(plan)
    assert shown["server"]["env"]["GRPO_SERVER_TOKEN"] == "<redacted>"
    assert plan["server"]["env"]["GRPO_SERVER_TOKEN"] == "s3cret"  # what the real launch passes on
    assert plan["trainer"]["command"][-1] == "--resume"
