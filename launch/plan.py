"""The launch plan: which processes a run starts, on which hosts and GPUs, with which commands and
environment. Pure Python (no torch, no model): `launch/train.py --dry-run` prints it, `--plan-json`
writes it, and the real launch starts exactly these processes (one code path).

Placement, on the host that launches (GPUs 0..N-1):
- no GPU: the server on CPU, `train.num_ranks` (default 2) CPU ranks, our gloo transfer engine;
- one GPU: server and one rank share it (memory split by server.gpu_memory_utilization) and sync
  through vLLM's CUDA `ipc` engine: NCCL refuses a communicator that holds one device twice;
- two or more: the server on GPUs [0, tp), the ranks on the rest via `--include` (DeepSpeed's
  `--num_gpus` would start at GPU 0, under the server), vLLM's `nccl` engine;
- a hostfile (several nodes): the ranks on the hostfile's slots (GPUs; CPU ranks with `gpus=0`,
  SLURM only), the server already running elsewhere (`--server-url`), the token in a 0600 file
  (DeepSpeed's PDSH runner forwards only some environment variables to other nodes). With
  `--launcher slurm` the ranks are srun's tasks, started by launch/srun_rank.py (DeepSpeed's own
  SLURM runner starts them without `-m` and without RANK/LOCAL_RANK/MASTER_ADDR); other launchers
  go through `deepspeed --hostfile`.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from pipeline.generation.client import TOKEN_ENV
from pipeline.sync.transport import resolve_transport

SECRET_ENV = (TOKEN_ENV,)
SRUN_RANK = str(Path(__file__).resolve().with_name("srun_rank.py"))
REDACTED = "<redacted>"


class PlanError(ValueError):
    """The requested layout cannot run; the message names the setting."""


def read_hostfile(path: str) -> dict[str, int]:
    """DeepSpeed hostfile lines `host slots=N` -> {host: N} (comments and blank lines skipped)."""
    hosts: dict[str, int] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise PlanError(f"--hostfile: cannot read {path}: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("slots=")), None)
        if slots is None or not slots.isdigit() or int(slots) < 1:
            raise PlanError(f"{path}:{number}: expected 'hostname slots=N' with N >= 1, got {line!r}")
        if parts[0] in hosts:
            raise PlanError(f"{path}:{number}: host {parts[0]} is listed twice")
        hosts[parts[0]] = int(slots)
    if not hosts:
        raise PlanError(f"{path}: no hosts (expected lines like 'node1 slots=8')")
    return hosts


def make_plan(*, gpus: int, tp: int, num_ranks: int, server_host: str, server_port: int, server_url: str | None,
              hostfile: str | None, transport: str, config_path: str, run_dir: str, resume: bool,
              master_port: int, token: str, python: str = sys.executable, deepspeed: str = "deepspeed",
              launcher: str = "", master_addr: str = "", srun: str = "srun") -> dict:
    """The processes of one run as a JSON-able dict (token values included: see `redacted`)."""
    if tp < 1:
        raise PlanError(f"server.tensor_parallel_size: must be at least 1, got {tp}")
    cuda = gpus > 0
    common_env = {TOKEN_ENV: token} if token else {}
    server = None
    token_file = None
    if hostfile:
        if not server_url:
            raise PlanError("--hostfile: start the server on its own node and pass --server-url "
                            "(see launch/slurm.sbatch)")
        hosts = read_hostfile(hostfile)
        trainer_gpus = {host: list(range(slots)) if cuda else [] for host, slots in hosts.items()}
        ranks = sum(slots for slots in hosts.values())
        if num_ranks and num_ranks != ranks:
            raise PlanError(f"train.num_ranks={num_ranks} but {hostfile} has {ranks} slots; set 0 to use all")
        if not cuda and launcher != "slurm":
            raise PlanError("--gpus 0 with --hostfile: CPU ranks on several hosts need --launcher slurm "
                            "(DeepSpeed's other runners do not pass DS_ACCELERATOR=cpu on)")
        backend = resolve_transport(transport, cuda=cuda)
        if backend == "nccl" and not cuda:
            raise PlanError("sync.transport=nccl needs GPUs; use gloo (or auto) on CPU")
        token_file = str(Path(run_dir) / "server.token")
        trainer_env = {}  # other nodes read the token from the file; the environment does not reach them
        if not cuda:
            trainer_env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        master = master_addr or next(iter(hosts))
        if launcher == "slurm":
            trainer_env.update({"MASTER_ADDR": master, "MASTER_PORT": str(master_port)})
            command = srun_command(hosts, srun, python)
        else:
            command = [deepspeed, "--hostfile", hostfile, "--master_addr", master, "--master_port", str(master_port),
                       *(["--launcher", launcher] if launcher else []), "--module", "pipeline.trainer.train"]
    else:
        if not cuda:
            ranks = num_ranks or 2
            trainer_gpus = {"localhost": []}
            backend = resolve_transport(transport, cuda=False)
            placement = ["--num_gpus", str(ranks), "--master_port", str(master_port)]
            trainer_env = {**common_env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
            server_gpus: list[int] = []
        elif gpus == 1:
            if tp != 1:
                raise PlanError(f"server.tensor_parallel_size={tp} needs {tp} GPUs; this host has 1")
            if num_ranks > 1:
                raise PlanError(f"train.num_ranks={num_ranks}: one GPU holds the server and one trainer rank")
            ranks, server_gpus, trainer_gpus = 1, [0], {"localhost": [0]}
            backend = resolve_transport(transport, cuda=True, shared_gpu=True)
            placement = ["--include", "localhost:0", "--master_port", str(master_port)]
            trainer_env = dict(common_env)
        else:
            free = gpus - tp
            if free < 1:
                raise PlanError(f"server.tensor_parallel_size={tp} leaves no GPU for training on this host "
                                f"({gpus} GPUs); use tp <= {gpus - 1}")
            ranks = num_ranks or free
            if ranks > free:
                raise PlanError(f"train.num_ranks={ranks} needs {ranks} GPUs, but only {free} of {gpus} are left "
                                f"after the server's tensor_parallel_size={tp}")
            server_gpus = list(range(tp))
            trainer_gpus = {"localhost": list(range(tp, tp + ranks))}
            backend = resolve_transport(transport, cuda=True)
            placement = ["--include", "localhost:" + ",".join(map(str, trainer_gpus["localhost"])),
                         "--master_port", str(master_port)]
            trainer_env = dict(common_env)
        if backend == "ipc" and gpus != 1:
            raise PlanError("sync.transport=ipc: trainer and server must share one GPU (use nccl with several)")
        if backend == "nccl" and not cuda:
            raise PlanError("sync.transport=nccl needs GPUs; use gloo (or auto) on CPU")
        if not server_url:
            server_env = {**common_env, "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
                          "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
            if cuda:
                server_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, server_gpus))
            server = {"host": server_host, "port": server_port, "gpus": server_gpus, "tensor_parallel_size": tp,
                      "command": [python, "-m", "pipeline.generation.serve", "--config", config_path, "--run-dir", run_dir],
                      "env": server_env}
        command = [deepspeed, *placement, "--module", "pipeline.trainer.train"]
    url = server_url or f"http://{server_host}:{server_port}"
    command += ["--config", config_path, "--run-dir", run_dir, "--server-url", url]
    command += ["--token-file", token_file] if token_file else []
    command += ["--resume"] if resume else []
    return {"server": server,
            "trainer": {"ranks": ranks, "gpus": trainer_gpus, "device": "cuda" if cuda else "cpu",
                        "command": command, "env": trainer_env, "token_file": token_file},
            "sync": {"transport": backend}, "server_url": url}


def srun_command(hosts: dict[str, int], srun: str, python: str) -> list[str]:
    """The trainer step: one srun task per slot, on exactly the hostfile's hosts (srun places tasks by
    count, so without --nodelist it may use the server's node), each a rank via launch/srun_rank.py."""
    if len(set(hosts.values())) > 1:
        raise PlanError(f"--launcher slurm: every host needs the same slots (srun --ntasks-per-node), got "
                        f"{', '.join(f'{h} slots={n}' for h, n in hosts.items())}")
    per_node = next(iter(hosts.values()))
    return [srun, f"--nodes={len(hosts)}", f"--ntasks={per_node * len(hosts)}", f"--ntasks-per-node={per_node}",
            f"--nodelist={','.join(hosts)}", "--kill-on-bad-exit=1", "--export=ALL", python, "-u", SRUN_RANK]


def redacted(plan: dict) -> dict:
    """The plan with secret values replaced (for printing and --plan-json)."""
    import copy

    out = copy.deepcopy(plan)
    for part in (out["server"], out["trainer"]):
        for name in SECRET_ENV:
            if part and name in part["env"]:
                part["env"][name] = REDACTED
    return out


def describe(plan: dict) -> str:
    """Human-readable dry run: processes, hosts, GPUs, commands, names (never values) of env vars."""
    lines = []
    server = plan["server"]
    if server:
        gpus = ",".join(map(str, server["gpus"])) or "none (CPU)"
        lines += [f"server  {server['host']}:{server['port']}  GPUs: {gpus}  tensor_parallel_size: "
                  f"{server['tensor_parallel_size']}",
                  f"        env: {' '.join(sorted(server['env']))}",
                  f"        $ {shlex.join(server['command'])}"]
    else:
        lines.append(f"server  already running at {plan['server_url']} (not started by this launcher)")
    trainer = plan["trainer"]
    where = "; ".join(f"{host}: GPUs {','.join(map(str, g)) or 'none (CPU)'}" for host, g in trainer["gpus"].items())
    lines += [f"trainer {trainer['ranks']} DeepSpeed rank(s) on {trainer['device']}  ({where})",
              f"        env: {' '.join(sorted(trainer['env'])) or '(inherited only)'}"
              + (f"; token from {trainer['token_file']} (0600)" if trainer["token_file"] else ""),
              f"        $ {shlex.join(trainer['command'])}",
              f"sync    {plan['sync']['transport']} (vLLM weight-transfer API)"]
    return "\n".join(lines)
