"""SLURM: launch/srun_rank.py's mapping of srun's task variables to torch's."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.srun_rank import expand_hostnames, tasks_on_node, torch_env

REPO = Path(__file__).resolve().parents[1]
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
