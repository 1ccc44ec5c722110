"""The launch plan: which processes a run starts, on which hosts and GPUs, with which commands and
environment. Pure Python (no torch, no model): a `Layout` goes in, a frozen `Plan` comes out, from one
planning function per layout (`plan_hostfile`, `plan_cpu`, `plan_one_gpu`, `plan_gpus`); `--dry-run`
prints it, `Plan.to_json()` is `--plan-json`, and the real launch starts exactly these processes.
GPU ids are physical (nvidia-smi's), over those CUDA_VISIBLE_DEVICES leaves visible.
"""

from __future__ import annotations

import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pipeline.generation.client import TOKEN_ENV
from pipeline.generation.server_process import log_name
from pipeline.generation.transport import resolve_transport

SECRET_ENV = (TOKEN_ENV,)
# GPU ids in the plan are nvidia-smi's; CUDA numbers GPUs fastest first unless told to use nvidia-smi's order.
PHYSICAL_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
CPU_RANK_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
TRAINER_MODULE = "pipeline.trainer"
SRUN_RANK = str(Path(__file__).resolve().with_name("srun_rank.py"))
REDACTED = "<redacted>"


class PlanError(ValueError):
    """The requested layout cannot run; the message names the setting."""


# --- what goes in: this host's GPUs and the layout asked for -----------------------------------------


@dataclass(frozen=True)
class Gpu:
    """A GPU of this host as nvidia-smi lists it (or $GRPO_GPU_INVENTORY, or a dry run's assumption)."""

    index: int  # nvidia-smi's (physical) id
    memory_gib: float | None = None  # None: unknown, the memory split is not checked
    compute_mode: str = "Default"


@dataclass(frozen=True)
class Layout:
    """What a plan is made from: the config's placement and batch settings (launch/train.py `layout`
    copies them) and where this launch runs (its command-line arguments)."""

    gpus: int  # GPUs on this host; with a hostfile: 0 = CPU ranks, else the slots are GPUs
    gpu_ids: tuple[int, ...] | None = None  # their physical ids, in CUDA's order (default 0..gpus-1)
    tp: int = 1  # server.tensor_parallel_size
    dp: int = 1  # server.data_parallel_size: the generation engines
    num_ranks: int = 0  # train.num_ranks (0: as many as fit)
    micro_batch_size: int = 1  # train.micro_batch_size, .gradient_accumulation_steps, .completions_per_step
    gradient_accumulation_steps: int = 1
    completions_per_step: int = 0
    transport: str = "auto"  # sync.transport
    server_host: str = "127.0.0.1"  # server.host; engine i listens on server.port + i
    server_port: int = 8710
    tls: bool = False  # server.tls_cert set: the engines this launch starts serve https://
    server_url: str | None = None  # --server-url: engines already running, comma-separated
    hostfile: str | None = None  # --hostfile (absolute), --launcher, --master-addr, --master-port
    launcher: str = ""
    master_addr: str = ""
    master_port: int = 29500
    run_dir: str = ""  # the run directory (absolute); the resolved config is its config.yaml
    resume: bool = False
    token: str = ""  # the server's token ("" for none): in the processes' environment, or a 0600 file
    python: str = sys.executable
    deepspeed: str = "deepspeed"
    srun: str = "srun"
    cpu_count: int | None = None  # the cores engines are pinned to on CPU (default os.cpu_count())

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(range(self.gpus)) if self.gpu_ids is None else tuple(self.gpu_ids)

    @property
    def config_path(self) -> str:
        return str(Path(self.run_dir) / "config.yaml")


# --- what comes out: the plan (Plan.to_json() is the --plan-json document) ---------------------------


@dataclass(frozen=True)
class EnginePlan:
    """A generation engine this launch starts: `serve --engine-index engine` on host:port."""

    engine: int
    host: str
    port: int
    gpus: tuple[int, ...]  # physical ids (CUDA_VISIBLE_DEVICES); none on CPU
    tensor_parallel_size: int
    log: str  # in the run directory
    command: tuple[str, ...]
    env: dict[str, str]  # added to the launcher's environment


@dataclass(frozen=True)
class TrainerPlan:
    """The trainer ranks: one command (deepspeed, or srun under SLURM) and what it adds to the environment."""

    ranks: int
    gpus: dict[str, tuple[int, ...]]  # host -> the GPUs its ranks take (none: CPU)
    device: str  # cuda | cpu
    command: tuple[str, ...]
    env: dict[str, str]
    unset_env: tuple[str, ...] = ()  # taken out of the inherited environment
    token_file: str | None = None  # ranks on other nodes read the server's token from this 0600 file

    @property
    def local_gpus(self) -> tuple[int, ...]:
        return self.gpus.get("localhost", ())


@dataclass(frozen=True)
class SyncPlan:
    transport: str  # the weight-transfer backend: gloo | ipc | nccl


@dataclass(frozen=True)
class BatchSplit:
    """Completions per optimizer step = micro_batch_size x gradient_accumulation_steps x ranks."""

    completions_per_step: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    ranks: int
    derived: str = ""  # how they were derived from train.completions_per_step, if they were


@dataclass(frozen=True)
class MemorySplit:
    """GPU memory on this host (launch/memory.py): the arithmetic as lines, the server's share and KV
    cache, the rank's modelled peak and what it is left. None: not computed (left out of the JSON)."""

    model_source: str
    gpu_memory_utilization: float
    kv_cache_gib: float
    lines: tuple[str, ...]
    params: int | None = None
    zero_stage: int | None = None
    trainer_peak_at: str | None = None
    trainer_rank_gib: float | None = None
    margin_gib: float | None = None
    server_min_gib: float | None = None
    trainer_share_gib: float | None = None


@dataclass(frozen=True)
class Plan:
    servers: tuple[EnginePlan, ...]  # the engines this launch starts, engine i at position i
    trainer: TrainerPlan
    sync: SyncPlan
    server_urls: tuple[str, ...]  # every engine's, engine i's at position i
    batch: BatchSplit
    memory: MemorySplit | None = None  # None: CPU, or ranks on other nodes
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """The JSON document (`--plan-json`; token values included: see `redacted`)."""
        memory = (
            None if self.memory is None else {k: v for k, v in asdict(self.memory).items() if v is not None}
        )
        return listed({**asdict(self), "memory": memory})

    @classmethod
    def from_json(cls, document: dict) -> Plan:
        """A plan read back from its JSON document (a key it does not know is a TypeError)."""
        d = tupled(document)
        return cls(
            tuple(EnginePlan(**s) for s in d["servers"]),
            TrainerPlan(**d["trainer"]),
            SyncPlan(**d["sync"]),
            d["server_urls"],
            BatchSplit(**d["batch"]),
            d["memory"] and MemorySplit(**d["memory"]),
            d["notes"],
        )


def listed(value):
    """Tuples as JSON's lists."""
    if isinstance(value, dict):
        return {k: listed(v) for k, v in value.items()}
    return [listed(v) for v in value] if isinstance(value, list | tuple) else value


def tupled(value):
    """JSON's lists as the plan's tuples."""
    if isinstance(value, dict):
        return {k: tupled(v) for k, v in value.items()}
    return tuple(tupled(v) for v in value) if isinstance(value, list) else value


# --- reading the host ----------------------------------------------------------------------------------


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


def parse_inventory(text: str) -> list[Gpu]:
    """`nvidia-smi --query-gpu=index,memory.total,compute_mode --format=csv,noheader,nounits` (lines, or
    `;`-separated as an environment variable holds them) -> the GPUs."""
    gpus = []
    for line in filter(str.strip, text.replace(";", "\n").splitlines()):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 3 or not parts[0].isdigit():
            raise PlanError(
                f"GPU inventory: expected 'index, memory MiB, compute mode', got {line.strip()!r}"
            )
        try:
            memory_gib = float(parts[1]) / 1024
        except ValueError:
            raise PlanError(
                f"GPU inventory: memory.total of GPU {parts[0]} is {parts[1]!r}, not MiB"
            ) from None
        gpus.append(Gpu(int(parts[0]), round(memory_gib, 1), parts[2]))
    return gpus


def visible_gpus(inventory: list[Gpu], cuda_visible_devices: str | None) -> list[Gpu]:
    """The GPUs a run may use, in CUDA's order: those CUDA_VISIBLE_DEVICES names (physical indices), or
    every GPU when it is unset."""
    if cuda_visible_devices is None or not inventory:
        return inventory
    names = [n.strip() for n in cuda_visible_devices.split(",") if n.strip()]
    if not all(n.isdigit() for n in names):
        raise PlanError(
            f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}: the launcher takes GPU indices (DeepSpeed's "
            f"--include names GPUs by index), not UUIDs"
        )
    by_index = {g.index: g for g in inventory}
    missing = [n for n in names if int(n) not in by_index]
    if missing:
        raise PlanError(
            f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}: no GPU {missing[0]} on this host "
            f"(nvidia-smi lists {','.join(map(str, by_index))})"
        )
    return [by_index[int(n)] for n in names]


# --- the rules every layout uses -------------------------------------------------------------------------


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def pick_ranks(available: int, num_ranks: int, completions: int) -> int:
    """train.num_ranks, else all `available` slots, or with train.completions_per_step set the most of
    them that split it evenly (a rank's completions per step are whole)."""
    if num_ranks or not completions:
        return num_ranks or available
    return max(d for d in divisors(completions) if d <= available)


def idle_note(idle: tuple[int, ...], free: int, num_ranks: int, completions: int, engines: int = 1) -> str:
    """Why GPUs the engines left are not training: a GPU box must not sit half idle unexplained."""
    gpus = ",".join(map(str, idle))
    if num_ranks:
        who = "the server leaves" if engines == 1 else "the engines leave"
        return f"GPUs {gpus} idle: train.num_ranks={num_ranks} (0 = use every GPU {who})"
    ranks = free - len(idle)
    return (
        f"GPUs {gpus} idle: train.completions_per_step={completions} splits evenly over at most {ranks} of the "
        f"{free} GPUs left; a multiple of {math.lcm(completions, free)} would use all {free}"
    )


def split_batch(completions: int, micro: int, accumulation: int, ranks: int) -> BatchSplit:
    """Completions per optimizer step = micro_batch_size x gradient_accumulation_steps x ranks. With
    train.completions_per_step set, the recipe's step is kept whatever the rank count: micro_batch_size
    stays (lowered only when a rank's share is smaller) and the accumulation is derived."""
    if not completions:
        return BatchSplit(micro * accumulation * ranks, micro, accumulation, ranks)
    if completions % ranks:
        raise PlanError(
            f"train.completions_per_step={completions} does not split evenly over {ranks} ranks; use "
            f"{', '.join(map(str, divisors(completions)))} ranks (train.num_ranks), or a multiple of "
            f"{math.lcm(completions, ranks)} completions"
        )
    share = completions // ranks
    m = max(d for d in divisors(share) if d <= micro)
    return BatchSplit(
        completions,
        m,
        share // m,
        ranks,
        f"accumulation derived from train.completions_per_step={completions} for {ranks} rank(s)"
        + (f"; micro_batch_size {micro} -> {m}: a rank's share is {share}" if m < micro else ""),
    )


def engine_urls(server_url: str | None) -> tuple[str, ...]:
    """--server-url: one URL, or engine URLs comma-separated (engine i's at position i)."""
    if not server_url:
        return ()
    urls = tuple(u.strip() for u in server_url.split(","))
    if not all(urls):
        raise PlanError(
            f"--server-url {server_url}: expected URLs separated by commas (one per engine), got an empty one"
        )
    return urls


def cpu_bind(engine: int, tp: int, cpus: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for engine `engine`: a core of its own per tensor-parallel worker
    (vLLM-CPU's format: one core list per worker, `|`-separated). vLLM-CPU's `auto` binds every
    engine's worker to the same core, so two engines would take turns on it."""
    return "|".join(str((engine * tp + worker) % cpus) for worker in range(tp))


def check_request(layout: Layout) -> tuple[str, ...]:
    """What every layout needs of the request; the engines' URLs when they run elsewhere (--server-url)."""
    ids, tp, dp = layout.ids, layout.tp, layout.dp
    if len(ids) != layout.gpus:
        raise PlanError(f"--gpus {layout.gpus}: {len(ids)} GPU ids given ({','.join(map(str, ids))})")
    if tp < 1:
        raise PlanError(f"server.tensor_parallel_size: must be at least 1, got {tp}")
    if dp < 1:
        raise PlanError(f"server.data_parallel_size: must be at least 1, got {dp}")
    urls = engine_urls(layout.server_url)
    if urls and dp > 1 and len(urls) != dp:
        raise PlanError(
            f"--server-url names {len(urls)} engine(s) but server.data_parallel_size={dp}; give one "
            f"URL per engine, comma-separated, or set server.data_parallel_size={len(urls)}"
        )
    if layout.launcher == "slurm" and dp > 1 and not urls:
        raise PlanError(
            f"--launcher slurm: server.data_parallel_size={dp} engines run as their own srun steps "
            f"(launch/slurm.sbatch starts them); pass their URLs: --server-url URL,URL,..."
        )
    if not urls and layout.server_port + dp - 1 > 65535:
        raise PlanError(
            f"server.port={layout.server_port}: engine {dp - 1} of server.data_parallel_size={dp} would "
            f"listen on {layout.server_port + dp - 1}, above 65535"
        )
    return urls


def check_nccl(transport: str, cuda: bool) -> None:
    if transport == "nccl" and not cuda:
        raise PlanError("sync.transport=nccl needs GPUs; use gloo (or auto) on CPU")


def local_transport(layout: Layout, cuda: bool, shared_gpu: bool = False) -> str:
    """sync.transport for engines and ranks on this host (auto: gloo on CPU, ipc on one GPU, else nccl)."""
    transport = resolve_transport(layout.transport, cuda=cuda, shared_gpu=shared_gpu)
    if transport == "ipc" and layout.gpus != 1:
        raise PlanError("sync.transport=ipc: trainer and server must share one GPU (use nccl with several)")
    check_nccl(transport, cuda)
    return transport


def token_env(layout: Layout) -> dict[str, str]:
    return {TOKEN_ENV: layout.token} if layout.token else {}


def local_engines(
    layout: Layout, gpus: list[tuple[int, ...]], urls: tuple[str, ...]
) -> tuple[tuple[EnginePlan, ...], list[str]]:
    """The engines this launch starts (none when --server-url names them; engine i on server.port + i with
    `gpus[i]`; on CPU, several engines each on cores of their own) and a note when they share cores."""
    if urls:
        return (), []
    cuda, tp, dp = layout.gpus > 0, layout.tp, layout.dp
    cpus = layout.cpu_count or os.cpu_count() or 1
    notes = []
    if not cuda and dp > 1 and dp * tp > cpus:
        notes.append(
            f"{dp} engines x tensor_parallel_size {tp} on {cpus} core(s): engines share cores "
            f"(VLLM_CPU_OMP_THREADS_BIND)"
        )
    engines = []
    for i, engine_gpus in enumerate(gpus):
        env = {
            **token_env(layout),
            "VLLM_WORKER_MULTIPROC_METHOD": "spawn",
            "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
        }
        if cuda:
            env.update(PHYSICAL_ORDER, CUDA_VISIBLE_DEVICES=",".join(map(str, engine_gpus)))
        elif dp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind(i, tp, cpus)
        port = layout.server_port + i
        command = (
            layout.python,
            "-m",
            "pipeline.generation.serve",
            "--config",
            layout.config_path,
            "--run-dir",
            layout.run_dir,
            "--engine-index",
            str(i),
            "--port",
            str(port),
        )
        engines.append(
            EnginePlan(i, layout.server_host, port, tuple(engine_gpus), tp, log_name(i), command, env)
        )
    return tuple(engines), notes


def trainer_command(
    layout: Layout, head: list[str], urls: tuple[str, ...], token_file: str | None = None
) -> tuple:
    """The ranks' launcher (`head`), then the trainer's own arguments."""
    return (
        *head,
        "--config",
        layout.config_path,
        "--run-dir",
        layout.run_dir,
        "--server-url",
        ",".join(urls),
        *(["--token-file", token_file] if token_file else []),
        *(["--resume"] if layout.resume else []),
    )


def on_this_host(
    layout: Layout,
    placement: list[str],
    engines: tuple[EnginePlan, ...],
    urls: tuple[str, ...],
    ranks: int,
    gpus: tuple[int, ...],
    transport: str,
    notes: list[str],
) -> Plan:
    """A plan whose ranks `deepspeed` starts here with `placement` (engines here too, unless --server-url)."""
    scheme = "https" if layout.tls else "http"
    urls = urls or tuple(f"{scheme}://{e.host}:{e.port}" for e in engines)
    head = [
        layout.deepspeed,
        *placement,
        "--master_port",
        str(layout.master_port),
        "--module",
        TRAINER_MODULE,
    ]
    cuda = layout.gpus > 0
    trainer = TrainerPlan(
        ranks,
        {"localhost": gpus},
        "cuda" if cuda else "cpu",
        trainer_command(layout, head, urls),
        {**token_env(layout), **(PHYSICAL_ORDER if cuda else CPU_RANK_ENV)},
        ("CUDA_VISIBLE_DEVICES",) if cuda else (),
    )
    batch = split_batch(
        layout.completions_per_step, layout.micro_batch_size, layout.gradient_accumulation_steps, ranks
    )
    return Plan(engines, trainer, SyncPlan(transport), urls, batch, None, tuple(notes))


# --- one planning function per layout ----------------------------------------------------------------


def make_plan(layout: Layout) -> Plan:
    """The processes of one run (token values included: see `redacted`), by layout: the ranks on a
    hostfile's nodes, or on this host's CPU, its one GPU or its several."""
    urls = check_request(layout)
    if layout.hostfile:
        return plan_hostfile(layout, urls)
    if layout.gpus == 0:
        return plan_cpu(layout, urls)
    if layout.gpus == 1:
        return plan_one_gpu(layout, urls)
    return plan_gpus(layout, urls)


def plan_cpu(layout: Layout, urls: tuple[str, ...]) -> Plan:
    """No GPU: the engines on CPU (with several, each engine's vLLM worker on a core of its own),
    train.num_ranks (default 2) CPU ranks, our gloo transfer engine."""
    ranks = pick_ranks(2, layout.num_ranks, layout.completions_per_step)
    transport = local_transport(layout, cuda=False)
    engines, notes = local_engines(layout, [() for _ in range(layout.dp)], urls)
    return on_this_host(layout, ["--num_gpus", str(ranks)], engines, urls, ranks, (), transport, notes)


def plan_one_gpu(layout: Layout, urls: tuple[str, ...]) -> Plan:
    """One GPU: one engine and one rank share it (the memory split: launch/memory.py) and sync through
    vLLM's CUDA `ipc` engine: NCCL refuses a communicator that holds one device twice."""
    tp, dp, gpu = layout.tp, layout.dp, layout.ids
    if tp != 1:
        raise PlanError(f"server.tensor_parallel_size={tp} needs {tp} GPUs; this host has 1")
    if dp != 1:
        raise PlanError(
            f"server.data_parallel_size={dp}: one GPU holds one engine and one trainer rank "
            f"(they share it through sync.transport=ipc); set server.data_parallel_size=1 or "
            f"use {dp + 1} or more GPUs"
        )
    if layout.num_ranks > 1:
        raise PlanError(f"train.num_ranks={layout.num_ranks}: one GPU holds the server and one trainer rank")
    transport = local_transport(layout, cuda=True, shared_gpu=True)
    engines, notes = local_engines(layout, [gpu], urls)
    return on_this_host(layout, ["--include", f"localhost:{gpu[0]}"], engines, urls, 1, gpu, transport, notes)


def plan_gpus(layout: Layout, urls: tuple[str, ...]) -> Plan:
    """Two or more GPUs: engine i on GPUs [i*tp, (i+1)*tp), the ranks on the rest via `--include`
    (DeepSpeed's `--num_gpus` would start at GPU 0, under the engines), vLLM's `nccl` engine; GPUs
    left idle are named in the plan's notes, with the reason."""
    ids, tp, dp, gpus = layout.ids, layout.tp, layout.dp, layout.gpus
    used = dp * tp
    free = gpus - used
    if free < 1:
        if dp == 1:
            raise PlanError(
                f"server.tensor_parallel_size={tp} leaves no GPU for training on this host "
                f"({gpus} GPUs); use tp <= {gpus - 1}"
            )
        raise PlanError(
            f"server.data_parallel_size={dp} x tensor_parallel_size={tp} needs {used} GPUs for "
            f"generation and leaves none for training on this host ({gpus} GPUs); use "
            f"data_parallel_size x tensor_parallel_size <= {gpus - 1}"
        )
    ranks = pick_ranks(free, layout.num_ranks, layout.completions_per_step)
    if ranks > free:
        engines_use = (
            f"the server's tensor_parallel_size={tp}"
            if dp == 1
            else f"the engines' {dp} x {tp} GPUs (server.data_parallel_size x tensor_parallel_size)"
        )
        raise PlanError(
            f"train.num_ranks={ranks} needs {ranks} GPUs, but only {free} of {gpus} are left "
            f"after {engines_use}"
        )
    mine = ids[used : used + ranks]
    notes = (
        [idle_note(ids[used + ranks :], free, layout.num_ranks, layout.completions_per_step, dp)]
        if ranks < free
        else []
    )
    transport = local_transport(layout, cuda=True)
    engines, engine_notes = local_engines(layout, [ids[i * tp : (i + 1) * tp] for i in range(dp)], urls)
    placement = ["--include", "localhost:" + ",".join(map(str, mine))]
    return on_this_host(layout, placement, engines, urls, ranks, mine, transport, notes + engine_notes)


def plan_hostfile(layout: Layout, urls: tuple[str, ...]) -> Plan:
    """The ranks on a hostfile's slots (GPUs; CPU ranks with gpus=0, SLURM only), the engines already
    running elsewhere (--server-url), the token in a 0600 file in the shared run directory (DeepSpeed's
    PDSH runner forwards only some environment variables to other nodes, so none is set here)."""
    if not urls:
        raise PlanError(
            "--hostfile: start the server on its own node and pass --server-url (comma-separated "
            "URLs for several engines; see launch/slurm.sbatch)"
        )
    hosts, cuda = read_hostfile(layout.hostfile), layout.gpus > 0
    ranks = sum(hosts.values())
    if layout.num_ranks and layout.num_ranks != ranks:
        raise PlanError(
            f"train.num_ranks={layout.num_ranks} but {layout.hostfile} has {ranks} slots; set 0 to use all"
        )
    if not cuda and layout.launcher != "slurm":
        raise PlanError(
            "--gpus 0 with --hostfile: CPU ranks on several hosts need --launcher slurm "
            "(DeepSpeed's other runners do not pass DS_ACCELERATOR=cpu on)"
        )
    transport = resolve_transport(layout.transport, cuda=cuda)
    check_nccl(transport, cuda)
    env = {} if cuda else dict(CPU_RANK_ENV)
    master = layout.master_addr or next(iter(hosts))
    if layout.launcher == "slurm":
        env.update(MASTER_ADDR=master, MASTER_PORT=str(layout.master_port))
        head = srun_command(hosts, layout.srun, layout.python)
    else:
        launcher = ["--launcher", layout.launcher] if layout.launcher else []
        head = [
            layout.deepspeed,
            "--hostfile",
            layout.hostfile,
            "--master_addr",
            master,
            "--master_port",
            str(layout.master_port),
            *launcher,
            "--module",
            TRAINER_MODULE,
        ]
    token_file = str(Path(layout.run_dir) / "server.token")
    trainer = TrainerPlan(
        ranks,
        {host: tuple(range(slots)) if cuda else () for host, slots in hosts.items()},
        "cuda" if cuda else "cpu",
        trainer_command(layout, head, urls, token_file),
        env,
        token_file=token_file,
    )
    batch = split_batch(
        layout.completions_per_step, layout.micro_batch_size, layout.gradient_accumulation_steps, ranks
    )
    return Plan((), trainer, SyncPlan(transport), urls, batch)


def srun_command(hosts: dict[str, int], srun: str, python: str) -> list[str]:
    """The trainer step: one srun task per slot, on exactly the hostfile's hosts (srun places tasks by
    count, so without --nodelist it may use the server's node), each a rank via launch/srun_rank.py."""
    if len(set(hosts.values())) > 1:
        raise PlanError(
            f"--launcher slurm: every host needs the same slots (srun --ntasks-per-node), got "
            f"{', '.join(f'{h} slots={n}' for h, n in hosts.items())}"
        )
    per_node = next(iter(hosts.values()))
    return [
        srun,
        f"--nodes={len(hosts)}",
        f"--ntasks={per_node * len(hosts)}",
        f"--ntasks-per-node={per_node}",
        f"--nodelist={','.join(hosts)}",
        "--kill-on-bad-exit=1",
        "--export=ALL",
        python,
        "-u",
        SRUN_RANK,
    ]


# --- checking and showing a plan ---------------------------------------------------------------------


def engine_gpus(plan: Plan) -> set[int]:
    """The GPUs of every engine this plan starts."""
    return {gpu for engine in plan.servers for gpu in engine.gpus}


def check_compute_modes(plan: Plan, gpus: list[Gpu]) -> None:
    """A GPU in EXCLUSIVE_PROCESS compute mode admits one process: refused where the plan puts an engine
    and a trainer rank on it (one GPU); a PROHIBITED one admits none."""
    server, trainer = engine_gpus(plan), set(plan.trainer.local_gpus)
    for gpu in gpus:
        mode = gpu.compute_mode.upper()
        if mode == "PROHIBITED" and gpu.index in server | trainer:
            raise PlanError(
                f"GPU {gpu.index} is in PROHIBITED compute mode (no process may use it); "
                f"leave it out with CUDA_VISIBLE_DEVICES"
            )
        if mode.startswith("EXCLUSIVE") and gpu.index in server & trainer:
            raise PlanError(
                f"GPU {gpu.index} is in {mode} compute mode (one process at a time), but the server and "
                f"a trainer rank share it; ask for `nvidia-smi -i {gpu.index} -c DEFAULT` or use two GPUs"
            )


def redacted(plan: Plan) -> Plan:
    """The plan with secret values replaced (for printing and --plan-json)."""

    def hide(env: dict[str, str]) -> dict[str, str]:
        return {name: REDACTED if name in SECRET_ENV else value for name, value in env.items()}

    return replace(
        plan,
        servers=tuple(replace(e, env=hide(e.env)) for e in plan.servers),
        trainer=replace(plan.trainer, env=hide(plan.trainer.env)),
    )


def describe(plan: Plan) -> str:
    """Human-readable dry run: processes, hosts, GPUs, commands, names (never values) of env vars."""
    lines = []
    for e in plan.servers:
        gpus = ",".join(map(str, e.gpus)) or "none (CPU)"
        lines += [
            f"engine {e.engine}  {e.host}:{e.port}  GPUs: {gpus}  tensor_parallel_size: "
            f"{e.tensor_parallel_size}  log: {e.log}",
            f"        env: {' '.join(sorted(e.env))}",
            f"        $ {shlex.join(e.command)}",
        ]
    if not plan.servers:
        lines.append(
            f"server  already running at {', '.join(plan.server_urls)} (not started by this launcher)"
        )
    trainer, batch = plan.trainer, plan.batch
    where = "; ".join(
        f"{host}: GPUs {','.join(map(str, g)) or 'none (CPU)'}" for host, g in trainer.gpus.items()
    )
    unset = trainer.unset_env
    lines += [
        f"trainer {trainer.ranks} DeepSpeed rank(s) on {trainer.device}  ({where})",
        f"        env: {' '.join(sorted(trainer.env)) or '(inherited only)'}"
        + (f"; unset: {' '.join(unset)} (--include names physical GPUs)" if unset else "")
        + (f"; token from {trainer.token_file} (0600)" if trainer.token_file else ""),
        f"        $ {shlex.join(trainer.command)}",
        f"batch   {batch.completions_per_step} completions per step = micro_batch_size "
        f"{batch.micro_batch_size} x gradient_accumulation_steps {batch.gradient_accumulation_steps} x "
        f"{batch.ranks} rank(s)" + (f"  ({batch.derived})" if batch.derived else ""),
        f"sync    {plan.sync.transport} (vLLM weight-transfer API)",
    ]
    if plan.memory:
        lines += [("memory  " if i == 0 else "        ") + line for i, line in enumerate(plan.memory.lines)]
    lines += [f"note    {note}" for note in plan.notes]
    return "\n".join(lines)
