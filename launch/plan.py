"""The launch plan: which processes a run starts, on which hosts and GPUs, with which commands and
environment. Pure Python (no torch, no model): `launch/train.py --dry-run` prints it, `--plan-json`
writes it, and the real launch starts exactly these processes (one code path).

Placement, on the host that launches, over the GPUs visible to it (CUDA_VISIBLE_DEVICES, else all),
positions 0..N-1 named by their physical ids in every command and variable (DeepSpeed's `--include`
takes physical ids and drops CUDA_VISIBLE_DEVICES, so the trainer's is unset):
- server.data_parallel_size N (default 1): N generation engines, each its own server process
  (`serve --engine-index i`) on port server.port + i with tensor_parallel_size GPUs; the trainer gets
  every engine's URL, comma-separated, in `--server-url` (engine i's at position i);
- no GPU: the engines on CPU (with N > 1 each engine's vLLM worker pinned to its own core),
  `train.num_ranks` (default 2) CPU ranks, our gloo transfer engine;
- one GPU: one engine and one rank share it (memory split by server.gpu_memory_utilization, auto: see
  launch/memory.py) and sync through vLLM's CUDA `ipc` engine: NCCL refuses a communicator that holds
  one device twice;
- two or more: engine i on GPUs [i*tp, (i+1)*tp), the ranks on the rest via `--include` (DeepSpeed's
  `--num_gpus` would start at GPU 0, under the engines), vLLM's `nccl` engine; GPUs left idle are named
  in the plan's notes, with the reason;
- train.completions_per_step set: the ranks (num_ranks 0) are the most that split it evenly, and
  each rank's micro-batches and accumulation are derived from it (`split_batch`);
- a hostfile (several nodes): the ranks on the hostfile's slots (GPUs; CPU ranks with `gpus=0`,
  SLURM only), the engines already running elsewhere (`--server-url`, comma-separated URLs), the token in a 0600 file
  (DeepSpeed's PDSH runner forwards only some environment variables to other nodes). With
  `--launcher slurm` the ranks are srun's tasks, started by launch/srun_rank.py (DeepSpeed's own
  SLURM runner starts them without `-m` and without RANK/LOCAL_RANK/MASTER_ADDR); other launchers
  go through `deepspeed --hostfile`.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from pathlib import Path

from pipeline.generation.client import TOKEN_ENV
from pipeline.generation.server_process import log_name
from pipeline.generation.transport import resolve_transport

SECRET_ENV = (TOKEN_ENV,)
# GPU ids in the plan are nvidia-smi's; CUDA numbers GPUs fastest first unless told to use nvidia-smi's order.
PHYSICAL_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
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


def parse_inventory(text: str) -> list[dict]:
    """`nvidia-smi --query-gpu=index,memory.total,compute_mode --format=csv,noheader,nounits` (lines, or
    `;`-separated as an environment variable holds them) -> [{index, memory_gib, compute_mode}]."""
    gpus = []
    for line in filter(str.strip, text.replace(";", "\n").splitlines()):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            raise PlanError(f"GPU inventory: expected 'index, memory MiB, compute mode', got {line.strip()!r}")
        try:
            memory_gib = float(parts[1]) / 1024
        except ValueError:
            raise PlanError(f"GPU inventory: memory.total of GPU {parts[0]} is {parts[1]!r}, not MiB") from None
        gpus.append({"index": int(parts[0]), "memory_gib": round(memory_gib, 1), "compute_mode": parts[2]})
    return gpus


def visible_gpus(inventory: list[dict], cuda_visible_devices: str | None) -> list[dict]:
    """The GPUs a run may use, in CUDA's order: those CUDA_VISIBLE_DEVICES names (physical indices), or
    every GPU when it is unset."""
    if cuda_visible_devices is None or not inventory:
        return inventory
    names = [n.strip() for n in cuda_visible_devices.split(",") if n.strip()]
    if not all(n.isdigit() for n in names):
        raise PlanError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}: the launcher takes GPU indices (DeepSpeed's "
                        f"--include names GPUs by index), not UUIDs")
    by_index = {g["index"]: g for g in inventory}
    missing = [n for n in names if int(n) not in by_index]
    if missing:
        raise PlanError(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}: no GPU {missing[0]} on this host "
                        f"(nvidia-smi lists {','.join(map(str, by_index))})")
    return [by_index[int(n)] for n in names]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pick_ranks(available: int, num_ranks: int, completions: int) -> int:
    """train.num_ranks, else all `available` slots, or with train.completions_per_step set the most of
    them that split it evenly (a rank's completions per step are whole)."""
    if num_ranks or not completions:
        return num_ranks or available
    return max(d for d in divisors(completions) if d <= available)


def idle_note(idle: list[int], free: int, num_ranks: int, completions: int, engines: int = 1) -> str:
    """Why GPUs the engines left are not training: a GPU box must not sit half idle unexplained."""
    gpus = ",".join(map(str, idle))
    if num_ranks:
        who = "the server leaves" if engines == 1 else "the engines leave"
        return f"GPUs {gpus} idle: train.num_ranks={num_ranks} (0 = use every GPU {who})"
    ranks = free - len(idle)
    return (f"GPUs {gpus} idle: train.completions_per_step={completions} splits evenly over at most {ranks} of the "
            f"{free} GPUs left; a multiple of {math.lcm(completions, free)} would use all {free}")


def split_batch(completions: int, micro: int, accumulation: int, ranks: int) -> dict:
    """Completions per optimizer step = micro_batch_size x gradient_accumulation_steps x ranks. With
    train.completions_per_step set, the recipe's step is kept whatever the rank count: micro_batch_size
    stays (lowered only when a rank's share is smaller) and the accumulation is derived."""
    batch = {"completions_per_step": micro * accumulation * ranks, "micro_batch_size": micro,
             "gradient_accumulation_steps": accumulation, "ranks": ranks, "derived": ""}
    if not completions:
        return batch
    if completions % ranks:
        raise PlanError(f"train.completions_per_step={completions} does not split evenly over {ranks} ranks; use "
                        f"{', '.join(map(str, divisors(completions)))} ranks (train.num_ranks), or a multiple of "
                        f"{math.lcm(completions, ranks)} completions")
    share = completions // ranks
    m = max(d for d in divisors(share) if d <= micro)
    batch.update(completions_per_step=completions, micro_batch_size=m, gradient_accumulation_steps=share // m,
                 derived=f"accumulation derived from train.completions_per_step={completions} for {ranks} rank(s)"
                         + (f"; micro_batch_size {micro} -> {m}: a rank's share is {share}" if m < micro else ""))
    return batch


def engine_urls(server_url: str | None) -> list[str]:
    """--server-url: one URL, or engine URLs comma-separated (engine i's at position i)."""
    if not server_url:
        return []
    urls = [u.strip() for u in server_url.split(",")]
    if not all(urls):
        raise PlanError(f"--server-url {server_url}: expected URLs separated by commas (one per engine), "
                        f"got an empty one")
    return urls


def cpu_bind(engine: int, tp: int, cpus: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for engine `engine`: a core of its own per tensor-parallel worker
    (vLLM-CPU's format: one core list per worker, `|`-separated). vLLM-CPU's `auto` binds every
    engine's worker to the same core, so two engines would take turns on it."""
    return "|".join(str((engine * tp + worker) % cpus) for worker in range(tp))


def make_plan(*, gpus: int, tp: int, num_ranks: int, server_host: str, server_port: int, server_url: str | None,
              hostfile: str | None, transport: str, config_path: str, run_dir: str, resume: bool,
              master_port: int, token: str, dp: int = 1, python: str = sys.executable, deepspeed: str = "deepspeed",
              launcher: str = "", master_addr: str = "", srun: str = "srun", gpu_ids: list[int] | None = None,
              micro_batch_size: int = 1, gradient_accumulation_steps: int = 1, completions_per_step: int = 0,
              cpu_count: int | None = None) -> dict:
    """The processes of one run as a JSON-able dict (token values included: see `redacted`). `gpu_ids`:
    the physical ids of the visible GPUs in CUDA's order (default 0..gpus-1). `dp`: the generation
    engines (server.data_parallel_size); `server_url`: engines already running, comma-separated.
    `cpu_count`: the cores engines are pinned to on CPU (default os.cpu_count())."""
    ids = list(range(gpus)) if gpu_ids is None else list(gpu_ids)
    if len(ids) != gpus:
        raise PlanError(f"--gpus {gpus}: {len(ids)} GPU ids given ({','.join(map(str, ids))})")
    notes: list[str] = []
    unset_env: list[str] = []
    if tp < 1:
        raise PlanError(f"server.tensor_parallel_size: must be at least 1, got {tp}")
    if dp < 1:
        raise PlanError(f"server.data_parallel_size: must be at least 1, got {dp}")
    urls = engine_urls(server_url)
    if urls and dp > 1 and len(urls) != dp:
        raise PlanError(f"--server-url names {len(urls)} engine(s) but server.data_parallel_size={dp}; give one "
                        f"URL per engine, comma-separated, or set server.data_parallel_size={len(urls)}")
    if launcher == "slurm" and dp > 1 and not urls:
        raise PlanError(f"--launcher slurm: server.data_parallel_size={dp} engines run as their own srun steps "
                        f"(launch/slurm.sbatch starts them); pass their URLs: --server-url URL,URL,...")
    if not urls and server_port + dp - 1 > 65535:
        raise PlanError(f"server.port={server_port}: engine {dp - 1} of server.data_parallel_size={dp} would "
                        f"listen on {server_port + dp - 1}, above 65535")
    cuda = gpus > 0
    common_env = {TOKEN_ENV: token} if token else {}
    servers: list[dict] = []
    token_file = None
    # the engines' GPUs, in the server's own wording when there is one
    engines_use = (f"the server's tensor_parallel_size={tp}" if dp == 1 else
                   f"the engines' {dp} x {tp} GPUs (server.data_parallel_size x tensor_parallel_size)")
    if hostfile:
        if not urls:
            raise PlanError("--hostfile: start the server on its own node and pass --server-url (comma-separated "
                            "URLs for several engines; see launch/slurm.sbatch)")
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
        engine_gpus: list[list[int]] = [[] for _ in range(dp)]
        if not cuda:
            ranks = pick_ranks(2, num_ranks, completions_per_step)
            trainer_gpus = {"localhost": []}
            backend = resolve_transport(transport, cuda=False)
            placement = ["--num_gpus", str(ranks), "--master_port", str(master_port)]
            trainer_env = {**common_env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
        elif gpus == 1:
            if tp != 1:
                raise PlanError(f"server.tensor_parallel_size={tp} needs {tp} GPUs; this host has 1")
            if dp != 1:
                raise PlanError(f"server.data_parallel_size={dp}: one GPU holds one engine and one trainer rank "
                                f"(they share it through sync.transport=ipc); set server.data_parallel_size=1 or "
                                f"use {dp + 1} or more GPUs")
            if num_ranks > 1:
                raise PlanError(f"train.num_ranks={num_ranks}: one GPU holds the server and one trainer rank")
            ranks, engine_gpus, trainer_gpus = 1, [ids], {"localhost": ids}
            backend = resolve_transport(transport, cuda=True, shared_gpu=True)
            placement = ["--include", f"localhost:{ids[0]}", "--master_port", str(master_port)]
            trainer_env = {**common_env, **PHYSICAL_ORDER}
            unset_env = ["CUDA_VISIBLE_DEVICES"]
        else:
            used = dp * tp
            free = gpus - used
            if free < 1:
                if dp == 1:
                    raise PlanError(f"server.tensor_parallel_size={tp} leaves no GPU for training on this host "
                                    f"({gpus} GPUs); use tp <= {gpus - 1}")
                raise PlanError(f"server.data_parallel_size={dp} x tensor_parallel_size={tp} needs {used} GPUs for "
                                f"generation and leaves none for training on this host ({gpus} GPUs); use "
                                f"data_parallel_size x tensor_parallel_size <= {gpus - 1}")
            ranks = pick_ranks(free, num_ranks, completions_per_step)
            if ranks > free:
                raise PlanError(f"train.num_ranks={ranks} needs {ranks} GPUs, but only {free} of {gpus} are left "
                                f"after {engines_use}")
            engine_gpus = [ids[i * tp:(i + 1) * tp] for i in range(dp)]
            trainer_gpus = {"localhost": ids[used:used + ranks]}
            if ranks < free:
                notes.append(idle_note(ids[used + ranks:], free, num_ranks, completions_per_step, dp))
            backend = resolve_transport(transport, cuda=True)
            placement = ["--include", "localhost:" + ",".join(map(str, trainer_gpus["localhost"])),
                         "--master_port", str(master_port)]
            trainer_env = {**common_env, **PHYSICAL_ORDER}
            unset_env = ["CUDA_VISIBLE_DEVICES"]
        if backend == "ipc" and gpus != 1:
            raise PlanError("sync.transport=ipc: trainer and server must share one GPU (use nccl with several)")
        if backend == "nccl" and not cuda:
            raise PlanError("sync.transport=nccl needs GPUs; use gloo (or auto) on CPU")
        if not urls:
            cpus = cpu_count or os.cpu_count() or 1
            if not cuda and dp > 1 and dp * tp > cpus:
                notes.append(f"{dp} engines x tensor_parallel_size {tp} on {cpus} core(s): engines share cores "
                             f"(VLLM_CPU_OMP_THREADS_BIND)")
            for i, egpus in enumerate(engine_gpus):
                env = {**common_env, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", "PYTORCH_NVML_BASED_CUDA_CHECK": "1"}
                if cuda:
                    env.update(PHYSICAL_ORDER, CUDA_VISIBLE_DEVICES=",".join(map(str, egpus)))
                elif dp > 1:
                    env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(i, tp, cpus)
                port = server_port + i
                servers.append({"engine": i, "host": server_host, "port": port, "gpus": egpus,
                                "tensor_parallel_size": tp, "log": log_name(i),
                                "command": [python, "-m", "pipeline.generation.serve", "--config", config_path,
                                            "--run-dir", run_dir, "--engine-index", str(i), "--port", str(port)],
                                "env": env})
        command = [deepspeed, *placement, "--module", "pipeline.trainer.train"]
    urls = urls or [f"http://{s['host']}:{s['port']}" for s in servers]
    command += ["--config", config_path, "--run-dir", run_dir, "--server-url", ",".join(urls)]
    command += ["--token-file", token_file] if token_file else []
    command += ["--resume"] if resume else []
    batch = split_batch(completions_per_step, micro_batch_size, gradient_accumulation_steps, ranks)
    return {"servers": servers,
            "trainer": {"ranks": ranks, "gpus": trainer_gpus, "device": "cuda" if cuda else "cpu",
                        "command": command, "env": trainer_env, "unset_env": unset_env, "token_file": token_file},
            "sync": {"transport": backend}, "server_urls": urls, "batch": batch, "memory": None, "notes": notes}


def engine_gpus(plan: dict) -> set[int]:
    """The GPUs of every engine this plan starts."""
    return {gpu for server in plan["servers"] for gpu in server["gpus"]}


def check_compute_modes(plan: dict, gpus: list[dict]) -> None:
    """A GPU in EXCLUSIVE_PROCESS compute mode admits one process: refused where the plan puts an engine
    and a trainer rank on it (one GPU); a PROHIBITED one admits none."""
    server = engine_gpus(plan)
    trainer = set(plan["trainer"]["gpus"].get("localhost", []))
    for gpu in gpus:
        mode = str(gpu.get("compute_mode", "Default")).upper()
        if mode == "PROHIBITED" and gpu["index"] in server | trainer:
            raise PlanError(f"GPU {gpu['index']} is in PROHIBITED compute mode (no process may use it); "
                            f"leave it out with CUDA_VISIBLE_DEVICES")
        if mode.startswith("EXCLUSIVE") and gpu["index"] in server & trainer:
            raise PlanError(f"GPU {gpu['index']} is in {mode} compute mode (one process at a time), but the server and "
                            f"a trainer rank share it; ask for `nvidia-smi -i {gpu['index']} -c DEFAULT` or use two GPUs")


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
    for part in (*out["servers"], out["trainer"]):
        for name in SECRET_ENV:
            if name in part["env"]:
                part["env"][name] = REDACTED
    return out


def describe(plan: dict) -> str:
    """Human-readable dry run: processes, hosts, GPUs, commands, names (never values) of env vars."""
    lines = []
    for server in plan["servers"]:
        gpus = ",".join(map(str, server["gpus"])) or "none (CPU)"
        lines += [f"engine {server['engine']}  {server['host']}:{server['port']}  GPUs: {gpus}  tensor_parallel_size: "
                  f"{server['tensor_parallel_size']}  log: {server['log']}",
                  f"        env: {' '.join(sorted(server['env']))}",
                  f"        $ {shlex.join(server['command'])}"]
    if not plan["servers"]:
        lines.append(f"server  already running at {', '.join(plan['server_urls'])} (not started by this launcher)")
    trainer = plan["trainer"]
    where = "; ".join(f"{host}: GPUs {','.join(map(str, g)) or 'none (CPU)'}" for host, g in trainer["gpus"].items())
    unset = trainer.get("unset_env")
    batch = plan["batch"]
    lines += [f"trainer {trainer['ranks']} DeepSpeed rank(s) on {trainer['device']}  ({where})",
              f"        env: {' '.join(sorted(trainer['env'])) or '(inherited only)'}"
              + (f"; unset: {' '.join(unset)} (--include names physical GPUs)" if unset else "")
              + (f"; token from {trainer['token_file']} (0600)" if trainer["token_file"] else ""),
              f"        $ {shlex.join(trainer['command'])}",
              f"batch   {batch['completions_per_step']} completions per step = micro_batch_size "
              f"{batch['micro_batch_size']} x gradient_accumulation_steps {batch['gradient_accumulation_steps']} x "
              f"{batch['ranks']} rank(s)" + (f"  ({batch['derived']})" if batch["derived"] else ""),
              f"sync    {plan['sync']['transport']} (vLLM weight-transfer API)"]
    if plan.get("memory"):
        lines += [("memory  " if i == 0 else "        ") + line for i, line in enumerate(plan["memory"]["lines"])]
    lines += [f"note    {note}" for note in plan.get("notes", [])]
    return "\n".join(lines)
