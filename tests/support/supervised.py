"""The launcher's `supervise` (its processes, signals and clean-up) around a stand-in trainer: a script of
the test's in place of `deepspeed`, and a stand-in engine that only answers /health (the run's engines
"elsewhere", `--server-url`). No model, no DeepSpeed: the launcher's own behaviour, in seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support import tiers
from support.constants import REPO, RUN_TAG

DRIVER = """
import dataclasses, http.server, json, os, sys, threading

from launch.train import Options, Processes, resolve, supervise
from pipeline.config import load_config

root, trainer = sys.argv[1], sys.argv[2]


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


engine = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
threading.Thread(target=engine.serve_forever, daemon=True).start()
config = load_config("configs/tiny-cpu.yaml", [f"run.root={root}", "run.name=r", "eval.enabled=false"])
run = resolve(config, Options(server_url=f"http://127.0.0.1:{engine.server_port}"))
stand_in = dataclasses.replace(run.plan.trainer, command=(sys.executable, trainer))
run = dataclasses.replace(run, plan=dataclasses.replace(run.plan, trainer=stand_in))
run.run_dir.mkdir(parents=True)
Processes.trainer_grace_s = float(os.environ.get("TRAINER_GRACE_S", "30"))
os.umask(int(os.environ.get("DRIVER_UMASK", "0o022"), 8))
sys.exit(supervise(run))
"""


def start_supervised(root: Path, trainer_script: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`supervise` of a run named `r` under `root` whose trainer is `trainer_script` (Python source), in a
    process of its own (stdout and stderr together, text). The trainer reads RUN_DIR from its
    environment; `env` adds to the driver's (TRAINER_GRACE_S: the launcher's SIGTERM-to-SIGKILL grace for
    the trainer; DRIVER_UMASK: the umask it starts from)."""
    tiers.require("integration", "runs the launcher's supervise with its processes")
    root.mkdir(parents=True, exist_ok=True)
    (root / "driver.py").write_text(DRIVER)
    (root / "trainer.py").write_text(trainer_script)
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "GRPO_GPU_INVENTORY": "",
        "RUN_DIR": str(root / "r"),
        RUN_TAG: str(root),
        **(env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(root / "driver.py"), str(root), str(root / "trainer.py")],
        cwd=REPO,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
