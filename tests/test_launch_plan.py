"""The launch plan on any machine: which GPUs, hosts, commands and environment each process gets.

`launch/train.py --dry-run --gpus N --plan-json F` starts nothing and loads no model; the real launch
starts exactly the plan's processes, so these tests check the GPU layouts on a CPU box.
"""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.launcher import RECIPE, SECRET, dry_run, plan_for, recipe
from support.processes import one_line_error

from launch.plan import (
    BatchSplit,
    Gpu,
    Layout,
    Plan,
    PlanError,
    describe,
    make_plan,
    parse_inventory,
    read_hostfile,
    redacted,
    visible_gpus,
)

REPO = Path(__file__).resolve().parents[1]


def include(plan: Plan) -> str:
    cmd = plan.trainer.command
    return cmd[cmd.index("--include") + 1]


@pytest.mark.integration
@pytest.mark.parametrize(
    "gpus,tp,ranks,server_gpus,trainer_gpus,transport",
    [
        (1, 1, 1, [0], [0], "ipc"),  # one GPU: both on it, CUDA IPC (NCCL cannot hold a device twice)
        (2, 1, 1, [0], [1], "nccl"),
        (4, 1, 3, [0], [1, 2, 3], "nccl"),
        (4, 2, 2, [0, 1], [2, 3], "nccl"),
        (8, 1, 7, [0], [1, 2, 3, 4, 5, 6, 7], "nccl"),
        (8, 2, 6, [0, 1], [2, 3, 4, 5, 6, 7], "nccl"),
    ],
)
def test_gpu_layouts_never_share_a_gpu(tmp_path, gpus, tp, ranks, server_gpus, trainer_gpus, transport):
    # 16 completions per rank and step: any rank count splits into whole groups
    proc, plan = dry_run(
        "--gpus",
        str(gpus),
        "--set",
        f"server.tensor_parallel_size={tp}",
        "--set",
        "train.micro_batch_size=8",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    [server], trainer = plan.servers, plan.trainer
    assert server.gpus == tuple(server_gpus) and server.tensor_parallel_size == tp and server.engine == 0
    assert server.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, server_gpus))
    assert trainer.ranks == ranks and trainer.gpus == {"localhost": tuple(trainer_gpus)}
    assert include(plan) == "localhost:" + ",".join(map(str, trainer_gpus))
    assert "--num_gpus" not in trainer.command  # DeepSpeed forbids mixing it with --include
    if gpus > 1:
        assert not set(server_gpus) & set(trainer_gpus)
    assert plan.sync.transport == transport
    # spawn for vLLM's engine/worker processes; secrets redacted, named in the printed plan only by name
    assert server.env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    assert server.env["GRPO_SERVER_TOKEN"] == trainer.env["GRPO_SERVER_TOKEN"] == "<redacted>"
    assert SECRET not in proc.stdout + proc.stderr + (tmp_path / "plan.json").read_text()
    assert "GRPO_SERVER_TOKEN" in proc.stdout and "--include" in proc.stdout
    assert not (tmp_path / "runs").exists(), "a dry run writes nothing but the plan"


@pytest.mark.integration
def test_cpu_layout_is_the_real_launch(tmp_path):
    proc, plan = dry_run(tmp_path=tmp_path, env={"GRPO_SERVER_TOKEN": ""})
    assert proc.returncode == 0, proc.stderr
    [server] = plan.servers
    assert server.gpus == () and "CUDA_VISIBLE_DEVICES" not in server.env
    # one engine: vLLM-CPU binds its worker as it likes; the single-engine command and log as before
    assert "VLLM_CPU_OMP_THREADS_BIND" not in server.env and server.log == "server.log"
    assert server.command[-4:] == ("--engine-index", "0", "--port", "8710")
    assert plan.trainer.ranks == 2 and plan.trainer.device == "cpu"
    assert plan.trainer.command[1:3] == ("--num_gpus", "2")
    assert plan.server_urls == ("http://127.0.0.1:8710",)
    assert plan.trainer.command[-2:] == ("--server-url", "http://127.0.0.1:8710")
    assert plan.sync.transport == "gloo"
    # no token given: the launcher made one for this run anyway (redacted here)
    assert server.env["GRPO_SERVER_TOKEN"] == "<redacted>"
    assert "engine 0  127.0.0.1:8710  GPUs: none (CPU)" in proc.stdout


@pytest.mark.integration
@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--gpus", "4", "--set", "train.num_ranks=4"],
            "error: train.num_ranks=4 needs 4 GPUs, but only 3 of 4 are left after the server's tensor_parallel_size=1",
        ),
        (
            ["--gpus", "2", "--set", "server.tensor_parallel_size=2"],
            "error: server.tensor_parallel_size=2 leaves no GPU for training on this host (2 GPUs); use tp <= 1",
        ),
        (
            ["--gpus", "1", "--set", "server.tensor_parallel_size=2"],
            "error: server.tensor_parallel_size=2 needs 2 GPUs; this host has 1",
        ),
        (
            ["--gpus", "2", "--set", "sync.transport=ipc"],
            "error: sync.transport=ipc: trainer and server must share one GPU (use nccl with several)",
        ),
        (
            ["--set", "sync.transport=nccl"],
            "error: sync.transport=nccl needs GPUs; use gloo (or auto) on CPU",
        ),
        (
            ["--gpus", "8", "--set", "server.data_parallel_size=4", "--set", "server.tensor_parallel_size=2"],
            "error: server.data_parallel_size=4 x tensor_parallel_size=2 needs 8 GPUs for generation and leaves none for "
            "training on this host (8 GPUs); use data_parallel_size x tensor_parallel_size <= 7",
        ),
        (
            ["--gpus", "4", "--set", "server.data_parallel_size=2", "--set", "train.num_ranks=3"],
            "error: train.num_ranks=3 needs 3 GPUs, but only 2 of 4 are left after the engines' 2 x 1 GPUs "
            "(server.data_parallel_size x tensor_parallel_size)",
        ),
        (
            ["--launcher", "slurm", "--set", "server.data_parallel_size=2"],
            "error: --launcher slurm: server.data_parallel_size=2 engines run as their own srun steps",
        ),
        (
            [
                "--gpus",
                "4",
                "--set",
                "train.micro_batch_size=2",
            ],  # 3 ranks: 24 completions, not whole groups of 16
            "error: train.micro_batch_size x train.gradient_accumulation_steps x ranks = 2 x 4 x 3 = 24",
        ),
    ],
)
def test_impossible_layouts_are_one_line_errors(tmp_path, args, message):
    proc, plan = dry_run(*args, tmp_path=tmp_path)
    assert proc.returncode == 2 and plan is None
    assert one_line_error(proc).startswith(message)


@pytest.mark.integration
def test_real_launch_refuses_gpus_it_does_not_have(tmp_path):
    proc = subprocess.run(
        [sys.executable, "launch/train.py", "--gpus", "8", "--set", f"run.root={tmp_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and one_line_error(proc).startswith("error: --gpus 8: this host has 0 GPU(s)")


@pytest.mark.integration
def test_two_node_hostfile_plan(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# two trainer nodes\nnode1 slots=8\nnode2 slots=8\n")
    proc, plan = dry_run(
        "--hostfile",
        str(hostfile),
        "--server-url",
        "http://node0:8710",
        "--launcher",
        "slurm",
        "--set",
        "train.num_ranks=4",
        tmp_path=tmp_path,
        config="configs/prem-1b-gsm8k.yaml",
    )
    assert proc.returncode == 2 and "train.num_ranks=4 but" in one_line_error(proc)
    proc, plan = dry_run(
        "--hostfile",
        str(hostfile),
        "--server-url",
        "http://node0:8710",
        "--launcher",
        "slurm",
        "--set",
        "train.num_ranks=0",
        tmp_path=tmp_path,
        config="configs/prem-1b-gsm8k.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    assert plan.servers == () and plan.server_urls == ("http://node0:8710",)
    trainer = plan.trainer
    assert trainer.ranks == 16 and trainer.gpus == {"node1": tuple(range(8)), "node2": tuple(range(8))}
    # one srun step, a task per GPU, on exactly the trainer nodes (srun places by count: without the
    # list it could use the server's node); each task a rank through launch/srun_rank.py, which runs
    # the trainer as a module (DeepSpeed's SLURM runner would start `python -u pipeline/trainer`)
    cmd = trainer.command
    assert cmd[:7] == (
        "srun",
        "--nodes=2",
        "--ntasks=16",
        "--ntasks-per-node=8",
        "--nodelist=node1,node2",
        "--kill-on-bad-exit=1",
        "--export=ALL",
    )
    assert cmd[7:10] == (sys.executable, "-u", str(REPO / "launch" / "srun_rank.py"))
    assert cmd[10] == "--config" and cmd[cmd.index("--run-dir") + 1] == str(Path(trainer.token_file).parent)
    assert "deepspeed" not in " ".join(cmd) and "--module" not in cmd
    # the rendezvous on the first trainer node; srun --export=ALL takes it to every task
    assert trainer.env["MASTER_ADDR"] == "node1" and trainer.env["MASTER_PORT"] == "29500"
    # other nodes get the token from a 0600 file in the (shared) run directory, never the environment
    assert "GRPO_SERVER_TOKEN" not in trainer.env
    assert cmd[cmd.index("--token-file") + 1] == trainer.token_file
    assert trainer.token_file.endswith("server.token") and plan.sync.transport == "nccl"
    assert "srun --nodes=2" in proc.stdout and "MASTER_ADDR MASTER_PORT" in proc.stdout


@pytest.mark.integration
def test_other_multinode_launchers_stay_on_deepspeed(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    proc, plan = dry_run(
        "--hostfile",
        str(hostfile),
        "--server-url",
        "http://node0:8710",
        "--launcher",
        "pdsh",
        "--set",
        "train.num_ranks=0",
        tmp_path=tmp_path,
        config="configs/prem-1b-gsm8k.yaml",
    )
    assert proc.returncode == 0, proc.stderr
    cmd = plan.trainer.command
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:3] == ("--hostfile", str(hostfile))
    assert cmd[cmd.index("--master_addr") + 1] == "node1" and cmd[cmd.index("--launcher") + 1] == "pdsh"
    assert cmd[cmd.index("--module") + 1] == "pipeline.trainer" and plan.trainer.env == {}


@pytest.mark.integration
def test_one_node_cpu_slurm_plan(tmp_path):
    """launch/slurm.sbatch on one CPU node: the ranks beside the server, CPU, gloo, all on loopback."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("vm slots=2\n")
    proc, plan = dry_run(
        "--hostfile",
        str(hostfile),
        "--server-url",
        "http://127.0.0.1:8710",
        "--launcher",
        "slurm",
        "--gpus",
        "0",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        "20007",
        "--set",
        "train.num_ranks=0",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    trainer = plan.trainer
    assert trainer.ranks == 2 and trainer.device == "cpu" and trainer.gpus == {"vm": ()}
    assert trainer.command[:5] == ("srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--nodelist=vm")
    assert trainer.env == {
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "20007",
    }
    assert plan.sync.transport == "gloo" and plan.servers == ()


@pytest.mark.integration
@pytest.mark.parametrize(
    "hosts,args,message",
    [
        (
            "node1 slots=8\nnode2 slots=4\n",
            ["--launcher", "slurm"],
            "error: --launcher slurm: every host needs the same slots (srun --ntasks-per-node), got node1 slots=8, "
            "node2 slots=4",
        ),
        (
            "node1 slots=2\n",
            ["--launcher", "pdsh", "--gpus", "0"],
            "error: --gpus 0 with --hostfile: CPU ranks on several hosts need --launcher slurm",
        ),
        (
            "node1 slots=2\n",
            ["--launcher", "slurm", "--gpus", "0", "--set", "sync.transport=nccl"],
            "error: sync.transport=nccl needs GPUs; use gloo (or auto) on CPU",
        ),
        (
            "node1 slots=8\n",
            ["--launcher", "slurm", "--set", "server.data_parallel_size=2"],
            "error: --server-url names 1 engine(s) but server.data_parallel_size=2; give one URL per engine",
        ),
    ],
)
def test_impossible_multinode_layouts_are_one_line_errors(tmp_path, hosts, args, message):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(hosts)
    proc, plan = dry_run(
        "--hostfile",
        str(hostfile),
        "--server-url",
        "http://node0:8710",
        *args,
        "--set",
        "train.num_ranks=0",
        tmp_path=tmp_path,
    )
    assert proc.returncode == 2 and plan is None
    assert one_line_error(proc).startswith(message)


def test_hostfile_errors(tmp_path):
    bad = tmp_path / "hosts"
    bad.write_text("node1 slots=8\nnode2\n")
    with pytest.raises(PlanError, match=r"hosts:2: expected 'hostname slots=N'"):
        read_hostfile(str(bad))
    bad.write_text("node1 slots=8\n")
    with pytest.raises(PlanError, match="--hostfile: start the server on its own node"):
        make_plan(Layout(gpus=0, server_port=1, hostfile=str(bad), run_dir="r", master_port=1, token="t"))


def test_redacted_keeps_the_real_plan_intact():
    plan = make_plan(Layout(gpus=2, run_dir="r", resume=True, master_port=29501, token="s3cret"))
    shown = redacted(plan)
    assert shown.servers[0].env["GRPO_SERVER_TOKEN"] == shown.trainer.env["GRPO_SERVER_TOKEN"] == "<redacted>"
    assert plan.servers[0].env["GRPO_SERVER_TOKEN"] == "s3cret"  # what the real launch passes on
    assert plan.trainer.command[-1] == "--resume"


@pytest.mark.integration
def test_plan_json_keeps_its_keys(tmp_path):
    """`--plan-json` is documented (README): its keys, at every level, in this order."""
    proc, _ = dry_run("--gpus", "1", tmp_path=tmp_path, config=RECIPE)
    assert proc.returncode == 0, proc.stderr
    document = json.loads((tmp_path / "plan.json").read_text())
    assert list(document) == ["servers", "trainer", "sync", "server_urls", "batch", "memory", "notes"]
    [server], trainer, memory = document["servers"], document["trainer"], document["memory"]
    assert list(server) == ["engine", "host", "port", "gpus", "tensor_parallel_size", "log", "command", "env"]
    assert list(trainer) == ["ranks", "gpus", "device", "command", "env", "unset_env", "token_file"]
    assert list(document["sync"]) == ["transport"]
    assert list(document["batch"]) == [
        "completions_per_step",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "ranks",
        "derived",
    ]
    assert list(memory) == [
        "model_source",
        "gpu_memory_utilization",
        "kv_cache_gib",
        "lines",
        "params",
        "zero_stage",
        "trainer_peak_at",
        "trainer_rank_gib",
        "margin_gib",
        "server_min_gib",
        "trainer_share_gib",
    ]
    assert isinstance(server["gpus"], list) and isinstance(trainer["gpus"]["localhost"], list)
    assert Plan.from_json(document).to_json() == document
    # on CPU there is no memory split; not checked, only what was known
    proc, plan = dry_run(tmp_path=tmp_path)
    assert json.loads((tmp_path / "plan.json").read_text())["memory"] is None and plan.memory is None
    proc, plan = dry_run(
        "--gpus",
        "1",
        "--set",
        "model.path=nobody/unknown-7b",
        "--set",
        "server.gpu_memory_utilization=0.4",
        tmp_path=tmp_path,
        config=RECIPE,
    )
    assert list(json.loads((tmp_path / "plan.json").read_text())["memory"]) == [
        "model_source",
        "gpu_memory_utilization",
        "kv_cache_gib",
        "lines",
    ]


# --- several generation engines (server.data_parallel_size) ------------------------------------------


@pytest.mark.parametrize(
    "dp,tp,engine_gpus,trainer_gpus",
    [
        (2, 2, [[0, 1], [2, 3]], [4, 5, 6, 7]),
        (4, 1, [[0], [1], [2], [3]], [4, 5, 6, 7]),
    ],
)
def test_several_engines_on_8_gpus(dp, tp, engine_gpus, trainer_gpus):
    plan = plan_for(8, tp, dp=dp)
    servers = plan.servers
    assert [list(s.gpus) for s in servers] == engine_gpus and [s.engine for s in servers] == list(range(dp))
    assert [s.port for s in servers] == [8710 + i for i in range(dp)]
    assert [s.log for s in servers] == ["server.log"] + [f"server-{i}.log" for i in range(1, dp)]
    for i, server in enumerate(servers):
        assert server.tensor_parallel_size == tp and server.host == "127.0.0.1"
        assert server.env["CUDA_VISIBLE_DEVICES"] == ",".join(map(str, engine_gpus[i]))
        assert (
            server.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and "VLLM_CPU_OMP_THREADS_BIND" not in server.env
        )
        assert server.command[1:] == (
            "-m",
            "pipeline.generation.serve",
            "--config",
            "/r/config.yaml",
            "--run-dir",
            "/r",
            "--engine-index",
            str(i),
            "--port",
            str(8710 + i),
        )
    trainer = plan.trainer
    assert trainer.ranks == 4 and trainer.gpus == {"localhost": tuple(trainer_gpus)}
    assert include(plan) == "localhost:4,5,6,7" and plan.sync.transport == "nccl" and plan.notes == ()
    urls = tuple(f"http://127.0.0.1:{8710 + i}" for i in range(dp))
    assert plan.server_urls == urls
    cmd = trainer.command
    assert cmd[cmd.index("--server-url") + 1] == ",".join(urls)


def test_several_engines_memory_and_compute_modes():
    from launch.memory import plan_memory
    from launch.plan import check_compute_modes

    gpus = [Gpu(i, 80.0) for i in range(8)]
    plan = plan_for(8, 2, dp=2)
    memory = plan_memory(plan, gpus, recipe("server.tensor_parallel_size=2", "server.data_parallel_size=2"))
    assert memory.gpu_memory_utilization == 0.9  # the engines' own GPUs: vLLM's default, the same for each
    assert any(line.startswith("each of 2 engines needs >= ") for line in memory.lines)
    assert any(line.startswith("GPUs 4,5,6,7: a trainer rank each") for line in memory.lines)
    # the share is sized by the smallest of every engine's GPUs
    small = [Gpu(g.index, 3.0) if g.index == 3 else g for g in gpus]
    with pytest.raises(
        PlanError, match=r"^GPU 3 has 3.0 GiB; at server.gpu_memory_utilization=0.9 vLLM gets "
    ):
        plan_memory(
            plan_for(8, 2, dp=2),
            small,
            recipe("server.tensor_parallel_size=2", "server.data_parallel_size=2"),
        )
    # every engine's GPUs count, not only the first engine's
    check_compute_modes(plan, gpus)
    prohibited = [Gpu(g.index, g.memory_gib, "Prohibited") if g.index == 3 else g for g in gpus]
    with pytest.raises(PlanError, match="GPU 3 is in PROHIBITED compute mode"):
        check_compute_modes(plan, prohibited)


def test_several_engines_on_cpu_each_on_its_own_core():
    plan = plan_for(0, dp=2, completions=0, cpu_count=2)
    servers = plan.servers
    assert len(servers) == 2 and [s.gpus for s in servers] == [(), ()]
    assert [s.port for s in servers] == [8710, 8711]
    # vLLM-CPU's auto binding puts every engine's worker on the same core: each gets its own
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in servers] == ["0", "1"]
    assert all("CUDA_VISIBLE_DEVICES" not in s.env and s.env["GRPO_SERVER_TOKEN"] == "t" for s in servers)
    assert [s.command[-4:] for s in servers] == [
        ("--engine-index", "0", "--port", "8710"),
        ("--engine-index", "1", "--port", "8711"),
    ]
    cmd = plan.trainer.command
    assert cmd[1:3] == ("--num_gpus", "2") and plan.sync.transport == "gloo"
    assert cmd[cmd.index("--server-url") + 1] == "http://127.0.0.1:8710,http://127.0.0.1:8711"
    assert plan.server_urls == ("http://127.0.0.1:8710", "http://127.0.0.1:8711")
    # more engines than cores: round robin, said in a note; tensor-parallel workers a core each
    plan = plan_for(0, dp=3, completions=0, cpu_count=2)
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in plan.servers] == ["0", "1", "0"]
    assert any("engines share cores" in note for note in plan.notes)
    plan = plan_for(0, tp=2, dp=2, completions=0, cpu_count=8)
    assert [s.env["VLLM_CPU_OMP_THREADS_BIND"] for s in plan.servers] == ["0|1", "2|3"]


def test_engines_on_other_hosts(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=8\nnode2 slots=8\n")
    urls = "http://node0:8710,http://node0:8711"
    plan = plan_for(8, dp=2, completions=0, hostfile=str(hostfile), server_url=urls, launcher="slurm")
    assert plan.servers == () and plan.server_urls == ("http://node0:8710", "http://node0:8711")
    cmd = plan.trainer.command
    assert cmd[cmd.index("--server-url") + 1] == urls and plan.trainer.ranks == 16
    assert "server  already running at http://node0:8710, http://node0:8711" in describe(plan)
    # server.data_parallel_size 1 (not set): the URLs given say how many engines there are
    assert plan_for(8, completions=0, hostfile=str(hostfile), server_url=urls).server_urls == tuple(
        urls.split(",")
    )
    with pytest.raises(
        PlanError,
        match=r"^--server-url names 2 engine\(s\) but server.data_parallel_size=3; give "
        r"one URL per engine, comma-separated, or set server.data_parallel_size=2$",
    ):
        plan_for(8, dp=3, completions=0, hostfile=str(hostfile), server_url=urls)
    with pytest.raises(PlanError, match="expected URLs separated by commas"):
        plan_for(8, completions=0, hostfile=str(hostfile), server_url="http://node0:8710,")


def test_several_engines_refused_where_they_cannot_run():
    with pytest.raises(
        PlanError, match=r"^server.data_parallel_size=2: one GPU holds one engine and one trainer rank"
    ):
        plan_for(1, dp=2)
    with pytest.raises(
        PlanError,
        match=r"^server.data_parallel_size=3 x tensor_parallel_size=1 needs 3 GPUs for "
        r"generation and leaves none for training on this host \(2 GPUs\)",
    ):
        plan_for(2, dp=3)
    with pytest.raises(PlanError, match="server.data_parallel_size: must be at least 1, got 0"):
        plan_for(2, dp=0)
    plan = plan_for(8, dp=2, num_ranks=2)  # the idle note names the engines
    assert plan.notes == ("GPUs 4,5,6,7 idle: train.num_ranks=2 (0 = use every GPU the engines leave)",)


# --- the recipe on any number of GPUs: batch split, memory, visible GPUs, paths ---------------------


@pytest.mark.integration
def test_one_gpu_starts_the_recipe(tmp_path):
    # the recipe's step (2 per device x 2 accumulation x 4 devices = 16 completions) on one GPU: accumulation 8,
    # vLLM gets what full AdamW training of the 1.1B model leaves of the card
    proc, plan = dry_run("--gpus", "1", tmp_path=tmp_path, config=RECIPE)
    assert proc.returncode == 0, proc.stderr
    assert plan.servers[0].gpus == (0,) and plan.trainer.gpus == {"localhost": (0,)}
    assert plan.batch == BatchSplit(
        16, 2, 8, 1, "accumulation derived from train.completions_per_step=16 for 1 rank(s)"
    )
    memory = plan.memory
    assert memory.params == 1_100_064_768  # prem-1B-chat's config.json: TinyLlama's shape, vocab 32004
    # 22 B/param at the optimizer step (2 weights + 4 master + 8 Adam + 8 transients) + the CUDA context
    assert 23 < memory.trainer_rank_gib < 24 and memory.trainer_peak_at == "optimizer step"
    assert (
        memory.gpu_memory_utilization == 0.06 and memory.trainer_share_gib == 75.2
    )  # vLLM: what a step needs
    out = proc.stdout
    assert (
        "batch   16 completions per step = micro_batch_size 2 x gradient_accumulation_steps 8 x 1 rank(s)"
        in out
    )
    assert (
        "step transients 8.2 (1.1B x 8 B: max(gradients 2 + flat copy 2 + fp32 4, fp32 gradient 4 + fused AdamW 0))"
        in out
    )
    assert "server.gpu_memory_utilization = ceil(4.7 / 80.0, 0.01) = 0.06 (auto), KV cache 0.7 GiB" in out


@pytest.mark.integration
@pytest.mark.parametrize(
    "inventory,message",
    [
        (
            "0, 23034, Default",
            "error: GPU 0 has 22.5 GiB, too small for the server and a trainer rank: ~23.5 GiB for full "
            "AdamW training + >= 4.7 for vLLM + 2.4 margin = 30.6 GiB",
        ),
        (
            "0, 81559, Exclusive_Process",
            "error: GPU 0 is in EXCLUSIVE_PROCESS compute mode (one process at a time), but "
            "the server and a trainer rank share it",
        ),
    ],
)
def test_one_gpu_refusals_are_one_line(tmp_path, inventory, message):
    proc, plan = dry_run(tmp_path=tmp_path, config=RECIPE, env={"GRPO_GPU_INVENTORY": inventory})
    assert proc.returncode == 2 and plan is None
    assert one_line_error(proc).startswith(message)


@pytest.mark.parametrize(
    "gpus,tp,num_ranks,ranks,accumulation,idle",
    [
        (2, 1, 0, 1, 8, ""),
        (3, 1, 0, 2, 4, ""),
        (
            4,
            1,
            0,
            2,
            4,
            "GPUs 3 idle: train.completions_per_step=16 splits evenly over at most 2 of the 3 GPUs left; "
            "a multiple of 48 would use all 3",
        ),
        (
            8,
            1,
            0,
            4,
            2,
            "GPUs 5,6,7 idle: train.completions_per_step=16 splits evenly over at most 4 of the 7 GPUs left",
        ),
        (8, 2, 0, 4, 2, "GPUs 6,7 idle"),
        (8, 1, 2, 2, 4, "GPUs 3,4,5,6,7 idle: train.num_ranks=2 (0 = use every GPU the server leaves)"),
    ],
)
def test_any_gpu_count_keeps_the_recipe_step(gpus, tp, num_ranks, ranks, accumulation, idle):
    plan = plan_for(gpus, tp, num_ranks)
    batch = plan.batch
    assert (batch.ranks, batch.micro_batch_size, batch.gradient_accumulation_steps) == (
        ranks,
        2,
        accumulation,
    )
    assert batch.completions_per_step == 16 and plan.trainer.local_gpus == tuple(range(tp, tp + ranks))
    assert [n for n in plan.notes if n.startswith(idle)] if idle else plan.notes == ()


def test_batch_split_limits():
    batch = plan_for(17, num_ranks=16).batch  # a rank's share (1) is below micro_batch_size: lowered
    assert (batch.micro_batch_size, batch.gradient_accumulation_steps) == (1, 1)
    assert "micro_batch_size 2 -> 1: a rank's share is 1" in batch.derived
    with pytest.raises(
        PlanError,
        match=r"train.completions_per_step=16 does not split evenly over 3 ranks; use "
        r"1, 2, 4, 8, 16 ranks \(train.num_ranks\), or a multiple of 48 completions",
    ):
        plan_for(4, num_ranks=3)
    assert plan_for(4, completions=0).batch == BatchSplit(12, 2, 2, 3, "")


def test_memory_share_is_auto_only_when_left_at_auto():
    from launch.memory import plan_memory

    gpu = [Gpu(0, 80.0)]
    memory = plan_memory(plan_for(2), gpu + [Gpu(1, 80.0)], recipe())
    assert memory.gpu_memory_utilization == 0.9  # the server's own GPU: vLLM's default
    # a model whose size nobody knows: auto cannot split a shared GPU, a set share is used unchecked
    unknown = ["model.path=nobody/unknown-7b"]
    with pytest.raises(
        PlanError,
        match="server.gpu_memory_utilization: auto splits GPU 0 by the model's size, but "
        "model.path=nobody/unknown-7b is not a local directory",
    ):
        plan_memory(plan_for(1), gpu, recipe(*unknown))
    memory = plan_memory(plan_for(1), gpu, recipe(*unknown, "server.gpu_memory_utilization=0.4"))
    assert memory.gpu_memory_utilization == 0.4 and memory.lines[0].startswith("not checked")


@pytest.mark.integration
def test_inherited_cuda_visible_devices_are_physical_ids(tmp_path):
    inventory = ";".join(f"{i}, 81559, Default" for i in range(8))
    for env in ({"GRPO_GPU_INVENTORY": inventory}, {}):  # the host's GPUs, or a dry run without nvidia-smi
        proc, plan = dry_run(
            "--gpus",
            "3",
            "--set",
            "train.micro_batch_size=8",
            tmp_path=tmp_path,
            env={"CUDA_VISIBLE_DEVICES": "3,5,6", **env},
        )
        assert proc.returncode == 0, proc.stderr
        [server] = plan.servers
        assert server.gpus == (3,) and server.env["CUDA_VISIBLE_DEVICES"] == "3"
        assert include(plan) == "localhost:5,6" and plan.trainer.gpus == {"localhost": (5, 6)}
        # DeepSpeed's --include takes physical ids over all GPUs: the ranks must not inherit the variable;
        # ids are nvidia-smi's, in CUDA's numbering too
        assert plan.trainer.unset_env == ("CUDA_VISIBLE_DEVICES",)
        assert server.env["CUDA_DEVICE_ORDER"] == plan.trainer.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    proc, plan = dry_run(
        "--gpus",
        "4",
        "--set",
        "server.data_parallel_size=2",
        "--set",
        "train.micro_batch_size=8",
        tmp_path=tmp_path,
        env={"CUDA_VISIBLE_DEVICES": "3,5,6,7", "GRPO_GPU_INVENTORY": inventory},
    )
    assert proc.returncode == 0, proc.stderr
    servers = plan.servers
    assert [s.gpus for s in servers] == [(3,), (5,)] and [s.port for s in servers] == [8710, 8711]
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in servers] == ["3", "5"] and include(plan) == "localhost:6,7"
    assert all(s.env["GRPO_SERVER_TOKEN"] == "<redacted>" for s in servers)
    assert SECRET not in proc.stdout + proc.stderr + (tmp_path / "plan.json").read_text()
    assert (
        "engine 0  127.0.0.1:8710  GPUs: 3" in proc.stdout
        and "engine 1  127.0.0.1:8711  GPUs: 5" in proc.stdout
    )
    cmd = plan.trainer.command
    assert cmd[cmd.index("--server-url") + 1] == "http://127.0.0.1:8710,http://127.0.0.1:8711"
    with pytest.raises(
        PlanError, match=r"CUDA_VISIBLE_DEVICES=2,9: no GPU 9 on this host \(nvidia-smi lists 0,1,2,3\)"
    ):
        visible_gpus(parse_inventory("0, 1, Default\n1, 1, Default\n2, 1, Default\n3, 1, Default"), "2,9")
    assert [g.index for g in visible_gpus(parse_inventory(inventory), "6,1")] == [6, 1]


@pytest.mark.integration
def test_launch_from_outside_the_repository(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "my.yaml").write_text((REPO / "configs" / "tiny-cpu.yaml").read_text())
    (elsewhere / "hosts").write_text("node1 slots=2\n")
    for config in ("my.yaml", "configs/tiny-cpu.yaml"):  # relative to where launched, else to the repository
        proc, plan = dry_run("--name", "r1", tmp_path=tmp_path, config=config, cwd=elsewhere, root="myruns")
        assert proc.returncode == 0, proc.stderr
        run_dir = str(elsewhere / "myruns" / "r1")
        for cmd in (plan.servers[0].command, plan.trainer.command):  # they start in the repository
            assert cmd[cmd.index("--run-dir") + 1] == run_dir
            assert cmd[cmd.index("--config") + 1] == run_dir + "/config.yaml"
    proc, plan = dry_run(
        "--hostfile",
        "hosts",
        "--server-url",
        "http://node0:8710",
        "--set",
        "train.num_ranks=0",
        "--set",
        "train.micro_batch_size=8",
        tmp_path=tmp_path,
        cwd=elsewhere,
    )
    assert proc.returncode == 0, proc.stderr
    cmd = plan.trainer.command
    assert cmd[cmd.index("--hostfile") + 1] == str(elsewhere / "hosts")


def test_resolved_config_names_paths_absolutely(tmp_path, monkeypatch):
    from launch.train import absolute_paths, config_file
    from pipeline.config import load_config

    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    config = load_config(
        config_file("configs/tiny-cpu.yaml"),
        [
            "model.build=",
            "model.path=model",
            "data.source=jsonl",
            "data.train_file=train.jsonl",
            "run.root=runs",
            "data.system_prompt=@prompt.txt",
        ],
    )
    absolute_paths(config)
    assert config.model.path == str(tmp_path / "model") and config.run.root == str(tmp_path / "runs")
    assert (
        config.data.train_file == str(tmp_path / "train.jsonl")
        and config.data.system_prompt == f"@{tmp_path}/prompt.txt"
    )
    config = load_config(config_file("configs/prem-1b-gsm8k.yaml"))
    absolute_paths(config)
    assert config.model.path == "premai-io/prem-1B-chat"  # no such directory here: a hub name, kept


def test_in_process_train_runs_what_the_command_runs(tmp_path, monkeypatch, capsys):
    """`train(config, Options(...))`: the command's phases from Python (main only parses the command line
    and calls it); the caller's config is left as given, the plan comes back."""
    from launch.train import Options, Outcome, train
    from pipeline.config import load_config

    monkeypatch.setenv("GRPO_GPU_INVENTORY", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    config = load_config(REPO / RECIPE, [f"run.root={tmp_path}", "run.name=inproc"])
    outcome = train(config, Options(gpus=8, dry_run=True, master_port=29501))
    assert outcome.code == 0 and outcome.run_dir == tmp_path / "inproc"
    assert outcome.plan.trainer.ranks == 4 and outcome.plan.sync.transport == "nccl"
    assert config.train.deepspeed_config == "auto" and config.sync.transport == "auto"  # as given
    assert "trainer 4 DeepSpeed rank(s) on cuda" in capsys.readouterr().out
    assert train(config, Options(gpus=8)) == Outcome(2)  # a real launch: this host has no 8 GPUs
    assert capsys.readouterr().err.startswith("error: --gpus 8: this host has 0 GPU(s)")
    assert not (tmp_path / "inproc").exists()


# --- the launcher's watch over its engines (fake processes: nothing is started) ----------------------


class FakeEngine:
    """Stands in for a ServerProcess: `exit()` ends it; a restart's `wait_healthy` blocks until `healthy`."""

    def __init__(self, log_path="server.log"):
        self.code = None
        self.stopped = 0
        self.healthy = threading.Event()
        self.log_path = log_path
        self.proc = self

    def poll(self):
        return self.code

    @property
    def returncode(self):
        return self.code

    def exit(self, code=-9):
        self.code = code

    def stop(self):
        self.stopped += 1

    def wait_healthy(self, deadline_s):
        from pipeline.generation.client import ServerError

        if not self.healthy.wait(deadline_s):
            self.code = 1
            raise ServerError("no health in time\n--- log tail ---")


def test_engines_restart_independently():
    from launch.train import EngineMonitor

    engines = [FakeEngine(), FakeEngine("server-1.log")]
    started: list[tuple[int, FakeEngine]] = []

    def start(i):
        started.append((i, FakeEngine()))
        return started[-1][1]

    said: list[str] = []
    monitor = EngineMonitor(
        engines, start, restart=True, max_restarts=1, startup_timeout_s=30, say=said.append
    )
    monitor.poll()
    assert said == [] and started == []
    first = engines[1]
    first.exit()
    monitor.poll()
    assert said == ["engine 1 exited (code -9); restarting it (1 of at most 1)"] and first.stopped == 1
    assert [i for i, _ in started] == [1] and engines[1] is started[0][1]
    # engine 1's restart is still loading (its health not yet answered): engine 0's exit is noticed anyway,
    # and engine 0 has restarts of its own
    engines[0].exit(code=-15)
    monitor.poll()
    assert said[-1] == "engine 0 exited (code -15); restarting it (1 of at most 1)"
    for _, engine in started:
        engine.healthy.set()
    monitor.waiting[1].join(5)
    # engine 1 dies again: past its limit it stays down, the run goes on
    engines[1].exit()
    monitor.poll()
    monitor.poll()
    assert (
        said[-1]
        == "engine 1 exited (code -9) and has used its 1 restart; the run goes on with the other engines"
    )
    assert len(started) == 2 and monitor.down == {1} and engines[1].stopped == 1


def test_engine_that_does_not_come_back_is_restarted_again():
    from launch.train import EngineMonitor

    engines = [FakeEngine()]
    said: list[str] = []
    monitor = EngineMonitor(
        engines, lambda i: FakeEngine(), restart=True, max_restarts=2, startup_timeout_s=0.01, say=said.append
    )
    engines[0].exit()
    monitor.poll()
    monitor.waiting[0].join(5)  # no health in time: it is stopped, and says so in one line
    assert said == [
        "generation server exited (code -9); restarting it (1 of at most 2)",
        "generation server did not come back: no health in time (log: server.log)",
    ]
    monitor.poll()
    assert said[-1] == "generation server exited (code 1); restarting it (2 of at most 2)"
    # restart off: one line, the engine left down
    engines = [FakeEngine()]
    monitor = EngineMonitor(
        engines, lambda i: FakeEngine(), restart=False, max_restarts=3, startup_timeout_s=1, say=said.append
    )
    engines[0].exit(code=0)
    monitor.poll()
    monitor.poll()
    assert said[-1] == "generation server exited (code 0) and is not restarted (server.restart is off)"
    assert monitor.down == {0} and engines[0].stopped == 1
