"""Start a GRPO run: the generation server, then the trainer ranks under the `deepspeed` launcher.

    python launch/train.py [--config configs/tiny-cpu.yaml] [--set train.max_steps=5] [--resume --name R]

Single host (default): starts `python -m pipeline.generation.serve` in its own process group (one per
engine with server.data_parallel_size N > 1, all started before any is waited for, so they load in
parallel), waits for their health checks (with a deadline and the log tail on failure), runs
`deepspeed --module pipeline.trainer.train` and stops the engines when training ends, fails or is
interrupted. Exit code = the trainer's. With server.restart on, an engine that exits is restarted
(server.max_restarts per engine); one past its limit stays down and the run goes on with the others.

Where each process runs (GPUs, hosts, sync backend), the batch split and the server's share of a GPU
are decided by launch/plan.py and launch/memory.py; `--dry-run` prints that plan and starts nothing
(`--gpus N` plans for N GPUs anywhere, `--gpu-memory-gib` sizes them, `--plan-json F` writes it).
The GPUs are those CUDA_VISIBLE_DEVICES names (else all), read from nvidia-smi, or from
$GRPO_GPU_INVENTORY in nvidia-smi's CSV (`index, memory MiB, compute mode` per line or `;`).
Paths (--config, run.root, a local model.path, data files) are taken relative to where you launch:
the server and ranks run in the repository and get them absolute.
Every run's server gets a fresh random token (environment only), so no other local user can call it.

Multi-node: start the server yourself on one host (`make serve CONFIG=...`, with GRPO_SERVER_TOKEN
set) and pass `--server-url http://HOST:PORT --hostfile hosts` here (several engines: their URLs,
comma-separated, engine i's at position i); the trainer ranks run on the
hostfile's hosts (see launch/slurm.sbatch). With `--launcher slurm` they are tasks of one `srun` step
(launch/srun_rank.py), from inside a SLURM allocation.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from launch.memory import Zero, model_shape, param_count, plan_memory  # noqa: E402
from launch.plan import (  # noqa: E402
    PlanError,
    check_compute_modes,
    describe,
    make_plan,
    parse_inventory,
    redacted,
    visible_gpus,
)
from pipeline.config import Config, ConfigError, check_batch, load_config, to_dict  # noqa: E402
from pipeline.generation.client import TOKEN_ENV, ServerClient, free_port, server_token  # noqa: E402
from pipeline.generation.engines import LAUNCHER_PID_ENV, Engines  # noqa: E402
from pipeline.rollout.evaluate import format_table, run_eval  # noqa: E402
from pipeline.task.data import DataError  # noqa: E402
from pipeline.task.rewards import RewardError  # noqa: E402
from pipeline.task.tools import ToolError  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
INVENTORY_ENV = "GRPO_GPU_INVENTORY"
DRY_RUN_GPU_GIB = 80.0  # a dry run for GPUs this host does not have: the size of an A100/H100 80GB


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML recipe (default: configs/tiny-cpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=5 (repeatable)")
    p.add_argument("--name", help="run name (shortcut for --set run.name=...)")
    p.add_argument("--resume", action="store_true", help="continue run --name from its latest checkpoint")
    p.add_argument("--server-url", help="use a server that is already running (multi-node); do not start one. "
                                        "Several engines: their URLs, comma-separated")
    p.add_argument("--hostfile", help="DeepSpeed hostfile: trainer ranks on several hosts (needs --server-url)")
    p.add_argument("--launcher", default="", help="DeepSpeed multi-node launcher with --hostfile (pdsh, slurm, ...)")
    p.add_argument("--master-port", type=int, default=0,
                   help="DeepSpeed rendezvous port (default: a free one here; 29500 with --hostfile)")
    p.add_argument("--master-addr", default="",
                   help="with --hostfile: rendezvous address (default: the hostfile's first host)")
    p.add_argument("--gpus", type=int, help="plan for this many GPUs on this host (default: as many as it has); "
                                            "with --hostfile, 0 means CPU-only trainer nodes (--launcher slurm)")
    p.add_argument("--gpu-memory-gib", type=float,
                   help=f"plan as if each GPU had this much memory (default: what nvidia-smi says; "
                        f"{DRY_RUN_GPU_GIB:.0f} for a dry run's GPUs this host lacks)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the processes this run would start, start nothing, load no model")
    p.add_argument("--plan-json", help="write the launch plan as JSON (secrets redacted) to this file")
    return p.parse_args(argv)


def check_port_free(host: str, port: int, engine: int = 0, engines: int = 1) -> None:
    """Our server must not start on a port another server answers on: the trainer would talk to
    (and push weights into) the wrong one. Engine i listens on server.port + i."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn does: connections of a server that just stopped linger in TIME_WAIT, and must
        # not make the next run refuse the port; a live listener still fails the bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            which = f" (engine {engine} of {engines}: server.port + {engine})" if engines > 1 else ""
            raise ConfigError(f"server.port: {host}:{port}{which} is already in use (another run's server?); "
                              f"pick another with --set server.port=N") from None


def resolve_deepspeed_config(config: Config, cuda: bool) -> None:
    """train.deepspeed_config must name a readable DeepSpeed JSON with a ZeRO stage; `auto` is the ZeRO-2
    JSON tuned for the device (GPU: overlapped communication); relative paths are looked up from the
    working directory, then the repo (the trainer gets the absolute path)."""
    if config.train.deepspeed_config == "auto":
        config.train.deepspeed_config = "configs/ds_zero2_gpu.json" if cuda else "configs/ds_zero2.json"
    given = Path(config.train.deepspeed_config).expanduser()
    path = next((p for p in (given, REPO / given) if p.is_file()), None)
    if path is None:
        raise ConfigError(f"train.deepspeed_config: {given} not found (expected a DeepSpeed JSON such as "
                          f"configs/ds_zero2.json)")
    try:
        stage = json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0)
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not a DeepSpeed JSON object: {e}") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.deepspeed_config: {path}: zero_optimization.stage must be 0-3, got {stage!r}")
    config.train.deepspeed_config = str(path.resolve())


def check_disk_space(config: Config, run_dir: Path, cuda: bool = False) -> None:
    """Fail before anything starts if the run directory's disk cannot hold the checkpoints: a disk that
    fills up hours into a run loses the step that was being saved. Per checkpoint we count 8x the
    model's weight files (weights + fp32 master copy + two Adam moments), for the checkpoints kept plus
    the one being written, plus the final model. A hub model is not on disk yet: its weights are
    estimated from its config.json (local, the Hugging Face cache, or launch/memory.py's table of recipe
    models) at model.dtype's bytes per parameter (auto: bf16 with GPUs, fp32 without, as the trainer
    loads it); a model of unknown size is not checked, and the launcher says why."""
    model_dir = Path(config.model.path).expanduser()
    basis = ""
    if model_dir.is_dir():
        weights = sum(f.stat().st_size for f in model_dir.iterdir() if f.suffix in (".safetensors", ".bin"))
    else:
        shape, source = model_shape(config)
        try:
            params = param_count(shape) if shape is not None else 0
        except KeyError as e:
            source, params = f"{source} has no {e.args[0]}", 0
        if not params:
            print(f"disk space for checkpoints not checked: the model's size is unknown ({source})", flush=True)
            return
        dtype = config.model.dtype if config.model.dtype != "auto" else "bfloat16" if cuda else "float32"
        width = 4 if dtype == "float32" else 2
        weights = params * width
        basis = f" (weights: {params / 1e9:.2f}B parameters x {width} bytes ({dtype}), from {source})"
    checkpoints = (config.train.keep_checkpoints if config.train.save_every else 0) + 1
    need = weights * (8 * checkpoints + 1) + 50 * 2**20  # + logs, metrics, evaluations
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(f"run.root: {existing} has {free / 2**20:.0f} MiB free; this run needs about "
                          f"{need / 2**20:.0f} MiB for {checkpoints} checkpoint(s) and the final model{basis}")


def gpu_inventory() -> list[dict]:
    """Every GPU of this host with its memory and compute mode, from nvidia-smi, or from $GRPO_GPU_INVENTORY
    in the same CSV (tests; planning for a host with other GPUs)."""
    text = os.environ.get(INVENTORY_ENV)
    if text is None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total,compute_mode",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return []
        text = out.stdout if out.returncode == 0 else ""
    return parse_inventory(text)


def run_gpus(args) -> tuple[list[dict], list[str]]:
    """The GPUs this run plans over, in CUDA's order with physical indices, and what was assumed: the
    visible ones (or the first --gpus of them); a dry run may plan for more than the host has."""
    visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = visible_gpus(gpu_inventory(), visible_env)
    count = len(visible) if args.gpus is None else args.gpus
    if count < 0 or (not args.dry_run and count > len(visible)):
        through = f" visible (CUDA_VISIBLE_DEVICES={visible_env})" if visible_env is not None else ""
        raise ConfigError(f"--gpus {count}: this host has {len(visible)} GPU(s){through} (plan for more with --dry-run)")
    notes = []
    if count > len(visible):  # a dry run for GPUs this host lacks: those CUDA_VISIBLE_DEVICES names, else 0..N-1
        ids = [int(n) for n in (visible_env or "").split(",") if n.strip().isdigit()] or list(range(count))
        if len(ids) < count:
            raise ConfigError(f"--gpus {count}: CUDA_VISIBLE_DEVICES={visible_env} names {len(ids)} GPU(s)")
        visible = [{"index": i, "memory_gib": DRY_RUN_GPU_GIB, "compute_mode": "Default"} for i in ids]
        notes.append(f"dry run: {count} GPU(s) this host does not have, "
                     f"{args.gpu_memory_gib or DRY_RUN_GPU_GIB} GiB each (--gpu-memory-gib)")
    gpus = visible[:count]
    if args.gpu_memory_gib:
        gpus = [{**g, "memory_gib": args.gpu_memory_gib} for g in gpus]
    return gpus, notes


def prepare_model(config: Config) -> None:
    """model.build=tiny: build (once, cached) the embedded default; model.path points at it."""
    if config.model.build:
        if config.model.build != "tiny":
            raise ConfigError(f"model.build: expected '' or 'tiny', got {config.model.build!r}")
        from pipeline.embedded.default_model import build_default_model

        print("building the embedded default model (cached after the first run)...", flush=True)
        config.model.path = str(build_default_model(config))
        config.model.build = ""


def finish_run(client, config: Config, run_dir: Path, started: float, plan: dict) -> None:
    """After a successful run: evaluate the final weights (still served), write the report."""
    import platform

    from pipeline.report.card import read_json, write_report

    before = read_json(run_dir / "eval_before.json")
    if config.eval.enabled:
        print("evaluating the trained model...", flush=True)
        after = run_eval(client, config, run_dir / "eval_after")
        print(format_table({"before": before, "after": after} if before else {"after": after}), flush=True)
    cores = os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = ", ".join(subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=30).stdout.split("\n")[:-1]) if plan["trainer"]["device"] == "cuda" else ""
    info = read_json(run_dir / "run_info.json") or {"wall_time_s": 0.0}
    info.update({
        "hardware": f"{platform.machine()} {cores} cores, {memory_gib:.0f} GiB RAM" + (f", GPUs: {gpus}" if gpus else ", no GPU"),
        "ranks": plan["trainer"]["ranks"], "device": plan["trainer"]["device"], "transport": plan["sync"]["transport"],
        "wall_time_s": info["wall_time_s"] + time.time() - started,  # summed over resumed sessions
    })
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"report: {write_report(run_dir)}", flush=True)


def tee(stream, console, log_path: Path) -> threading.Thread:
    """Copy the trainer's output to the console and to the run's trainer.log until it closes."""
    def run():
        with open(log_path, "ab") as log:
            for chunk in iter(lambda: stream.read1(4096), b""):
                for sink in (console, log):
                    sink.write(chunk)
                    sink.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def config_file(given: str) -> Path:
    """--config: relative to where the user launched, else to the repository (`--config
    configs/prem-1b-gsm8k.yaml` from anywhere), made absolute."""
    path = Path(given).expanduser()
    return (path if path.exists() or path.is_absolute() or not (REPO / path).exists() else REPO / path).absolute()


def absolute_paths(config) -> None:
    """run.root, a local model.path, data files and an @file system prompt, relative to where the user
    launched: the server and ranks run in the repository, so the resolved config (run_dir/config.yaml)
    and the plan name them absolutely. A model.path that is no local directory is a hub name, kept."""
    config.run.root = str(Path(config.run.root).expanduser().absolute())
    if config.model.path and Path(config.model.path).expanduser().exists():
        config.model.path = str(Path(config.model.path).expanduser().absolute())
    d = config.data
    for key in ("train_file", "test_file"):
        if getattr(d, key):
            setattr(d, key, str(Path(getattr(d, key)).expanduser().absolute()))
    if d.system_prompt.startswith("@"):
        d.system_prompt = "@" + str(Path(d.system_prompt[1:]).expanduser().absolute())


def check_data_and_rewards(config) -> None:
    """Before anything starts: the system prompt file, local data files (each bad row is `file:line`),
    and every reward plugin, imported and called once on a training example (a plugin that cannot be
    imported, or returns the wrong number of values, fails here rather than at step 1)."""
    from pipeline.task.data import examples_for, resolve_system_prompt
    from pipeline.task.rewards import load_rewards, score_completions
    from pipeline.trainer.metrics import missing_trackers

    missing = missing_trackers(config.train.report_to)
    if missing:
        raise ConfigError(f"train.report_to: {', '.join(missing)} is not installed (pip install "
                          f"{' '.join(missing)}, or make install, which includes the `track` extra)")
    system_prompt = resolve_system_prompt(config.data.system_prompt)
    rewards = load_rewards(config.reward_functions)
    tools = config.rollout.tools or config.rollout.environment
    if tools:
        from pipeline.task.tools import load_toolbox

        toolbox = load_toolbox(config.rollout.tools, config.rollout.environment or None)  # one line, before anything starts
    if config.data.source == "hub":
        return  # downloading here and again in the ranks is not worth it: the ranks report bad rows
    if config.data.source == "synthetic":
        from pipeline.task import synthetic

        d = config.data
        train = synthetic.generate(1, config.run.seed, "train", d.synthetic_levels, d.synthetic_max_operand)
        if config.eval.enabled or config.eval.every:  # too many test problems asked for: one line, now
            synthetic.generate(d.synthetic_test, config.run.seed, "test", d.synthetic_levels, d.synthetic_max_operand)
    else:
        train = examples_for(config.data, "train", config.run.seed)
        if config.eval.enabled or config.eval.every:  # no test file configured: a one-line error naming it
            examples_for(config.data, "test", config.run.seed)
    if config.reward_functions:
        e = train[0]
        columns = {k: [v, v] for k, v in e.columns.items()}
        samples = ["", e.solution]
        if tools:  # the completions as the rollouts give them: TRL's message lists, a tool call in one
            call = {"type": "function", "function": {"name": toolbox.names[0], "arguments": {}}}
            samples = [[{"role": "assistant", "content": ""}],
                       [{"role": "assistant", "content": "", "tool_calls": [call]},
                        {"role": "tool", "name": toolbox.names[0], "content": "1"},
                        {"role": "assistant", "content": e.solution}]]
        score_completions(samples, [e.answer, e.answer], config.rewards, rewards, [e.prompt(system_prompt)] * 2, columns)


class EngineMonitor:
    """The launcher's watch over the engines it started, one `poll()` per pass of its loop. An engine whose
    process exited is restarted when server.restart is on, each engine counting its own restarts against
    server.max_restarts; one past its limit (or any, with restart off) stays down, and the run goes on with
    the others: the trainer decides when no engine is left. A restarted engine's health is awaited in a
    thread of its own, so that a slow start never delays noticing another engine's exit. `engines`: the
    started ServerProcess objects, engine i at position i (replaced in place on a restart);
    `start_engine(i)`: starts engine i again (from the calling thread: see `start_engine` in `main`)."""

    def __init__(self, engines: list, start_engine, restart: bool, max_restarts: int, startup_timeout_s: float,
                 stopping: threading.Event | None = None, say=None):
        self.engines, self.start_engine = engines, start_engine
        self.restart, self.max_restarts, self.startup_timeout_s = restart, max_restarts, startup_timeout_s
        self.stopping = stopping or threading.Event()  # set on the way out: a failed restart is then no news
        self.say = say or (lambda line: print(line, flush=True))
        self.restarts = [0] * len(engines)
        self.waiting: dict[int, threading.Thread] = {}  # engine -> the thread awaiting its restart's health
        self.down: set[int] = set()

    def name(self, i: int) -> str:
        return f"engine {i}" if len(self.engines) > 1 else "generation server"

    def poll(self) -> None:
        for i, engine in enumerate(self.engines):
            if i in self.down or (i in self.waiting and self.waiting[i].is_alive()) or engine.proc.poll() is None:
                continue
            code = engine.proc.returncode
            engine.stop()  # engine-core and worker processes left of the dead one
            if self.restart and self.restarts[i] < self.max_restarts:
                # The trainer notices on its next call, waits for the new engine and re-pushes its weights.
                self.restarts[i] += 1
                self.say(f"{self.name(i)} exited (code {code}); restarting it "
                         f"({self.restarts[i]} of at most {self.max_restarts})")
                self.engines[i] = self.start_engine(i)
                self.waiting[i] = threading.Thread(target=self.await_healthy, args=(i, self.engines[i]), daemon=True,
                                                   name=f"engine-{i}-restart")
                self.waiting[i].start()
            else:
                self.down.add(i)
                n = self.restarts[i]
                why = f"has used its {n} restart{'s' * (n != 1)}" if self.restart else "is not restarted (server.restart is off)"
                self.say(f"{self.name(i)} exited (code {code}) and {why}"
                         + ("; the run goes on with the other engines" if len(self.engines) > 1 else ""))

    def await_healthy(self, i: int, process) -> None:
        """A restart's thread. An engine that does not come back is stopped (by wait_healthy): the next
        poll sees it exited and restarts it again if it may."""
        from pipeline.generation.client import ServerError

        try:
            process.wait_healthy(self.startup_timeout_s)
        except ServerError as e:
            if not self.stopping.is_set():
                self.say(f"{self.name(i)} did not come back: {str(e).splitlines()[0]} (log: {process.log_path})")


def main(argv=None) -> int:
    from pipeline.generation.server_process import ServerProcess, die_with_parent

    args = parse_args(argv)
    overrides = list(args.set) + ([f"run.name={args.name}"] if args.name else [])
    try:
        config = load_config(config_file(args.config), overrides)
        absolute_paths(config)
        if args.resume and not config.run.name:
            raise ConfigError("--resume needs --name (the run to continue)")
        hostfile = str(Path(args.hostfile).expanduser().absolute()) if args.hostfile else None
        if hostfile:  # the ranks run on the hostfile's nodes: their slots are GPUs, unless --gpus 0 (CPU, SLURM)
            gpu_list, gpu_notes = [], []
            gpus = 1 if args.gpus is None else args.gpus
            if gpus < 0:
                raise ConfigError(f"--gpus {gpus}: expected 0 (CPU trainer nodes) or more")
        else:
            gpu_list, gpu_notes = run_gpus(args)
            gpus = len(gpu_list)
        config.run.name = config.run.name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.run.root) / config.run.name
        if args.resume and not (run_dir / "checkpoints" / "latest").exists():
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        if not args.resume and (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run.name: {run_dir} already holds a run (use --resume or another --name)")
        resolve_deepspeed_config(config, cuda=gpus > 0)
        # A run that starts its own server gives it a fresh token: loopback is no boundary on a shared node.
        token = server_token(config.server.token)
        token = token or ("" if args.server_url else secrets.token_hex(16))
        deepspeed_bin = Path(sys.executable).with_name("deepspeed")
        plan = make_plan(
            gpus=gpus, tp=config.server.tensor_parallel_size, num_ranks=config.train.num_ranks,
            server_host=config.server.host, server_port=config.server.port, server_url=args.server_url,
            dp=config.server.data_parallel_size,
            hostfile=hostfile, transport=config.sync.transport, config_path=str(run_dir / "config.yaml"),
            run_dir=str(run_dir), resume=args.resume, token=token, launcher=args.launcher, master_addr=args.master_addr,
            master_port=args.master_port or (29500 if args.hostfile else free_port("127.0.0.1")),
            deepspeed=str(deepspeed_bin) if deepspeed_bin.exists() else "deepspeed",
            gpu_ids=[g["index"] for g in gpu_list] if not hostfile else None, micro_batch_size=config.train.micro_batch_size,
            gradient_accumulation_steps=config.train.gradient_accumulation_steps,
            completions_per_step=config.train.completions_per_step)
        plan["notes"] = gpu_notes + plan["notes"]
        check_compute_modes(plan, gpu_list)
        config.sync.transport = plan["sync"]["transport"]  # the server and the ranks read the same choice
        config.train.micro_batch_size = plan["batch"]["micro_batch_size"]  # derived for these ranks
        config.train.gradient_accumulation_steps = plan["batch"]["gradient_accumulation_steps"]
        plan_memory(plan, gpu_list, config, Zero.from_file(config.train.deepspeed_config))
        if plan["memory"]:
            config.server.gpu_memory_utilization = plan["memory"]["gpu_memory_utilization"]
            config.server.kv_cache_gib = plan["memory"]["kv_cache_gib"]
        if not args.hostfile:
            check_batch(config, plan["trainer"]["ranks"])
        if args.plan_json:
            Path(args.plan_json).write_text(json.dumps(redacted(plan), indent=2) + "\n")
        if args.dry_run:
            print(describe(plan))
            return 0
        for spec in plan["servers"]:
            check_port_free(spec["host"], spec["port"], spec["engine"], len(plan["servers"]))
        check_data_and_rewards(config)
        prepare_model(config)
        check_disk_space(config, run_dir, cuda=gpus > 0)
    except (ConfigError, PlanError, DataError, RewardError, ToolError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = run_dir / "config.yaml"
        resolved.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
        if plan["trainer"]["token_file"]:  # ranks on other nodes: a 0600 file on the shared run directory
            fd = os.open(plan["trainer"]["token_file"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
    except OSError as e:
        print(f"error: run directory {run_dir} is not writable: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"run directory: {run_dir}", flush=True)

    # engine i at position i (none when they run elsewhere); only the main thread changes the list
    engines: list[ServerProcess] = []
    stopping = threading.Event()  # set on the way out: a restart thread's failure is then no news
    trainer = None
    started = time.time()
    several = len(plan["servers"]) > 1

    def start_engine(i: int) -> ServerProcess:
        """Start engine i; its health is waited for separately. Called from the main thread only: the
        kernel's parent-death signal (die_with_parent) follows the *thread* that started a child, so an
        engine started from a short-lived thread would be sent SIGTERM when that thread ends."""
        spec = plan["servers"][i]
        log = run_dir / spec["log"]
        process = ServerProcess(spec["command"][3:], log, spec["host"], spec["port"], token=token, env=spec["env"],
                                cwd=REPO, command=spec["command"])
        if several:
            print(f"starting generation engine {i} on {spec['host']}:{spec['port']} ({config.model.path}); "
                  f"log: {log}", flush=True)
        else:
            print(f"starting generation server ({config.model.path}); log: {log}", flush=True)
        return process

    def stop_all(signum=None, frame=None):
        if trainer is not None and trainer.poll() is None:
            try:
                os.killpg(trainer.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if signum is not None:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop_all)
    try:
        urls = plan["server_urls"]
        if plan["servers"]:
            # all started first, then each waited for: they load their models in parallel
            for i in range(len(plan["servers"])):
                engines.append(start_engine(i))
            deadline = time.monotonic() + config.server.startup_timeout_s
            for engine in engines:
                engine.wait_healthy(max(1.0, deadline - time.monotonic()))
        else:
            deadline = time.monotonic() + config.server.startup_timeout_s
            for url in urls:
                ServerClient(url, token).wait_healthy(max(1.0, deadline - time.monotonic()))
        # The launcher's own evaluations (before and after training) use every engine, as the trainer does.
        client = Engines(urls, token, config.server.request_timeout_s)
        if config.eval.enabled and not (run_dir / "eval_before.json").exists():
            print("evaluating the initial model...", flush=True)
            summary = run_eval(client, config, run_dir / "eval_before")
            print(format_table({"before": summary}), flush=True)
        cmd = plan["trainer"]["command"]
        # the repo, then where the user launched from (reward plugins there), then their own PYTHONPATH
        trainer_env = {**os.environ, **plan["trainer"]["env"], "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)}
        if plan["servers"]:  # the engines are this process's: the ranks wait for a restart only while it lives
            trainer_env[LAUNCHER_PID_ENV] = str(os.getpid())
        if plan["trainer"]["token_file"]:
            trainer_env.pop(TOKEN_ENV, None)
        for name in plan["trainer"]["unset_env"]:
            trainer_env.pop(name, None)
        trainer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=trainer_env,
                                   cwd=REPO, start_new_session=True, preexec_fn=die_with_parent)
        copier = tee(trainer.stdout, sys.stdout.buffer, run_dir / "trainer.log")
        monitor = EngineMonitor(engines, start_engine, config.server.restart, config.server.max_restarts,
                                config.server.startup_timeout_s, stopping)
        while (code := trainer.poll()) is None:
            monitor.poll()
            time.sleep(0.5)
        copier.join(10)
        print(f"trainer exited with code {code}; run directory: {run_dir}", flush=True)
        if code == 0:
            client.keep_newest()  # the engines holding the trained weights (a restarted one may not)
            finish_run(client, config, run_dir, started, plan)
        return code
    except KeyboardInterrupt:
        print("interrupted: stopping trainer and server", file=sys.stderr, flush=True)
        stop_all()
        return 130
    except Exception as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            stop_all()
            try:
                trainer.wait(30)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(trainer.pid, signal.SIGKILL)  # whatever is left of the rank processes
            except ProcessLookupError:
                pass
        stopping.set()
        for engine in engines:  # a restart thread still waiting sees its engine gone and ends
            engine.stop()


if __name__ == "__main__":
    sys.exit(main())
