"""The generation server: one long-lived process embedding a vLLM engine, JSON over HTTP.

    python -m pipeline.serve --config configs/tiny-cpu.yaml [--set server.port=8710] [--run-dir runs/x]

Why our own server instead of `vllm serve` or TRL's `trl vllm-serve`: we need weight updates that
work on CPU as well as GPU (TRL's are NCCL-only), bucketed instead of per-parameter, versioned so the
trainer can refuse stale rollouts, and a score endpoint to prove each sync landed. The engine is
vLLM's offline `LLM`; engine calls are serialised by one lock (a call batches all its prompts), and
generation waits while a weight update is between begin and end.
"""

from __future__ import annotations

import argparse
import contextlib
import hmac
import ipaddress
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from pipeline.config import Config, ConfigError, load_config

log = logging.getLogger("pipeline.serve")
TOKEN_ENV = "GRPO_SERVER_TOKEN"
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
WORKER_EXTENSION = "pipeline.weight_loader.WeightSyncExtension"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


TokenIds = list[Annotated[int, Field(ge=0)]]


class GenerateRequest(Strict):
    prompt_token_ids: list[TokenIds] | None = None
    prompts: list[str] | None = None
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1)
    seed: int | None = None
    stop_token_ids: TokenIds | None = None
    ignore_eos: bool = False


class ScoreSequence(Strict):
    prompt_token_ids: TokenIds = Field(min_length=1)
    completion_token_ids: TokenIds = Field(min_length=1)


class ScoreRequest(Strict):
    sequences: list[ScoreSequence] = Field(min_length=1)


class SyncInitRequest(Strict):
    backend: str = Field(pattern="^(gloo|nccl)$")
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    timeout_s: float = Field(60.0, gt=0)


class VersionRequest(Strict):
    version: int = Field(ge=0)


class TensorMeta(Strict):
    name: str = Field(min_length=1)
    dtype: str = Field(pattern="^(" + "|".join(DTYPE_NAMES) + ")$")
    shape: list[Annotated[int, Field(ge=0)]]
    offset: int = Field(ge=0)
    nbytes: int = Field(ge=0)


class BucketRequest(Strict):
    tensors: list[TensorMeta] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self):
        sizes = {"float64": 8, "int64": 8, "float32": 4, "int32": 4, "float16": 2, "bfloat16": 2}
        for t in self.tensors:
            numel = 1
            for d in t.shape:
                numel *= d
            if numel * sizes.get(t.dtype, 1) != t.nbytes:
                raise ValueError(f"tensor {t.name}: nbytes {t.nbytes} does not match {t.dtype} {t.shape}")
        return self


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GenerationServer:
    """The engine plus the state the HTTP layer needs: weight version, update flag, limits."""

    def __init__(self, config: Config):
        from vllm import LLM

        from pipeline.device import accelerator, engine_options, resolve_dtype

        self.config = config
        cfg = config.server
        self.device = accelerator()
        self.dtype = str(resolve_dtype(config.model.dtype)).removeprefix("torch.")
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
        self.llm = LLM(
            model=config.model.path,
            dtype=self.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            trust_remote_code=config.model.trust_remote_code,
            seed=cfg.seed,
            worker_extension_cls=WORKER_EXTENSION,
            # Logprobs after temperature: what the trainer computes as log_softmax(logits / T).
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            **engine_options(cfg.max_model_len),
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.version = 0  # training step of the weights served; 0 = as loaded from disk
        self.updating = False
        self.error = ""  # set when a weight update failed half-way: the weights are unusable
        self.sync_ready = False
        self.engine = threading.Condition()  # serialises engine calls; waits out weight updates

    # --- engine access ---------------------------------------------------------------------------

    def call(self, fn, *, during_update: bool = False, timeout: float | None = None):
        timeout = timeout or self.config.server.request_timeout_s
        with self.engine:
            if not during_update:
                if not self.engine.wait_for(lambda: not self.updating, timeout):
                    raise HTTPException(503, "a weight update is in progress; try again")
                if self.error:
                    raise HTTPException(503, f"weights unusable after a failed update: {self.error}")
            return fn()

    def info(self) -> dict:
        cfg = self.config.server
        return {
            "model": self.config.model.path, "dtype": self.dtype, "device": self.device,
            "max_model_len": cfg.max_model_len, "vocab_size": self.vocab_size,
            "eos_token_id": self.tokenizer.eos_token_id, "version": self.version,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "limits": {"max_n": cfg.max_n, "max_tokens": cfg.max_tokens, "max_prompts": cfg.max_prompts},
        }

    # --- generate / score --------------------------------------------------------------------------

    def _check_ids(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise HTTPException(400, f"{what}: token id {bad} is outside the vocabulary (size {self.vocab_size})")

    def generate(self, req: GenerateRequest) -> dict:
        from vllm import SamplingParams

        cfg = self.config.server
        if (req.prompts is None) == (req.prompt_token_ids is None):
            raise HTTPException(400, "give exactly one of 'prompts' (text) or 'prompt_token_ids'")
        if req.prompts is not None:
            prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in req.prompts]
        else:
            prompt_ids = req.prompt_token_ids
        if not prompt_ids or len(prompt_ids) > cfg.max_prompts:
            raise HTTPException(400, f"number of prompts must be 1..{cfg.max_prompts}, got {len(prompt_ids)}")
        if req.n > cfg.max_n:
            raise HTTPException(400, f"n must be at most {cfg.max_n}, got {req.n}")
        if req.max_tokens > cfg.max_tokens:
            raise HTTPException(400, f"max_tokens must be at most {cfg.max_tokens}, got {req.max_tokens}")
        for i, ids in enumerate(prompt_ids):
            if not ids:
                raise HTTPException(400, f"prompt {i} is empty")
            if len(ids) + req.max_tokens > cfg.max_model_len:
                raise HTTPException(400, f"prompt {i} has {len(ids)} tokens; with max_tokens={req.max_tokens} "
                                         f"that exceeds max_model_len={cfg.max_model_len}")
            self._check_ids(ids, f"prompt {i}")
        self._check_ids(req.stop_token_ids or [], "stop_token_ids")
        params = [
            SamplingParams(
                n=req.n, temperature=req.temperature, top_p=req.top_p, max_tokens=req.max_tokens,
                seed=None if req.seed is None else req.seed + i, logprobs=0,
                stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos,
            )
            for i in range(len(prompt_ids))
        ]
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]

        def run():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
            return self.version, outputs

        version, outputs = self.call(run)
        results = []
        for out in outputs:
            completions = []
            for c in out.outputs:
                logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids, strict=True)]
                completions.append({"text": c.text, "token_ids": list(c.token_ids), "logprobs": logprobs,
                                    "finish_reason": c.finish_reason})
            results.append({"prompt_token_ids": list(out.prompt_token_ids), "completions": completions})
        return {"version": version, "results": results}

    def score(self, req: ScoreRequest) -> dict:
        """Per-token logprobs of each completion given its prompt (teacher forcing, temperature 1)."""
        from vllm import SamplingParams

        cfg = self.config.server
        if len(req.sequences) > cfg.max_prompts:
            raise HTTPException(400, f"at most {cfg.max_prompts} sequences per request, got {len(req.sequences)}")
        prompts = []
        for i, seq in enumerate(req.sequences):
            ids = seq.prompt_token_ids + seq.completion_token_ids
            if len(ids) + 1 > cfg.max_model_len:
                raise HTTPException(400, f"sequence {i} has {len(ids)} tokens; max_model_len is {cfg.max_model_len}")
            self._check_ids(ids, f"sequence {i}")
            prompts.append({"prompt_token_ids": ids})
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)

        def run():
            return self.version, self.llm.generate(prompts, params, use_tqdm=False)

        version, outputs = self.call(run)
        logprobs = []
        for seq, out in zip(req.sequences, outputs, strict=True):
            start = len(seq.prompt_token_ids)
            steps = out.prompt_logprobs[start:]
            logprobs.append([step[tok].logprob for step, tok in zip(steps, seq.completion_token_ids, strict=True)])
        return {"version": version, "logprobs": logprobs}

    # --- weight updates ----------------------------------------------------------------------------

    def _rpc(self, method: str, *args, timeout: float):
        try:
            return self.llm.collective_rpc(method, args=args, timeout=timeout)
        except Exception as e:  # the trainer died mid-transfer, or a tensor did not fit
            raise self._update_failed(f"{method} failed: {type(e).__name__}: {e}") from None

    def _update_failed(self, error: str) -> HTTPException:
        """The weights are unusable until the next complete update: refuse generation meanwhile."""
        self.error = error
        log.error("weight sync: %s", error)
        return HTTPException(503, error)

    def init_sync(self, req: SyncInitRequest) -> dict:
        world = 1 + self.config.server.tensor_parallel_size

        def run():
            ranks = self._rpc("init_sync_group", req.backend, req.host, req.port, world, req.timeout_s,
                              timeout=req.timeout_s)
            self.sync_ready = True
            return ranks

        return {"world_size": world, "worker_ranks": self.call(run, during_update=True)}

    def begin_update(self, req: VersionRequest) -> dict:
        timeout = self.config.sync.timeout_s
        if not self.sync_ready:
            raise HTTPException(409, "no sync group: call /weights/init first")
        with self.engine:  # wait for in-flight generation, then block new generation until /end
            self.updating = True
        try:
            self.call(lambda: self._rpc("begin_weight_update", timeout=timeout), during_update=True)
        except HTTPException:
            self._finish_update()
            raise
        log.info("weight update to version %d begun", req.version)
        return {"version": self.version}

    def receive_bucket(self, req: BucketRequest) -> dict:
        if not self.updating:
            raise HTTPException(409, "no weight update in progress: call /weights/begin first")
        meta = [t.model_dump() for t in req.tensors]
        timeout = self.config.sync.timeout_s
        try:
            seconds = self.call(lambda: self._rpc("receive_bucket", meta, timeout=timeout), during_update=True)
        except HTTPException:
            self._finish_update()
            raise
        return {"tensors": len(meta), "receive_s": max(seconds)}

    def end_update(self, req: VersionRequest) -> dict:
        if not self.updating:
            raise HTTPException(409, "no weight update in progress: call /weights/begin first")
        timeout = self.config.sync.timeout_s

        def run():
            loaded = self._rpc("end_weight_update", timeout=timeout)
            # Cached KV was computed by the old weights. Engine calls are serialised, so nothing holds
            # cache blocks now and the reset cannot legitimately fail; if it does, fail the update
            # rather than serve prompts whose prefix still runs on the old policy.
            if not self.llm.reset_prefix_cache():
                raise self._update_failed("reset_prefix_cache refused: cached KV is from the old weights")
            self.version, self.error = req.version, ""
            return loaded

        try:
            loaded = self.call(run, during_update=True)
        finally:
            self._finish_update()
        log.info("weights updated to version %d (%d tensors)", req.version, loaded[0])
        return {"version": self.version, "tensors": loaded[0]}

    def _finish_update(self) -> None:
        with self.engine:
            self.updating = False
            self.engine.notify_all()

    def shutdown(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()


def build_app(server: GenerationServer, token: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # Here, not after uvicorn returns: uvicorn re-raises SIGTERM once it has drained requests,
        # which would end this process before it could stop the engine-core and worker processes.
        server.shutdown()
        log.info("server stopped")

    app = FastAPI(title="grpo-pipeline generation server", version="1", lifespan=lifespan)

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if token:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        elif request.url.path.startswith("/weights") and not is_loopback(request.client.host if request.client else ""):
            # Without a token only loopback callers may replace the model.
            return JSONResponse({"detail": "weight updates need a token off loopback"}, status_code=401)
        return await call_next(request)

    @app.get("/health")
    def health():
        if server.error:
            return JSONResponse({"status": "error", "detail": server.error, "version": server.version}, 503)
        return {"status": "ok", "version": server.version, "updating": server.updating}

    @app.get("/model")
    def model_info():
        return server.info()

    @app.post("/generate")
    def generate(req: GenerateRequest):
        return server.generate(req)

    @app.post("/score")
    def score(req: ScoreRequest):
        return server.score(req)

    @app.post("/reset_prefix_cache")
    def reset_prefix_cache():
        return {"reset": bool(server.call(server.llm.reset_prefix_cache))}

    @app.post("/weights/init")
    def weights_init(req: SyncInitRequest):
        return server.init_sync(req)

    @app.post("/weights/begin")
    def weights_begin(req: VersionRequest):
        return server.begin_update(req)

    @app.post("/weights/bucket")
    def weights_bucket(req: BucketRequest):
        return server.receive_bucket(req)

    @app.post("/weights/end")
    def weights_end(req: VersionRequest):
        return server.end_update(req)

    return app


def setup_logging(run_dir: str | None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "server.log"))
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in handlers:
        handler.setFormatter(fmt)
    for name in ("pipeline", "vllm", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        for handler in handlers[1:] if name == "vllm" else handlers:  # vllm already logs to stderr
            logger.addHandler(handler)
        logger.propagate = False if name != "vllm" else logger.propagate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config (the same file as training)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set server.port=8711")
    parser.add_argument("--model", help="shortcut for --set model.path=...")
    parser.add_argument("--host", help="shortcut for --set server.host=...")
    parser.add_argument("--port", type=int, help="shortcut for --set server.port=...")
    parser.add_argument("--run-dir", help="also write server.log here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import uvicorn

    args = parse_args(argv)
    overrides = list(args.set)
    for key, value in (("model.path", args.model), ("server.host", args.host), ("server.port", args.port)):
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    token = os.environ.get(TOKEN_ENV) or config.server.token
    if not config.model.path:
        print("error: model.path: no model given (set it in the config or pass --model)", file=sys.stderr)
        return 2
    if not is_loopback(config.server.host) and not token:
        print(f"error: server.host={config.server.host} is not loopback; refusing to start without a token "
              f"(set {TOKEN_ENV} or server.token)", file=sys.stderr)
        return 2
    setup_logging(args.run_dir)
    start = time.perf_counter()
    server = GenerationServer(config)
    log.info("engine ready in %.1fs: %s (%s, %s)", time.perf_counter() - start, config.model.path,
             server.dtype, server.device)
    app = build_app(server, token)
    uv = uvicorn.Server(uvicorn.Config(app, host=config.server.host, port=config.server.port,
                                       log_level="warning", timeout_graceful_shutdown=5))
    uv.run()  # on SIGINT/SIGTERM: drains requests, runs the lifespan exit (engine shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
