"""Evaluate a model on a test split through vLLM: greedy pass@1 and sampled maj@k.

    python -m pipeline.report.evaluate --model runs/<name>/final [--config C] [--limit 100] [--maj-k 8]
    python -m pipeline.report.evaluate --server-url http://127.0.0.1:8710 ...   (a server already running)

The command (make eval): it starts a server of its own for --model, or talks to a running one, and
runs the evaluation service (pipeline/rollout/evaluate.py `run_eval`: what is measured, and how),
which writes OUT.json (the summary) and OUT.jsonl (one row per example); then prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.rollout.evaluate import format_table, run_eval
from pipeline.task.data import DataError


def main(argv=None) -> int:
    from pipeline.config import ConfigError, load_config

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report.evaluate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", help="model directory or hub name (started in a server of its own)")
    parser.add_argument("--server-url", help="evaluate whatever this running server serves instead")
    parser.add_argument(
        "--config", help="YAML config: data split, server settings (default: built-in defaults)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--data-file", help="a GSM8K-format JSONL to evaluate on instead of the config's test split"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument(
        "--maj-k", type=int, help="samples per question for maj@k (0 = greedy only; default eval.maj_k)"
    )
    parser.add_argument(
        "--max-tokens", type=int, help="completion length (default: train.max_completion_tokens)"
    )
    parser.add_argument(
        "--temperature", type=float, help="sampling temperature for maj@k (default eval.temperature)"
    )
    parser.add_argument("--out", default="eval", help="writes OUT.json (summary) and OUT.jsonl (per example)")
    args = parser.parse_args(argv)
    if not (args.model or args.server_url):
        parser.error("give --model or --server-url")
    try:
        config = load_config(args.config, args.set + ([f"model.path={args.model}"] if args.model else []))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server = None
    try:
        if args.server_url:
            from pipeline.generation.client import ServerClient, server_token

            client = ServerClient(
                args.server_url,
                server_token(config.server.token),
                config.server.request_timeout_s,
                ca_file=config.server.tls_ca,
            )
            model_path = client.model_info()["model"]
        else:
            from pipeline.generation.client import server_token
            from pipeline.generation.server_process import ServerProcess, bind

            # Its socket bound here and handed over (no port another process could take first), and a
            # token (the configured one, else a fresh one): nobody else can replace the model it serves.
            listener = bind("127.0.0.1", 0)
            port = listener.getsockname()[1]
            out_dir = Path(args.out).parent
            try:
                server = ServerProcess(
                    [
                        *(["--config", args.config] if args.config else []),
                        *sum((["--set", s] for s in args.set), []),
                        "--model",
                        args.model,
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    out_dir / "eval-server.log",
                    "127.0.0.1",
                    port,
                    token=server_token(config.server.token),
                    listener=listener,
                    scheme="https" if config.server.tls_cert else "http",
                    ca_file=config.server.tls_ca,
                )
            finally:
                listener.close()  # the server holds it now
            client = server.wait_healthy(config.server.startup_timeout_s)
            model_path = args.model
        config.model.path = model_path
        summary = run_eval(
            client,
            config,
            args.out,
            args.data_file,
            args.limit,
            args.maj_k,
            args.max_tokens,
            args.temperature,
        )
    except Exception as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.stop()
    print(format_table({"value": {k: v for k, v in summary.items() if k != "prompts_dropped_as_too_long"}}))
    print(f"-> {args.out}.json, {args.out}.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
