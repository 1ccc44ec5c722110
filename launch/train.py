"""Start a GRPO run: the generation server, then the trainer ranks under the `deepspeed` launcher.

    python launch/train.py [--config configs/tiny-cpu.yaml] [--set train.max_steps=5] [--resume --name R]

Single host (default): starts `python -m pipeline.serve` in its own process group, waits for its
health check (with a deadline and its log tail on failure), runs `deepspeed --module pipeline.train`
and stops the server when training ends, fails or is interrupted. Exit code = the trainer's.

Multi-node: start the server yourself on one host (`make serve CONFIG=...`, with GRPO_SERVER_TOKEN
set if it binds off loopback) and pass `--server-url http://HOST:PORT --hostfile hosts` here; the
trainer ranks run on the hostfile's hosts (see launch/slurm.sbatch).
"""

from __future__ import annotations

import argparse
import json
import os
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

from pipeline.client import ServerClient  # noqa: E402
from pipeline.config import Config, ConfigError, check_batch, load_config, to_dict  # noqa: E402
from pipeline.evaluate import format_table, run_eval  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "tiny-cpu.yaml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="launch/train.py", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML recipe (default: configs/tiny-cpu.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.max_steps=5 (repeatable)")
    p.add_argument("--name", help="run name (shortcut for --set run.name=...)")
    p.add_argument("--resume", action="store_true", help="continue run --name from its latest checkpoint")
    p.add_argument("--server-url", help="use a server that is already running (multi-node); do not start one")
    p.add_argument("--hostfile", help="DeepSpeed hostfile: trainer ranks on several hosts")
    return p.parse_args(argv)


def check_port_free(host: str, port: int) -> None:
    """Our server must not start on a port another server answers on: the trainer would talk to
    (and push weights into) the wrong one."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As uvicorn does: connections of a server that just stopped linger in TIME_WAIT, and must
        # not make the next run refuse the port; a live listener still fails the bind.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            raise ConfigError(f"server.port: {host}:{port} is already in use (another run's server?); "
                              f"pick another with --set server.port=N") from None


def resolve_deepspeed_config(config: Config) -> None:
    """train.deepspeed_config must name a readable DeepSpeed JSON with a ZeRO stage; relative paths are
    looked up from the working directory, then the repo (the trainer gets the absolute path)."""
    given = Path(config.train.deepspeed_config)
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


def check_disk_space(config: Config, run_dir: Path) -> None:
    """Fail before anything starts if the run directory's disk cannot hold the checkpoints: a disk that
    fills up hours into a run loses the step that was being saved. Per checkpoint we count 8x the
    model's weight files (weights + fp32 master copy + two Adam moments), for the checkpoints kept plus
    the one being written, plus the final model."""
    model_dir = Path(config.model.path)
    if not model_dir.is_dir():
        return  # a hub name: its size is not known before download
    weights = sum(f.stat().st_size for f in model_dir.iterdir() if f.suffix in (".safetensors", ".bin"))
    checkpoints = (config.train.keep_checkpoints if config.train.save_every else 0) + 1
    need = weights * (8 * checkpoints + 1) + 50 * 2**20  # + logs, metrics, evaluations
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need:
        raise ConfigError(f"run.root: {existing} has {free / 2**20:.0f} MiB free; this run needs about "
                          f"{need / 2**20:.0f} MiB for {checkpoints} checkpoint(s) and the final model")


def trainer_ranks(config: Config) -> tuple[int, str]:
    """(ranks on this host, device kind): GPUs minus the server's, or 2 CPU ranks."""
    if config.train.num_ranks:
        return config.train.num_ranks, "cpu" if not _gpus() else "cuda"
    gpus = _gpus()
    if gpus:
        ranks = gpus - config.server.tensor_parallel_size
        if ranks < 1:
            raise ConfigError(f"server.tensor_parallel_size={config.server.tensor_parallel_size} leaves no GPU "
                              f"for training on this host ({gpus} GPUs)")
        return ranks, "cuda"
    return 2, "cpu"


def _gpus() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in out.stdout.splitlines()) if out.returncode == 0 else 0


def prepare_model(config: Config) -> None:
    """model.build=tiny: build (once, cached) the embedded default; model.path points at it."""
    if config.model.build:
        if config.model.build != "tiny":
            raise ConfigError(f"model.build: expected '' or 'tiny', got {config.model.build!r}")
        from pipeline.default_model import build_default_model

        print("building the embedded default model (cached after the first run)...", flush=True)
        config.model.path = str(build_default_model(config))
        config.model.build = ""


def finish_run(client, config: Config, run_dir: Path, started: float, ranks: int, device: str) -> None:
    """After a successful run: evaluate the final weights (still served), write the report."""
    import platform

    from pipeline.device import choose_transport
    from pipeline.report import read_json, write_report

    before = read_json(run_dir / "eval_before.json")
    if config.eval.enabled:
        print("evaluating the trained model...", flush=True)
        after = run_eval(client, config, run_dir / "eval_after")
        print(format_table({"before": before, "after": after} if before else {"after": after}), flush=True)
    cores = os.cpu_count()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = ", ".join(subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=30).stdout.split("\n")[:-1]) if device == "cuda" else ""
    info = read_json(run_dir / "run_info.json") or {"wall_time_s": 0.0}
    info.update({
        "hardware": f"{platform.machine()} {cores} cores, {memory_gib:.0f} GiB RAM" + (f", GPUs: {gpus}" if gpus else ", no GPU"),
        "ranks": ranks, "device": device, "transport": choose_transport(config.sync.transport, device),
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


def main(argv=None) -> int:
    from pipeline.client import free_port
    from pipeline.server_process import ServerProcess, die_with_parent

    args = parse_args(argv)
    overrides = list(args.set) + ([f"run.name={args.name}"] if args.name else [])
    try:
        config = load_config(args.config, overrides)
        if args.resume and not config.run.name:
            raise ConfigError("--resume needs --name (the run to continue)")
        ranks, device = trainer_ranks(config)
        if not args.hostfile:
            check_batch(config, ranks)
        config.run.name = config.run.name or time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.run.root) / config.run.name
        if args.resume and not (run_dir / "checkpoints" / "latest").exists():
            raise ConfigError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}")
        if not args.resume and (run_dir / "metrics.jsonl").exists():
            raise ConfigError(f"run.name: {run_dir} already holds a run (use --resume or another --name)")
        if not args.server_url:
            check_port_free(config.server.host, config.server.port)
        resolve_deepspeed_config(config)
        prepare_model(config)
        check_disk_space(config, run_dir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    token = os.environ.get("GRPO_SERVER_TOKEN") or config.server.token
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = run_dir / "config.yaml"
        resolved.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    except OSError as e:
        print(f"error: run directory {run_dir} is not writable: {e.strerror or e}", file=sys.stderr)
        return 2
    env = {"GRPO_SERVER_TOKEN": token} if token else {}
    print(f"run directory: {run_dir}", flush=True)

    server = None
    trainer = None
    started = time.time()

    def start_server() -> ServerProcess:
        process = ServerProcess(["--config", str(resolved)], run_dir / "server.log", config.server.host,
                                config.server.port, token=token, cwd=REPO)
        print(f"starting generation server ({config.model.path}); log: {run_dir / 'server.log'}", flush=True)
        process.wait_healthy(config.server.startup_timeout_s)
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
        if args.server_url:
            server_url = args.server_url
            ServerClient(server_url, token).wait_healthy(config.server.startup_timeout_s)
        else:
            server = start_server()
            server_url = server.client.base_url
        client = ServerClient(server_url, token, config.server.request_timeout_s)
        if config.eval.enabled and not (run_dir / "eval_before.json").exists():
            print("evaluating the initial model...", flush=True)
            summary = run_eval(client, config, run_dir / "eval_before")
            print(format_table({"before": summary}), flush=True)
        cmd = ["deepspeed", "--master_port", str(free_port("127.0.0.1"))]
        cmd += ["--hostfile", args.hostfile] if args.hostfile else ["--num_gpus", str(ranks)]
        cmd += ["--module", "pipeline.train", "--config", str(resolved), "--run-dir", str(run_dir),
                "--server-url", server_url] + (["--resume"] if args.resume else [])
        trainer_env = {**os.environ, **env, "PYTHONPATH": str(REPO)}
        if device == "cpu":
            trainer_env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
        deepspeed_bin = Path(sys.executable).with_name("deepspeed")
        cmd[0] = str(deepspeed_bin) if deepspeed_bin.exists() else "deepspeed"
        trainer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=trainer_env,
                                   cwd=REPO, start_new_session=True, preexec_fn=die_with_parent)
        copier = tee(trainer.stdout, sys.stdout.buffer, run_dir / "trainer.log")
        restarts = 0
        while (code := trainer.poll()) is None:
            if server is not None and server.proc.poll() is not None and config.server.restart \
                    and restarts < config.server.max_restarts:
                # The trainer notices on its next call, waits for the new server and re-pushes its weights.
                restarts += 1
                print(f"generation server exited (code {server.proc.returncode}); restarting it "
                      f"({restarts} of at most {config.server.max_restarts})", flush=True)
                server.stop()  # engine-core and worker processes left of the dead one
                server = start_server()
            time.sleep(0.5)
        copier.join(10)
        print(f"trainer exited with code {code}; run directory: {run_dir}", flush=True)
        if code == 0:
            finish_run(client, config, run_dir, started, ranks, device)
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
        if server is not None:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
