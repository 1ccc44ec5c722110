"""Start a GRPO run: the generation engines, then the trainer ranks under the `deepspeed` launcher.

    python launch/train.py [--config C] [--set key=value] [--name R [--resume [--force]]] [--dry-run]
                                                                                          (or grpo-train)

`train(config, options)` is the same run in process, in three phases: `resolve` (the finished config and
launch plan), `preflight` (every check before a process starts), `supervise` (engines, trainer,
evaluations, report). Layouts, multi-node and what happens on failures: README "Training" and "Reliability".
"""

from __future__ import annotations

import argparse
import codecs
import copy
import dataclasses
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from launch.gpus import nvidia_smi
from launch.memory import Zero, model_shape, param_count, plan_memory
from launch.plan import (
    Gpu,
    Layout,
    Plan,
    PlanError,
    check_compute_modes,
    describe,
    make_plan,
    parse_inventory,
    redacted,
    visible_gpus,
)
from launch.resume import check_changes, resume_config
from pipeline.config import Config, ConfigError, check_batch, load_config, to_dict
from pipeline.generation.client import TOKEN_ENV, ServerClient, free_port, server_token
from pipeline.generation.engines import LAUNCHER_PID_ENV, Engines
from pipeline.generation.server_process import ServerProcess, die_with_parent
from pipeline.rollout.evaluate import format_table, run_eval
from pipeline.task.data import DataError
from pipeline.task.reward_functions import PLUGIN_DIR_ENV, RewardError
from pipeline.task.tools import ToolError
from pipeline.trainer.trust import untrusted_checkpoints

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "tiny-cpu.yaml"
INVENTORY_ENV = "GRPO_GPU_INVENTORY"
DRY_RUN_GPU_GIB = 80.0  # a dry run for GPUs this host does not have: the size of an A100/H100 80GB
REFUSALS = (ConfigError, PlanError, DataError, RewardError, ToolError)  # one line, exit 2, nothing started


@dataclass(frozen=True)
class Options:
    """What the command line adds to a config (see `parse_args`; --name and --set go into the config)."""

    resume: bool = False
    force: bool = False  # with resume: allow changes that make it differ from the uninterrupted run
    server_url: str | None = None
    hostfile: str | None = None
    launcher: str = ""
    master_port: int = 0  # 0: a free one here (29500 with a hostfile)
    master_addr: str = ""
    gpus: int | None = None  # None: every visible GPU (1 per slot with a hostfile)
    gpu_memory_gib: float | None = None
    dry_run: bool = False
    plan_json: str | None = None


@dataclass(frozen=True)
class Run:
    """A resolved run: the finished config and its plan, where it writes, the server's token; after
    `preflight`, the sockets it holds: engine i's listening socket at position i (handed to each of its
    server processes, kept across restarts) and the trainer ranks' rendezvous port on this host."""

    config: Config
    plan: Plan
    run_dir: Path
    token: str
    master_port: int = 0  # the ranks' rendezvous port when they run on this host (0: elsewhere)
    listeners: tuple = ()
    reserved: tuple = ()


@dataclass(frozen=True)
class Outcome:
    """What `train` returns: the exit code (0 done, 2 refused before anything started, 130 interrupted,
    else the trainer's), the run directory (None when refused) and the plan."""

    code: int
    run_dir: Path | None = None
    plan: Plan | None = None


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config",
        help="YAML recipe (default: configs/tiny-cpu.yaml); with --resume the run's own config.yaml is "
        "used, and this file only locates run.root",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.max_steps=5 (repeatable)",
    )
    p.add_argument("--name", help="run name (shortcut for --set run.name=...)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue run --name from its latest checkpoint, with its own config.yaml plus --set",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: allow --set changes that make the resumed run differ from an uninterrupted "
        "one (seed, data, model, ZeRO, batch, schedule, ...)",
    )
    p.add_argument(
        "--server-url",
        help="use a server that is already running (multi-node); do not start one. "
        "Several engines: their URLs, comma-separated",
    )
    p.add_argument(
        "--hostfile", help="DeepSpeed hostfile: trainer ranks on several hosts (needs --server-url)"
    )
    p.add_argument(
        "--launcher", default="", help="DeepSpeed multi-node launcher with --hostfile (pdsh, slurm, ...)"
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=0,
        help="DeepSpeed rendezvous port (default: a free one here; 29500 with --hostfile)",
    )
    p.add_argument(
        "--master-addr",
        default="",
        help="with --hostfile: rendezvous address (default: the hostfile's first host)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        help="plan for this many GPUs on this host (default: as many as it has); "
        "with --hostfile, 0 means CPU-only trainer nodes (--launcher slurm)",
    )
    p.add_argument(
        "--gpu-memory-gib",
        type=float,
        help=f"plan as if each GPU had this much memory (default: what nvidia-smi says; "
        f"{DRY_RUN_GPU_GIB:.0f} for a dry run's GPUs this host lacks)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the processes this run would start, start nothing, load no model",
    )
    p.add_argument("--plan-json", help="write the launch plan as JSON (secrets redacted) to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """The command line: the config file and its overrides, then `train`."""
    args = parse_args(argv)
    if args.name is not None and not args.name.strip():
        print("error: --name: empty (leave it out for a timestamped run)", file=sys.stderr)
        return 2
    overrides = [*args.set, *([f"run.name={args.name}"] if args.name else [])]
    try:
        if args.force and not args.resume:
            raise ConfigError("--force: only with --resume")
        if args.resume:  # the run's own config.yaml, plus --set
            given = config_file(args.config) if args.config else None
            config = resume_config(given, overrides, DEFAULT_CONFIG)
        else:
            config = load_config(config_file(args.config or str(DEFAULT_CONFIG)), overrides)
    except REFUSALS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    options = Options(
        resume=args.resume,
        force=args.force,
        server_url=args.server_url,
        hostfile=args.hostfile,
        launcher=args.launcher,
        master_port=args.master_port,
        master_addr=args.master_addr,
        gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory_gib,
        dry_run=args.dry_run,
        plan_json=args.plan_json,
    )
    return train(config, options).code


def train(config: Config, options: Options | None = None) -> Outcome:
    """A GRPO run of `config` (left as given), started from this process: resolve the config and plan,
    write or print the plan if asked, check everything before anything starts, then run and watch the
    engines and the trainer. A refusal is one line on stderr (`error: ...`) and code 2."""
    options = options or Options()
    with Interrupts() as interrupts:  # first: the embedded model's build (minutes) is interruptible too
        try:
            run = resolve(config, options)
            if options.plan_json:
                Path(options.plan_json).write_text(json.dumps(redacted(run.plan).to_json(), indent=2) + "\n")
            if options.dry_run:
                print(describe(run.plan))
                return Outcome(0, run.run_dir, run.plan)
            run = preflight(run)
        except REFUSALS as e:
            print(f"error: {e}", file=sys.stderr)
            return Outcome(2)
        except KeyboardInterrupt:  # nothing runs yet; a half-built model removed itself
            print("interrupted before the run started", file=sys.stderr, flush=True)
            return Outcome(130)
        print(f"run directory: {run.run_dir}", flush=True)
        return Outcome(supervise(run, interrupts), run.run_dir, run.plan)


class Interrupts:
    """Ctrl-C (SIGINT) and SIGTERM while the launcher runs (a context; in the main thread only, where
    Python runs signal handlers): the first raises KeyboardInterrupt wherever the main thread is, and
    the run unwinds; once stopping (`stop`, or that first signal), further ones are noted and ignored,
    so the clean-up (stop the trainer, the engines, the final SIGKILL sweep) always runs to its end.
    The previous handlers are put back on exit: an in-process caller gets its own."""

    def __init__(self):
        self.stopping = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def handle(self, signum, frame) -> None:
        if self.stopping:
            print(
                f"{signal.Signals(signum).name}: already stopping; the clean-up runs to its end",
                file=sys.stderr,
                flush=True,
            )
            return
        self.stopping = True
        raise KeyboardInterrupt

    def stop(self) -> None:
        """From here on the run is being cleaned up: signals are no longer obeyed."""
        self.stopping = True


# --- resolve: the finished config and plan ----------------------------------------------------------


def resolve(config: Config, options: Options) -> Run:
    """The run's finished config and plan: paths absolute, the run directory checked, the DeepSpeed JSON
    read (once), the plan made for this host's GPUs with its memory split, and the plan's decisions
    written into the config (`apply_plan`). Works on a copy: the caller's config is left as given."""
    config = copy.deepcopy(config)
    absolute_paths(config)
    if options.resume and not config.run.name:
        raise ConfigError("--resume needs --name (the run to continue)")
    count, gpus, notes = host_gpus(options)
    config.run.name = config.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = run_directory(config.run.root, config.run.name)
    if options.resume and not (run_dir / "checkpoints" / "latest").exists():
        raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
    if options.resume and (why := untrusted_checkpoints(run_dir)):
        raise ConfigError(f"--resume: refusing to load {run_dir / 'checkpoints'}: {why}")
    if not options.resume and (run_dir / "metrics.jsonl").exists():
        raise ConfigError(f"run.name: {run_dir} already holds a run (use --resume or another --name)")
    config.train.deepspeed_config, zero = read_deepspeed_config(config.train.deepspeed_config, cuda=count > 0)
    # A run that starts its own server gives it a fresh token: loopback is no boundary on a shared node.
    token = server_token(config.server.token) or ("" if options.server_url else secrets.token_hex(16))
    asked = layout(config, options, count, gpus, run_dir, token)
    plan = make_plan(asked)
    check_compute_modes(plan, gpus)
    plan = dataclasses.replace(
        plan, memory=plan_memory(plan, gpus, config, zero), notes=(*notes, *plan.notes)
    )
    apply_plan(config, plan)
    if not options.hostfile:
        check_batch(config, plan.trainer.ranks)
    if options.resume:  # what the numbers depend on is as saved (or --force)
        check_changes(config, run_dir, plan.trainer.ranks, options.force)
    return Run(config, plan, run_dir, token, 0 if options.hostfile else asked.master_port)


def run_directory(root: str, name: str) -> Path:
    """run.root/run.name, where run.name (--name) must be one directory name inside run.root: not
    empty, no path separator (`../x`, `/abs/path`), no leading dot (`.`, `..`, and run.root/.cache,
    where the embedded model is kept), no control character, and not a link out of run.root."""
    separators = {"/", "\\", os.sep, os.altsep} - {None}
    why = next(
        (
            reason
            for failed, reason in (
                (not name.strip(), "is empty"),
                (any(sep in name for sep in separators), "holds a path separator"),
                (name.startswith("."), "starts with '.'"),
                (not name.isprintable(), "holds a control character"),
            )
            if failed
        ),
        "",
    )
    run_dir = Path(root) / name
    if not why and run_dir.resolve().parent != Path(root).resolve():
        why = f"leads out of run.root ({run_dir} is a link to {run_dir.resolve()})"
    if why:
        raise ConfigError(
            f"run.name (--name) {name!r} {why}: expected a directory name inside run.root ({root})"
        )
    return run_dir


def apply_plan(config: Config, plan: Plan) -> None:
    """The plan's decisions into the config, once: the server and the ranks read the same choices."""
    config.sync.transport = plan.sync.transport
    config.train.micro_batch_size = plan.batch.micro_batch_size  # derived for these ranks
    config.train.gradient_accumulation_steps = plan.batch.gradient_accumulation_steps
    if plan.memory:
        config.server.gpu_memory_utilization = plan.memory.gpu_memory_utilization
        config.server.kv_cache_gib = plan.memory.kv_cache_gib


def layout(
    config: Config, options: Options, gpus: int, visible: list[Gpu], run_dir: Path, token: str
) -> Layout:
    """What the plan is asked: the config's placement and batch settings, and this launch's arguments."""
    s, t = config.server, config.train
    deepspeed = Path(sys.executable).with_name("deepspeed")
    hostfile = str(Path(options.hostfile).expanduser().absolute()) if options.hostfile else None
    return Layout(
        gpus=gpus,
        gpu_ids=None if hostfile else tuple(g.index for g in visible),
        tp=s.tensor_parallel_size,
        dp=s.data_parallel_size,
        num_ranks=t.num_ranks,
        micro_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        completions_per_step=t.completions_per_step,
        transport=config.sync.transport,
        server_host=s.host,
        server_port=s.port,
        server_url=options.server_url,
        tls=bool(s.tls_cert),
        hostfile=hostfile,
        launcher=options.launcher,
        master_addr=options.master_addr,
        master_port=options.master_port or (29500 if hostfile else free_port("127.0.0.1")),
        run_dir=str(run_dir),
        resume=options.resume,
        token=token,
        deepspeed=str(deepspeed) if deepspeed.exists() else "deepspeed",
    )


def host_gpus(options: Options) -> tuple[int, list[Gpu], list[str]]:
    """How many GPUs the plan is for, which of this host's, and what was assumed. With a hostfile the
    ranks run on its nodes: their slots are GPUs, unless --gpus 0 (CPU, SLURM)."""
    if not options.hostfile:
        gpus, notes = run_gpus(options)
        return len(gpus), gpus, notes
    count = 1 if options.gpus is None else options.gpus
    if count < 0:
        raise ConfigError(f"--gpus {count}: expected 0 (CPU trainer nodes) or more")
    return count, [], []


def run_gpus(options: Options) -> tuple[list[Gpu], list[str]]:
    """The GPUs this run plans over, in CUDA's order with physical indices, and what was assumed: the
    visible ones (or the first --gpus of them); a dry run may plan for more than the host has."""
    visible_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = visible_gpus(gpu_inventory(), visible_env)
    count = len(visible) if options.gpus is None else options.gpus
    if count < 0 or (not options.dry_run and count > len(visible)):
        through = f" visible (CUDA_VISIBLE_DEVICES={visible_env})" if visible_env is not None else ""
        raise ConfigError(
            f"--gpus {count}: this host has {len(visible)} GPU(s){through} (plan for more with --dry-run)"
        )
    notes = []
    if count > len(
        visible
    ):  # a dry run for GPUs this host lacks: those CUDA_VISIBLE_DEVICES names, else 0..N-1
        ids = [int(n) for n in (visible_env or "").split(",") if n.strip().isdigit()] or list(range(count))
        if len(ids) < count:
            raise ConfigError(f"--gpus {count}: CUDA_VISIBLE_DEVICES={visible_env} names {len(ids)} GPU(s)")
        visible = [Gpu(i, DRY_RUN_GPU_GIB) for i in ids]
        notes.append(
            f"dry run: {count} GPU(s) this host does not have, "
            f"{options.gpu_memory_gib or DRY_RUN_GPU_GIB} GiB each (--gpu-memory-gib)"
        )
    gpus = visible[:count]
    if options.gpu_memory_gib:
        gpus = [dataclasses.replace(g, memory_gib=options.gpu_memory_gib) for g in gpus]
    return gpus, notes


def gpu_inventory() -> list[Gpu]:
    """Every GPU of this host with its memory and compute mode, from nvidia-smi, or from $GRPO_GPU_INVENTORY
    in the same CSV (tests; planning for a host with other GPUs)."""
    text = os.environ.get(INVENTORY_ENV)
    if text is None:
        text = "\n".join(", ".join(row) for row in nvidia_smi("index,memory.total,compute_mode"))
    return parse_inventory(text)


def read_deepspeed_config(given: str, cuda: bool) -> tuple[str, Zero]:
    """train.deepspeed_config, read once: it must name a readable DeepSpeed JSON with a ZeRO stage; `auto`
    is the ZeRO-2 JSON tuned for the device (GPU: overlapped communication); relative paths are looked up
    from the working directory, then the repo. Returns its absolute path (for the trainer) and the ZeRO
    settings the memory split reads."""
    if given == "auto":
        given = "configs/ds_zero2_gpu.json" if cuda else "configs/ds_zero2.json"
    given = Path(given).expanduser()
    path = next((p for p in (given, REPO / given) if p.is_file()), None)
    if path is None:
        raise ConfigError(
            f"train.deepspeed_config: {given} not found (expected a DeepSpeed JSON such as "
            f"configs/ds_zero2.json)"
        )
    try:
        zero = json.loads(path.read_text()).get("zero_optimization", {})
        stage = zero.get("stage", 0)
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not a DeepSpeed JSON object: {e}") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(
            f"train.deepspeed_config: {path}: zero_optimization.stage must be 0-3, got {stage!r}"
        )
    try:
        return str(path.resolve()), Zero.of(zero)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"train.deepspeed_config: {path}: zero_optimization: {e}") from None


def config_file(given: str) -> Path:
    """--config: relative to where the user launched, else to the repository (`--config
    configs/prem-1b-gsm8k.yaml` from anywhere), made absolute."""
    path = Path(given).expanduser()
    return (
        path if path.exists() or path.is_absolute() or not (REPO / path).exists() else REPO / path
    ).absolute()


def absolute_paths(config: Config) -> None:
    """run.root, a local model.path, data files, TLS files and an @file system prompt, relative to where the user
    launched: the server and ranks run in the repository, so the resolved config (run_dir/config.yaml)
    and the plan name them absolutely. A model.path that is no local directory is a hub name, kept."""
    config.run.root = str(Path(config.run.root).expanduser().absolute())
    if config.model.path and Path(config.model.path).expanduser().exists():
        config.model.path = str(Path(config.model.path).expanduser().absolute())
    d = config.data
    for key in ("train_file", "test_file"):
        if getattr(d, key):
            setattr(d, key, str(Path(getattr(d, key)).expanduser().absolute()))
    for key in ("tls_cert", "tls_key", "tls_ca"):
        if getattr(config.server, key):
            setattr(config.server, key, str(Path(getattr(config.server, key)).expanduser().absolute()))
    if d.system_prompt.startswith("@"):
        d.system_prompt = "@" + str(Path(d.system_prompt[1:]).expanduser().absolute())


# --- preflight: every check before anything starts -------------------------------------------------


def preflight(run: Run) -> Run:
    """What the plan cannot say, checked before any process starts: the engines' ports are ours (bound
    and held from now on: `hold_port`) and so is the ranks' rendezvous port (`reserve_port`), the data,
    rewards and tools load, the model is there (model.build=tiny: built now, which a dry run skips; the
    run that comes back names it), the disk holds the checkpoints, and the run directory takes the
    resolved config (and the token file for ranks on other nodes). A refusal releases the ports."""
    held: list = []
    try:
        for engine in run.plan.servers:
            held.append(hold_port(engine.host, engine.port, engine.engine, len(run.plan.servers)))
        reserved = (reserve_port(run.master_port),) if run.master_port else ()
        held += reserved
        run = dataclasses.replace(run, listeners=tuple(held[: len(run.plan.servers)]), reserved=reserved)
        check_data_and_rewards(run.config)
        run = dataclasses.replace(run, config=model_built(run.config))
        check_disk_space(run.config, run.run_dir, cuda=run.plan.trainer.device == "cuda")
        write_run_dir(run)
    except BaseException:
        for sock in held:
            sock.close()
        raise
    return run


def hold_port(host: str, port: int, engine: int = 0, engines: int = 1):
    """Engine i's listening socket on server.port + i, bound now and held by the launcher for the whole
    run: each server process of the engine gets it (`--listen-fd`), so between this check and the
    server's start, and while it restarts, no other process can take the port and receive what the
    trainer sends there. A port another server answers on is refused (the trainer would push weights
    into the wrong one); connections of a server that just stopped, lingering in TIME_WAIT, are not."""
    from pipeline.generation.server_process import bind

    try:
        return bind(host, port)
    except OSError:
        which = f" (engine {engine} of {engines}: server.port + {engine})" if engines > 1 else ""
        raise ConfigError(
            f"server.port: {host}:{port}{which} is already in use (another run's server?); "
            f"pick another with --set server.port=N"
        ) from None


def reserve_port(port: int, host: str = "127.0.0.1"):
    """The ranks' rendezvous port on this host, held until the run ends for rank 0 alone (SO_REUSEPORT,
    pipeline/sync/rendezvous.py `reserve`): no other process can take it in between."""
    from pipeline.sync.rendezvous import reserve

    try:
        return reserve(host, port)
    except OSError:
        raise ConfigError(
            f"--master-port {port}: {host}:{port} is already in use; pick another (or leave it out)"
        ) from None


def check_data_and_rewards(config: Config) -> None:
    """Before anything starts: the system prompt file, local data files (each bad row is `file:line`),
    and every reward plugin, imported and called once on a training example (a plugin that cannot be
    imported, or returns the wrong number of values, fails here rather than at step 1)."""
    from pipeline.task.data import examples_for, resolve_system_prompt
    from pipeline.task.reward_functions import load_rewards, score_completions
    from pipeline.trainer.metrics import missing_trackers

    missing = missing_trackers(config.train.report_to)
    if missing:
        raise ConfigError(
            f"train.report_to: {', '.join(missing)} is not installed (pip install "
            f"{' '.join(missing)}, or make install, which includes the `track` extra)"
        )
    system_prompt = resolve_system_prompt(config.data.system_prompt)
    rewards = load_rewards(config.reward_functions)
    tools = config.rollout.tools or config.rollout.environment
    if tools:
        from pipeline.task.tools import load_toolbox

        toolbox = load_toolbox(
            config.rollout.tools, config.rollout.environment or None
        )  # one line, before anything starts
    if config.data.source == "hub":
        return  # downloading here and again in the ranks is not worth it: the ranks report bad rows
    if config.data.source == "synthetic":
        from pipeline.task import synthetic

        d = config.data
        train = synthetic.generate(1, config.run.seed, "train", d.synthetic_levels, d.synthetic_max_operand)
        if config.eval.enabled or config.eval.every:  # too many test problems asked for: one line, now
            synthetic.generate(
                d.synthetic_test, config.run.seed, "test", d.synthetic_levels, d.synthetic_max_operand
            )
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
            samples = [
                [{"role": "assistant", "content": ""}],
                [
                    {"role": "assistant", "content": "", "tool_calls": [call]},
                    {"role": "tool", "name": toolbox.names[0], "content": "1"},
                    {"role": "assistant", "content": e.solution},
                ],
            ]
        score_completions(
            samples, [e.answer, e.answer], config.rewards, rewards, [e.prompt(system_prompt)] * 2, columns
        )


def model_built(config: Config) -> Config:
    """model.build=tiny: the config with model.path at the embedded default, built once (cached)."""
    if not config.model.build:
        return config
    if config.model.build != "tiny":
        raise ConfigError(f"model.build: expected '' or 'tiny', got {config.model.build!r}")
    from pipeline.embedded.default_model import build_default_model

    print("building the embedded default model (cached after the first run)...", flush=True)
    model = dataclasses.replace(config.model, path=str(build_default_model(config)), build="")
    return dataclasses.replace(config, model=model)


def prepare_model(config: Config) -> None:
    """`model_built`, in place (launch/slurm.sbatch resolves the model with it before starting the server);
    SIGTERM (scancel) during the build is a KeyboardInterrupt, which leaves no half-built model."""
    with Interrupts():
        config.model = model_built(config).model


def write_run_dir(run: Run) -> None:
    """The run directory, yours alone (0700, a resumed one too): the resolved config (what the server and
    ranks read) and, for ranks on other nodes, the token, each in a 0600 file."""
    try:
        run.run_dir.parent.mkdir(parents=True, exist_ok=True)
        run.run_dir.mkdir(mode=0o700, exist_ok=True)
        os.chmod(run.run_dir, 0o700)  # whatever the umask, and a run directory made before this was 0755
        write_private(run.run_dir / "config.yaml", yaml.safe_dump(to_dict(run.config), sort_keys=False))
        if run.plan.trainer.token_file:
            write_private(Path(run.plan.trainer.token_file), run.token)
    except OSError as e:
        raise ConfigError(f"run directory {run.run_dir} is not writable: {e.strerror or e}") from None


def write_private(path: Path, text: str) -> None:
    """`text` into `path`, readable and writable by you alone (0600, an existing file too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


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
            print(
                f"disk space for checkpoints not checked: the model's size is unknown ({source})", flush=True
            )
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
        raise ConfigError(
            f"run.root: {existing} has {free / 2**20:.0f} MiB free; this run needs about "
            f"{need / 2**20:.0f} MiB for {checkpoints} checkpoint(s) and the final model{basis}"
        )


# --- supervise: the engines, the trainer, the finish -----------------------------------------------


def supervise(run: Run, interrupts: Interrupts | None = None) -> int:
    """Start the engines (or wait for those running elsewhere), evaluate the initial model, run the
    trainer while watching the engines, and after a successful run evaluate and report; every process is
    stopped on the way out, whatever signals arrive meanwhile (`Interrupts`). Everything the run's
    processes write is yours alone (umask 077: checkpoints, logs, the final model). Exit code: the
    trainer's, 130 interrupted, 1 the launcher failed."""
    if interrupts is None:
        with Interrupts() as interrupts:
            return supervise(run, interrupts)
    processes = Processes(run)
    started = time.time()
    umask = os.umask(0o077)
    try:
        client = processes.start_engines()
        evaluate_before(client, run)
        code = processes.run_trainer()
        print(f"trainer exited with code {code}; run directory: {run.run_dir}", flush=True)
        if code == 0:
            client.keep_newest()  # the engines holding the trained weights (a restarted one may not)
            finish_run(client, run, started)
        return code
    except KeyboardInterrupt:
        print("interrupted: stopping trainer and server", file=sys.stderr, flush=True)
        processes.stop_trainer()
        return 130
    except Exception as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    finally:
        interrupts.stop()  # a second Ctrl-C or SIGTERM from here on is noted, not obeyed
        processes.stop()
        os.umask(umask)


class Processes:
    """The processes of a run: engine i at position i (none when they run elsewhere; only the main
    thread changes the list) and the trainer (`deepspeed` or `srun`, in its own process group)."""

    trainer_grace_s = 30.0  # from SIGTERM to the SIGKILL of whatever is left of the trainer's group

    def __init__(self, run: Run):
        self.run = run
        self.engines: list[ServerProcess] = []
        self.trainer: subprocess.Popen | None = None
        self.stopping = threading.Event()  # set on the way out: a restart thread's failure is then no news

    def start_engine(self, i: int) -> ServerProcess:
        """Start engine i; its health is waited for separately. Called from the main thread only: the
        kernel's parent-death signal (die_with_parent) follows the *thread* that started a child, so an
        engine started from a short-lived thread would be sent SIGTERM when that thread ends."""
        engine, run = self.run.plan.servers[i], self.run
        log = run.run_dir / engine.log
        process = ServerProcess(
            list(engine.command[3:]),
            log,
            engine.host,
            engine.port,
            token=run.token,
            env=engine.env,
            cwd=REPO,
            command=list(engine.command),
            listener=run.listeners[i] if run.listeners else None,  # kept open here across restarts
            scheme="https" if run.config.server.tls_cert else "http",
            ca_file=run.config.server.tls_ca,
        )
        if len(run.plan.servers) > 1:
            print(
                f"starting generation engine {i} on {engine.host}:{engine.port} ({run.config.model.path}); "
                f"log: {log}",
                flush=True,
            )
        else:
            print(f"starting generation server ({run.config.model.path}); log: {log}", flush=True)
        return process

    def start_engines(self) -> Engines:
        """Every engine started first, then each waited for (they load their models in parallel); those
        running elsewhere only waited for. The client of them all."""
        run = self.run
        for i in range(len(run.plan.servers)):
            self.engines.append(self.start_engine(i))
        deadline = time.monotonic() + run.config.server.startup_timeout_s
        ca = run.config.server.tls_ca
        for server in self.engines or [
            ServerClient(url, run.token, ca_file=ca) for url in run.plan.server_urls
        ]:
            server.wait_healthy(max(1.0, deadline - time.monotonic()))
        return Engines(list(run.plan.server_urls), run.token, run.config.server.request_timeout_s, ca_file=ca)

    def run_trainer(self) -> int:
        """The trainer, its output copied to the console and trainer.log, the engines watched (and
        restarted) until it exits; its exit code."""
        run, trainer = self.run, self.run.plan.trainer
        self.trainer = subprocess.Popen(
            list(trainer.command),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=trainer_env(run),
            cwd=REPO,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        copier = tee(self.trainer.stdout, sys.stdout, run.run_dir / "trainer.log")
        s = run.config.server
        monitor = EngineMonitor(
            self.engines,
            self.start_engine,
            s.restart,
            s.max_restarts,
            s.startup_timeout_s,
            self.stopping,
            release=self.release_port,
        )
        while (code := self.trainer.poll()) is None:
            monitor.poll()
            time.sleep(0.5)
        copier.join(10)
        return code

    def stop_trainer(self) -> None:
        if self.trainer is not None and self.trainer.poll() is None:
            try:
                os.killpg(self.trainer.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def release_port(self, i: int) -> None:
        """Engine i is down for good: its port is closed, so the trainer's calls to it fail at once
        (connection refused) instead of waiting in the held socket's backlog for a server that never
        comes."""
        if self.run.listeners:
            self.run.listeners[i].close()

    def stop(self) -> None:
        """On the way out: the trainer (SIGTERM, `trainer_grace_s`, then whatever is left of its ranks
        SIGKILLed), then every engine (a restart thread still waiting sees its engine gone and ends), then
        the ports held for them."""
        if self.trainer is not None:
            self.stop_trainer()
            try:
                self.trainer.wait(self.trainer_grace_s)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(self.trainer.pid, signal.SIGKILL)  # whatever is left of the rank processes
            except ProcessLookupError:
                pass
        self.stopping.set()
        for engine in self.engines:
            engine.stop()
        for sock in (*self.run.listeners, *self.run.reserved):
            sock.close()


def trainer_env(run: Run) -> dict[str, str]:
    """The ranks' environment. PYTHONPATH: the repo, then the user's own; the directory the user launched
    from (plugins there) goes separately ($PYTHON_GRPO_PLUGIN_DIR), to the end of the ranks' sys.path
    (`plugin_path`): on PYTHONPATH it would come before the standard library, and a `json.py` there
    would replace the real one in every rank."""
    trainer = run.plan.trainer
    env = {
        **os.environ,
        **trainer.env,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
        PLUGIN_DIR_ENV: os.getcwd(),
    }
    for name in (*trainer.unset_env, *([TOKEN_ENV] if trainer.token_file else [])):
        env.pop(name, None)  # ranks on other nodes read the token from their file
    if run.plan.servers:  # the engines are this process's: the ranks wait for a restart only while it lives
        env[LAUNCHER_PID_ENV] = str(os.getpid())
    return env


def evaluate_before(client: Engines, run: Run) -> None:
    """The initial model's evaluation (once per run: a resumed run keeps its first), on every engine."""
    if run.config.eval.enabled and not (run.run_dir / "eval_before.json").exists():
        print("evaluating the initial model...", flush=True)
        summary = run_eval(client, run.config, run.run_dir / "eval_before")
        print(format_table({"before": summary}), flush=True)


class EngineMonitor:
    """The launcher's watch over the engines it started, one `poll()` per pass of its loop. An engine whose
    process exited is restarted when server.restart is on, each engine counting its own restarts against
    server.max_restarts; one past its limit (or any, with restart off) stays down, and the run goes on with
    the others: the trainer decides when no engine is left. A restarted engine's health is awaited in a
    thread of its own, so that a slow start never delays noticing another engine's exit. `engines`: the
    started ServerProcess objects, engine i at position i (replaced in place on a restart);
    `start_engine(i)`: starts engine i again (from the calling thread: see `Processes.start_engine`)."""

    def __init__(
        self,
        engines: list,
        start_engine,
        restart: bool,
        max_restarts: int,
        startup_timeout_s: float,
        stopping: threading.Event | None = None,
        say=None,
        release=None,
    ):
        self.engines, self.start_engine = engines, start_engine
        self.release = release or (lambda i: None)  # engine i is down for good (its port can go)
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
            if (
                i in self.down
                or (i in self.waiting and self.waiting[i].is_alive())
                or engine.proc.poll() is None
            ):
                continue
            code = engine.proc.returncode
            engine.stop()  # engine-core and worker processes left of the dead one
            if self.restart and self.restarts[i] < self.max_restarts:
                # The trainer notices on its next call, waits for the new engine and re-pushes its weights.
                self.restarts[i] += 1
                self.say(
                    f"{self.name(i)} exited (code {code}); restarting it "
                    f"({self.restarts[i]} of at most {self.max_restarts})"
                )
                self.engines[i] = self.start_engine(i)
                self.waiting[i] = threading.Thread(
                    target=self.await_healthy,
                    args=(i, self.engines[i]),
                    daemon=True,
                    name=f"engine-{i}-restart",
                )
                self.waiting[i].start()
            else:
                self.down.add(i)
                self.release(i)
                n = self.restarts[i]
                why = (
                    f"has used its {n} restart{'s' * (n != 1)}"
                    if self.restart
                    else "is not restarted (server.restart is off)"
                )
                self.say(
                    f"{self.name(i)} exited (code {code}) and {why}"
                    + ("; the run goes on with the other engines" if len(self.engines) > 1 else "")
                )

    def await_healthy(self, i: int, process) -> None:
        """A restart's thread. An engine that does not come back is stopped (by wait_healthy): the next
        poll sees it exited and restarts it again if it may."""
        from pipeline.generation.client import ServerError

        try:
            process.wait_healthy(self.startup_timeout_s)
        except ServerError as e:
            if not self.stopping.is_set():
                self.say(
                    f"{self.name(i)} did not come back: {str(e).splitlines()[0]} (log: {process.log_path})"
                )


def finish_run(client: Engines, run: Run, started: float) -> None:
    """After a successful run: evaluate the final weights (still served), write the report."""
    import platform

    from pipeline.report.card import read_json, write_report

    config, run_dir, plan = run.config, run.run_dir, run.plan
    before = read_json(run_dir / "eval_before.json")
    if config.eval.enabled:
        print("evaluating the trained model...", flush=True)
        after = run_eval(client, config, run_dir / "eval_after")
        print(format_table({"before": before, "after": after} if before else {"after": after}), flush=True)
    cores = os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = ", ".join(row[0] for row in nvidia_smi("name")) if plan.trainer.device == "cuda" else ""
    info = read_json(run_dir / "run_info.json") or {"wall_time_s": 0.0}
    info.update(
        {
            "hardware": f"{platform.machine()} {cores} cores, {memory_gib:.0f} GiB RAM"
            + (f", GPUs: {gpus}" if gpus else ", no GPU"),
            "ranks": plan.trainer.ranks,
            "device": plan.trainer.device,
            "transport": plan.sync.transport,
            "wall_time_s": info["wall_time_s"] + time.time() - started,  # summed over resumed sessions
        }
    )
    (run_dir / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"report: {write_report(run_dir)}", flush=True)


def tee(stream, console, log_path: Path) -> threading.Thread:
    """Copy the trainer's output to the console (its bytes; decoded where the console takes only text, as
    in a notebook) and to the run's trainer.log until it closes."""
    binary = getattr(console, "buffer", None)
    decode = codecs.getincrementaldecoder("utf-8")("replace").decode

    def run():
        with open(log_path, "ab") as log:
            for chunk in iter(lambda: stream.read1(4096), b""):
                for sink, data in ((binary or console, chunk if binary else decode(chunk)), (log, chunk)):
                    sink.write(data)
                    sink.flush()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    sys.exit(main())
