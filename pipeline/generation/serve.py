"""The generation server: one long-lived process embedding a vLLM engine, JSON over HTTP.

    python -m pipeline.generation.serve --config configs/tiny-cpu.yaml [--set server.port=8710] [--run-dir runs/x]

Weight updates are vLLM's own weight-transfer API (`init_weight_transfer_engine`,
`start_weight_update`, `update_weights`, `finish_weight_update` on every worker; backend nccl / ipc
on GPU, our gloo engine on CPU). Why our server around vLLM's engine rather than vLLM's OpenAI server
with its RL routes: those routes need VLLM_SERVER_DEV_MODE and are outside `--api-key`, its responses
carry no weight version, and it has no teacher-forced score route; here every route needs the token,
every response says which weights produced it, and one lock serialises engine calls (a call batches
all its prompts) while a weight update holds generation back. Every request field is bounded at the
boundary, and an engine that fails or hangs makes the server exit rather than stay up unable to serve.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import ipaddress
import itertools
import logging
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pipeline.config import Config, ConfigError, load_config
from pipeline.generation.client import CHALLENGE, TOKEN_ENV, proof, server_token
from pipeline.generation.deadline import DeadlineCall, DeadlineExceeded
from pipeline.generation.server_process import bind, log_name

DEADLINE_ENV = "GRPO_SYNC_TIMEOUT_S"  # pipeline/sync/nccl_deadline.py reads it in the workers

log = logging.getLogger("pipeline.generation.serve")
WORKER_EXTENSION = "pipeline.sync.worker_ext.WorkerExtension"  # loaded in each vLLM worker


# --- requests: every field bounded at the boundary, so nothing a client sends reaches the engine
# in a shape it cannot take (vLLM serialises ints as 64-bit: a seed of 2**64 once wedged the engine).

SEED_MAX = 2**63 - 1
RPC_GRACE_S = 5.0  # beyond sync.timeout_s, so vLLM's own timeout (where it has one) reports first
ABORT_WAIT_S = 10.0  # /weights/abort waits this long for the update's own RPC to fail (its group is closed)
MAX_ITEMS = 100_000  # any list in a request (prompts, tokens of one prompt, names)
MAX_TEXT = 1_000_000  # characters of one text prompt
NONCE = re.compile(r"[0-9a-f]{16,128}")  # a client's challenge (GET /health?challenge=...)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")  # JSON may carry lone surrogates ("\ud800"), which no tokenizer takes
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (lone surrogate)") from None
    return text


TokenId = Annotated[int, Field(ge=0, lt=2**31)]
TokenIds = Annotated[list[TokenId], Field(max_length=MAX_ITEMS)]
Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_valid_unicode)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Name = Annotated[str, Field(max_length=1000), AfterValidator(_valid_unicode)]


class GenerateRequest(Strict):
    prompt_token_ids: Annotated[list[TokenIds], Field(max_length=MAX_ITEMS)] | None = None
    prompts: Annotated[list[Text], Field(max_length=MAX_ITEMS)] | None = None
    n: int = Field(1, ge=1, le=2**31)
    temperature: Finite = Field(1.0, ge=0.0, le=1e4)
    top_p: Finite = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1, le=2**31)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    stop_token_ids: TokenIds | None = None
    stop: Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=4)] | None = (
        None
    )
    """Stop strings, kept in the output (a tool call's closing tag: the rollout runs the call, then goes on)."""
    ignore_eos: bool = False


class ScoreSequence(Strict):
    prompt_token_ids: TokenIds = Field(min_length=1)
    completion_token_ids: TokenIds = Field(min_length=1)


class ScoreRequest(Strict):
    sequences: list[ScoreSequence] = Field(min_length=1, max_length=MAX_ITEMS)


class SyncInitRequest(Strict):
    init_info: dict
    """The backend's worker-side init info (vLLM's `init_weight_transfer_engine` payload)."""


class VersionRequest(Strict):
    version: int = Field(ge=0, le=SEED_MAX)


class UpdateRequest(Strict):
    update_info: dict | list[dict]
    """The backend's update info (vLLM's `update_weights` payload; a list = one per worker)."""


class ChecksumRequest(Strict):
    names: list[Name] = Field(max_length=MAX_ITEMS)
    received: list[Name] = Field(default_factory=list, max_length=MAX_ITEMS)


LOGPROB_FLOOR = -1e9


def finite(logprob: float) -> float:
    """JSON has no -inf: a token the model gives probability 0 is reported at -1e9."""
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def token_versions(completion, served: int) -> list[list[int]]:
    """[[version, start, end], ...]: the weights version that sampled tokens [start, end) (vLLM's spans,
    labelled by `set_weight_version` at each update); `served` where vLLM reports none."""
    spans = completion.weight_versions or []
    if not spans:
        return [[served, 0, len(completion.token_ids)]]
    return [[int(span.version), span.start, span.end] for span in spans]


def engine_phases(outputs) -> dict[str, float]:
    """Where the engine's time went for one batch, from vLLM's per-request timestamps (engine-core
    monotonic clock): prefill, from the first request scheduled to the last first token, and decode,
    from then to the last token. Empty where vLLM kept no stats."""
    stats = [
        o.metrics for o in outputs if getattr(o, "metrics", None) is not None and o.metrics.first_token_ts
    ]
    if not stats:
        return {}
    first = max(s.first_token_ts for s in stats)
    return {
        "prefill_s": max(0.0, first - min(s.scheduled_ts or s.first_token_ts for s in stats)),
        "decode_s": max(0.0, max(s.last_token_ts for s in stats) - first),
    }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GenerationServer:
    """The engine plus the state the HTTP layer needs: weight version, update flag, limits."""

    def __init__(self, config: Config, engine_index: int = 0):
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from pipeline.device import (
            accelerator,
            engine_options,
            resolve_dtype,
            resolve_enforce_eager,
            resolve_gpu_memory_utilization,
            sync_backend,
        )
        from pipeline.generation.transport import TRANSPORTS

        self.config = config
        cfg = config.server
        self.engine_index = engine_index  # which of the run's server.data_parallel_size engines
        # Told apart from its predecessor after a restart (same port, same version 0 until a push).
        self.instance = secrets.token_hex(8)
        self.device = accelerator()
        self.dtype = str(resolve_dtype(config.model.dtype)).removeprefix("torch.")
        self.backend = sync_backend(config.sync.transport, self.device)
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(cfg.kv_cache_gib))))
        # the workers' receive deadline (NCCL has none of its own: pipeline/sync/nccl_deadline.py)
        os.environ[DEADLINE_ENV] = str(config.sync.timeout_s)
        if self.backend == "ipc":
            # vLLM's IPC engine ships CUDA IPC handles pickled over HTTP and refuses to unpickle them
            # without this; every request needs the server's token, so only the run can send them.
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        self.enforce_eager = resolve_enforce_eager(cfg.enforce_eager, self.device)
        self.max_lora_rank, why = adapter_serving(config, self.device, self.dtype)
        if why and config.model.lora_rank:
            log.info("LoRA adapters are not served (%s): the trainer pushes merged weights", why)
        self.llm = LLM(
            model=config.model.path,
            dtype=self.dtype,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=resolve_gpu_memory_utilization(cfg.gpu_memory_utilization),
            enforce_eager=self.enforce_eager,
            trust_remote_code=config.model.trust_remote_code,
            seed=cfg.seed,
            worker_extension_cls=WORKER_EXTENSION,
            # vLLM's weight-transfer API: its nccl/ipc engines on GPU, ours (pipeline.sync.gloo_transfer,
            # registered through the vllm.general_plugins entry point) on CPU.
            weight_transfer_config=WeightTransferConfig(backend=TRANSPORTS[self.backend].vllm_name),
            # Logprobs after temperature: what the trainer computes as log_softmax(logits / T).
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=True,
            disable_log_stats=False,  # per-request timestamps: each /generate says where its engine time went
            **engine_options(cfg.max_model_len, cfg.kv_cache_gib),
            # model.lora_sync adapter: one adapter in use; two held, so a new version loads before the old goes
            **(
                {"enable_lora": True, "max_lora_rank": self.max_lora_rank, "max_loras": 1, "max_cpu_loras": 2}
                if self.max_lora_rank
                else {}
            ),
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.version = 0  # training step of the weights served; 0 = as loaded from disk
        self.updating = False
        self.update_started = 0.0  # time.monotonic() of the open update's start
        self.session_open = False  # vLLM's update session is open on the workers (start ok, not ended)
        self.torn = ""  # why the weights are torn (a push broke off): nothing is served until a full push
        self.fatal = ""  # set when a worker is stuck: the process exits so the launcher restarts it
        self.sync_ready = False
        self.engine = threading.Lock()  # serialises generate/score (LLM.generate drives one batch at a time)
        self.state = threading.Condition()  # `updating`: new generation waits for an open update's end
        self.running = 0  # engine calls started or waiting for the engine (under `state`)
        self.paused = False  # the open update paused a generation under way
        # serialises weight updates; they do not wait for a generation under way: it is paused between
        # decode steps (vLLM's pause_scheduler "keep") while the weights change, then resumed
        self.weights = threading.RLock()
        self._guard_engine_client()
        self._core("set_weight_version", "0")
        self.lora = (
            None  # the adapter every request is sampled with (vLLM LoRARequest); None = the base model
        )
        self.lora_ids = itertools.count(1)  # vLLM caches adapters by id: a new version never reuses one
        self.adapter_root = Path(tempfile.mkdtemp(prefix="grpo-adapters-")) if self.max_lora_rank else None

    # --- engine access ---------------------------------------------------------------------------

    def call(self, fn, what: str):
        """Run `fn` on the engine: one call at a time (each batches all its prompts), not started during
        a weight update (one that starts later pauses it), within the request deadline, under the watchdog."""
        deadline = time.monotonic() + self.config.server.request_timeout_s
        if self.fatal:
            raise HTTPException(503, f"server exiting: {self.fatal}")
        with self.state:
            if not self.state.wait_for(lambda: not self.updating, max(0.0, deadline - time.monotonic())):
                raise HTTPException(503, "a weight update is in progress; try again")
            self.running += 1
        try:
            with self._locked(what, self.engine):
                if self.torn:
                    raise HTTPException(503, f"no weights to serve until a full push: {self.torn}")
                if self.fatal:
                    raise HTTPException(503, f"server exiting: {self.fatal}")
                return self._guarded(fn, what)
        finally:
            with self.state:
                self.running -= 1

    def weight_call(self, fn, what: str):
        """Run a step of a weight update (or a read of the weights): one at a time, beside a generation."""
        with self._locked(what, self.weights):
            if self.fatal:
                raise HTTPException(503, f"server exiting: {self.fatal}")
            return self._guarded(fn, what)

    def _core(self, method: str, *args):
        """One of vLLM's engine-core methods (pause_scheduler, set_weight_version, ...): a utility call
        to the engine-core process, which runs it between two engine steps."""
        core = self.llm.llm_engine.engine_core
        if hasattr(core, "call_utility"):
            return core.call_utility(method, *args)
        return getattr(core.engine_core, method)(*args)  # in-process engine core (no multiprocessing)

    def _guard_engine_client(self) -> None:
        """vLLM's synchronous engine client sends on one ZeroMQ socket, written for one thread; a weight
        update now calls it while a generation's thread may send (aborts at stop strings): one lock."""
        core = self.llm.llm_engine.engine_core
        send = getattr(core, "_send_input", None)
        if send is None:
            return
        lock = threading.Lock()

        def locked_send(*args, **kwargs):
            with lock:
                return send(*args, **kwargs)

        core._send_input = locked_send

    def _guarded(self, fn, what: str):
        """The watchdog and the recovery around one engine call. Past server.request_timeout_s the
        engine is stuck: the server exits (the launcher's server.restart replaces it). An exception
        may leave half-added requests behind, and every later call would wait for them forever: they
        are aborted, and a one-token probe decides whether the engine still serves (then the request
        gets a 400) or not (the server exits)."""
        timeout = self.config.server.request_timeout_s
        watchdog = threading.Timer(
            timeout, self._die, (f"{what} ran past server.request_timeout_s={timeout:.0f}s",)
        )
        watchdog.daemon = True
        watchdog.start()
        try:
            return fn()
        except HTTPException:
            raise
        except Exception as e:  # noqa: BLE001 - classified below, never a bare 500
            log.exception("%s failed in the engine", what)
            if self._engine_serves():
                raise HTTPException(
                    400, f"{what}: the engine rejected the request: {type(e).__name__}: {str(e)[:300]}"
                ) from None
            self._die(f"the engine cannot serve after a failed {what}: {type(e).__name__}: {str(e)[:300]}")
            raise HTTPException(503, f"server exiting: {self.fatal}") from None
        finally:
            watchdog.cancel()

    def _engine_serves(self) -> bool:
        from vllm import SamplingParams

        if self.engine_dead():
            return False
        engine = self.llm.llm_engine
        try:
            leftovers = list(engine.output_processor.request_states)
            if leftovers:
                engine.abort_request(leftovers, internal=True)
            self.llm.generate([{"prompt_token_ids": [0]}], SamplingParams(max_tokens=1), use_tqdm=False)
            return True
        except Exception:  # noqa: BLE001 - the engine is gone or broken
            log.exception("engine probe failed")
            return False

    def engine_dead(self) -> bool:
        """vLLM's monitor flags the engine-core process's death here."""
        resources = getattr(getattr(self.llm.llm_engine, "engine_core", None), "resources", None)
        return bool(getattr(resources, "engine_dead", False))

    def info(self) -> dict:
        cfg = self.config.server
        return {
            "model": self.config.model.path,
            "dtype": self.dtype,
            "device": self.device,
            "max_model_len": cfg.max_model_len,
            "vocab_size": self.vocab_size,
            "eos_token_id": self.tokenizer.eos_token_id,
            "version": self.version,
            "engine": self.engine_index,
            "instance": self.instance,
            "tensor_parallel_size": cfg.tensor_parallel_size,
            "sync_backend": self.backend,
            "enforce_eager": self.enforce_eager,
            "lora_adapters": bool(self.max_lora_rank),
            "max_lora_rank": self.max_lora_rank,
            "adapter": self.lora.lora_name if self.lora else None,
            "worker_multiproc_method": os.environ.get("VLLM_WORKER_MULTIPROC_METHOD", ""),
            "limits": {"max_n": cfg.max_n, "max_tokens": cfg.max_tokens, "max_prompts": cfg.max_prompts},
        }

    # --- generate / score --------------------------------------------------------------------------

    def _check_ids(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if t >= self.vocab_size), None)
        if bad is not None:
            raise HTTPException(
                400, f"{what}: token id {bad} is outside the vocabulary (size {self.vocab_size})"
            )

    def generate(self, req: GenerateRequest) -> dict:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMValidationError

        cfg = self.config.server
        if (req.prompts is None) == (req.prompt_token_ids is None):
            raise HTTPException(400, "give exactly one of 'prompts' (text) or 'prompt_token_ids'")
        if req.prompts is not None:
            try:
                prompt_ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in req.prompts]
            except Exception as e:  # noqa: BLE001 - whatever the tokenizer refuses is the client's text
                raise HTTPException(
                    400, f"prompts: the tokenizer cannot encode them: {type(e).__name__}"
                ) from None
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
                raise HTTPException(
                    400,
                    f"prompt {i} has {len(ids)} tokens; with max_tokens={req.max_tokens} "
                    f"that exceeds max_model_len={cfg.max_model_len}",
                )
            self._check_ids(ids, f"prompt {i}")
        self._check_ids(req.stop_token_ids or [], "stop_token_ids")
        if req.seed is not None and req.seed + len(prompt_ids) - 1 > SEED_MAX:
            raise HTTPException(
                400,
                f"seed: prompt i is sampled with seed + i, which must stay <= 2**63-1; "
                f"got seed={req.seed} with {len(prompt_ids)} prompts",
            )
        try:
            params = [
                SamplingParams(
                    n=req.n,
                    temperature=req.temperature,
                    top_p=req.top_p,
                    max_tokens=req.max_tokens,
                    seed=None if req.seed is None else req.seed + i,
                    logprobs=0,
                    stop_token_ids=req.stop_token_ids,
                    ignore_eos=req.ignore_eos,
                    stop=req.stop,
                    include_stop_str_in_output=bool(req.stop),
                )
                for i in range(len(prompt_ids))
            ]
        except (ValueError, VLLMValidationError) as e:  # vLLM's own checks (greedy with n > 1, ...)
            raise HTTPException(400, f"sampling parameters: {' '.join(str(e).split())}") from None
        prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]

        def run():
            start = time.perf_counter()
            outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)
            if any(c.finish_reason == "abort" for out in outputs for c in out.outputs):
                # a weight update that broke off tore the weights under this paused generation
                raise HTTPException(503, f"generation aborted: the weights were torn: {self.torn}")
            return self.version, outputs, time.perf_counter() - start

        served, outputs, engine_s = self.call(run, "generate")
        results = []
        for out in outputs:
            completions = []
            for c in out.outputs:
                logprobs = [
                    finite(step[tok].logprob) for step, tok in zip(c.logprobs, c.token_ids, strict=True)
                ]
                completions.append(
                    {
                        "text": c.text,
                        "token_ids": list(c.token_ids),
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                        "versions": token_versions(c, served),
                    }
                )
            results.append({"prompt_token_ids": list(out.prompt_token_ids), "completions": completions})
        # the oldest weights any token came from (a generation an update paused spans two or more)
        version = min((c["versions"][0][0] for r in results for c in r["completions"]), default=served)
        return {
            "version": version,
            "engine": self.engine_index,
            "instance": self.instance,
            "results": results,
            "timing": {"engine_s": engine_s, **engine_phases(outputs)},
        }

    def score(self, req: ScoreRequest) -> dict:
        """Per-token logprobs of each completion given its prompt (teacher forcing, temperature 1)."""
        from vllm import SamplingParams

        cfg = self.config.server
        if len(req.sequences) > cfg.max_prompts:
            raise HTTPException(
                400, f"at most {cfg.max_prompts} sequences per request, got {len(req.sequences)}"
            )
        prompts = []
        for i, seq in enumerate(req.sequences):
            ids = seq.prompt_token_ids + seq.completion_token_ids
            if len(ids) + 1 > cfg.max_model_len:
                raise HTTPException(
                    400, f"sequence {i} has {len(ids)} tokens; max_model_len is {cfg.max_model_len}"
                )
            self._check_ids(ids, f"sequence {i}")
            prompts.append({"prompt_token_ids": ids})
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)

        def run():
            return self.version, self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.lora)

        version, outputs = self.call(run, "score")
        version = min(token_versions(out.outputs[0], version)[0][0] for out in outputs)
        logprobs = []
        for seq, out in zip(req.sequences, outputs, strict=True):
            start = len(seq.prompt_token_ids)
            steps = out.prompt_logprobs[start:]
            logprobs.append(
                [finite(step[tok].logprob) for step, tok in zip(steps, seq.completion_token_ids, strict=True)]
            )
        return {"version": version, "logprobs": logprobs}

    # --- weight updates: vLLM's weight-transfer worker methods, with deadlines and versions -------

    def _rpc(self, method: str, timeout: float, *, touches_weights: bool = True, **kwargs):
        """One of vLLM's worker methods on every worker (as `LLM.start_weight_update` & co. call them),
        under our own deadline: vLLM ignores `timeout` with one worker (UniProcExecutor), its engine-core
        utility call waits without limit, and with several workers its TimeoutError reaches us as a
        plain Exception. A weight RPC that fails or runs past the deadline leaves the model
        half-loaded. A start or an update that fails (a peer of the transfer group died, the trainer
        gave up) ends vLLM's session, with some layers new, some old, some mid-reload: the weights are
        *torn* (`_tear`), nothing is served, and the next full push repairs them; the other engines
        of a group whose one member died go on without a restart. A stuck worker never comes back,
        and a finish that fails leaves vLLM's session in an unknown state: then the server exits, the
        launcher's server.restart brings up a fresh one, and the trainer pushes its weights into that.
        A call that touches no weights and simply fails (a rendezvous that cannot form) is a 400: the
        weights are as they were."""
        with DeadlineCall(self.llm.collective_rpc, method, timeout, (), kwargs) as call:
            try:
                return call.result(timeout + RPC_GRACE_S)
            except DeadlineExceeded:
                reason = f"{method} did not finish within sync.timeout_s={timeout:.0f}s; a worker is stuck"
            except Exception as e:  # noqa: BLE001 - the trainer died mid-transfer, a tensor did not fit, ...
                reason = f"{method} failed: {type(e).__name__}: {str(e)[:500]}"
                stuck = "timed out" in str(e).lower()  # vLLM's RPC timeout (a worker not answering)
                if not touches_weights and not stuck:
                    raise HTTPException(400, reason) from None
                if (
                    method in ("start_weight_update", "update_weights") and not stuck
                ):  # vLLM ended the session
                    self.session_open = False
                    self._tear(reason)
                    raise HTTPException(
                        503, f"weight update failed, the weights are torn until a full push: {reason}"
                    ) from None
        self._die(reason)
        raise HTTPException(503, f"server exiting: {reason}")

    def _pause(self, mode: str | None) -> None:
        """vLLM's pause_scheduler(`mode`, no cache reset), or resume_scheduler with None, under the
        weight RPCs' deadline: a pause waits for the workers (it synchronises the device), and a stuck
        worker would hold it forever. Past the deadline, or failed, the server exits (as `_rpc`)."""
        timeout = self.config.sync.timeout_s
        args = ("resume_scheduler",) if mode is None else ("pause_scheduler", mode, False)
        with DeadlineCall(self._core, *args) as call:
            try:
                call.result(timeout + RPC_GRACE_S)
                return
            except DeadlineExceeded:
                reason = f"{args[0]} did not finish within sync.timeout_s={timeout:.0f}s; a worker is stuck"
            except Exception as e:  # noqa: BLE001 - the engine core is gone
                reason = f"{args[0]} failed: {type(e).__name__}: {str(e)[:500]}"
        self._die(reason)
        raise HTTPException(503, f"server exiting: {reason}")

    def _tear(self, reason: str) -> None:
        """A push broke off: the weights are neither the old version nor the new one. Version -1 and a
        503 for generation until a full push has been finished (and verified by the trainer)."""
        if not self.torn:
            log.warning("weights torn (%s): serving nothing until a full push", reason)
        self.torn, self.version = reason, -1

    def _die(self, reason: str) -> None:
        import signal

        self.fatal = reason
        log.error("server unusable, exiting: %s", reason)
        # SIGTERM after the error response has gone out; a hard exit if shutdown itself hangs.
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        threading.Timer(30.0, os._exit, (1,)).start()

    def _check_payload(self, kind: str, payload: dict | list[dict]) -> None:
        """Parse the payload as the backend's own dataclass does, so a malformed one is a 400 here
        instead of an exception inside the workers."""
        from pipeline.generation.transport import TRANSPORTS

        cls = TRANSPORTS[self.backend].engine_class()
        info_cls = cls.init_info_cls if kind == "init" else cls.update_info_cls
        for item in payload if isinstance(payload, list) else [payload]:
            try:
                info_cls(**item)
            except (TypeError, ValueError) as e:
                raise HTTPException(
                    400, f"{kind}_info is not a valid {self.backend} {kind} info: {e}"
                ) from None

    def init_sync(self, req: SyncInitRequest) -> dict:
        self._check_payload("init", req.init_info)
        timeout = self.config.sync.timeout_s

        def run():
            self._abandon_update()
            if self.sync_ready:  # a new trainer, or one that recovers: release the old group first, or
                # vLLM's NCCL engine keeps its communicator (its init only overwrites the reference)
                self.sync_ready = False
                self._rpc("shutdown_weight_transfer_engine", timeout, touches_weights=False)
            self._rpc("init_weight_transfer_engine", timeout, touches_weights=False, init_info=req.init_info)
            self.sync_ready = True

        self.weight_call(run, "weights/init")
        return {"backend": self.backend, "world_size": 1 + self.config.server.tensor_parallel_size}

    def start_update(self, req: VersionRequest) -> dict:
        timeout = self.config.sync.timeout_s
        if not self.sync_ready:
            raise HTTPException(409, "no transfer group: call /weights/init first")
        with self._locked("weights/start", self.weights):  # held until the pause has begun
            self._abandon_update()
            with self.state:  # new generation waits until /finish
                self.updating, self.update_started = True, time.monotonic()
                self.paused = self.running > 0

            def run():
                # A generation under way stops between two decode steps and keeps its requests; their
                # KV is recomputed by the new weights at /finish (see `finish_update`).
                if self.paused:
                    self._pause("keep")
                if self.torn:
                    self._rpc("grpo_forget_torn_update", timeout)
                self._rpc("start_weight_update", timeout)
                self.session_open = True

            try:
                self.weight_call(run, "weights/start")
            except HTTPException:
                self._finish_update()
                raise
        log.info(
            "weight update to version %d started%s",
            req.version,
            " (generation paused)" if self.paused else "",
        )
        return {"version": self.version}

    def update(self, req: UpdateRequest) -> dict:
        if not self.updating:
            raise HTTPException(409, "no weight update in progress: call /weights/start first")
        self._check_payload("update", req.update_info)
        timeout = self.config.sync.timeout_s
        try:
            self.weight_call(
                lambda: self._rpc("update_weights", timeout, update_info=req.update_info), "weights/update"
            )
        except HTTPException:
            if self.torn and not self.session_open:  # the session has ended: nothing left to finish
                self._finish_update()
            raise
        return {"ok": True}

    def finish_update(self, req: VersionRequest) -> dict:
        if not self.updating:
            raise HTTPException(409, "no weight update in progress: call /weights/start first")
        timeout = self.config.sync.timeout_s

        def run():
            self._rpc("finish_weight_update", timeout)
            self.session_open = False
            # Cached KV was computed by the old weights: none of it may serve again. The paused requests
            # give theirs up too (vLLM preempts them; resumed, they prefill their prompt and tokens so
            # far under the new weights), so every token after the update is sampled exactly as the new
            # weights would from its prefix (the trainer's view), not from a mix of old KV and new weights.
            if not self._core("reset_prefix_cache", True, False):
                self._die(
                    "reset_prefix_cache refused after a weight update: cached KV is from the old weights"
                )
                raise HTTPException(503, f"server exiting: {self.fatal}")
            if (
                self.lora is not None
            ):  # vLLM drops every adapter when an update finishes; its files are still here
                self.llm.llm_engine.add_lora(self.lora)
            self.version, self.torn = req.version, ""
            self._core("set_weight_version", str(req.version))  # each token's version: see generate

        try:
            self.weight_call(run, "weights/finish")
        finally:
            self._finish_update()
        log.info("weights updated to version %d", req.version)
        return {"version": self.version}

    def abort_update(self) -> dict:
        """The trainer gave up on the open update (another engine in its transfer group failed, so the
        broadcast stopped half-way; the trainer has closed its side of the group first, so a receive
        still waiting fails now). The weights are torn (`_tear`): the session is closed without being
        trusted and the next full push repairs them, with no restart. Only a weight RPC that does not
        end within ABORT_WAIT_S (a stuck worker) makes the server exit. No open update: nothing to do."""
        if not self.updating:
            return {"aborted": False, "version": self.version}
        if not self.weights.acquire(timeout=ABORT_WAIT_S):  # the update's own RPC holds it
            self._die("the trainer abandoned the weight update and its RPC does not end (a worker is stuck)")
            return {"aborted": True, "version": self.version}
        try:
            self._close_torn_session(
                "the trainer abandoned the weight update half-way (a peer of the transfer group failed)"
            )
        finally:
            self.weights.release()
        self._finish_update()
        return {"aborted": True, "version": self.version}

    def _close_torn_session(self, reason: str) -> None:
        """Under the engine lock, with an update open and no RPC running: end vLLM's session (its
        finalise loads whatever arrived; the weights are torn either way) and mark the weights torn."""
        self._tear(reason)
        if self.session_open:
            self._rpc("finish_weight_update", self.config.sync.timeout_s)
            self.session_open = False

    def load_adapter(self, body: bytes) -> dict:
        """POST /weights/adapter (model.lora_sync adapter): a PEFT adapter as one safetensors file whose
        metadata holds `version` and `adapter_config` (JSON). It is written to a directory of its own and
        loaded under a name, id and path never used before (vLLM caches adapters by id and prefix-cache
        blocks by name and path), then every request is sampled with it and the previous one is dropped.
        vLLM checks the adapter as it loads it: a refusal is a 400 and the previous adapter stays."""
        from vllm.lora.request import LoRARequest

        if not self.max_lora_rank:
            raise HTTPException(
                409,
                "this server serves no LoRA adapters (model.lora_rank=0, model.lora_sync=merged, "
                "or the model cannot take them): push merged weights",
            )
        version, config = adapter_header(body, self.max_lora_rank)
        lora_id = next(self.lora_ids)
        folder = self.adapter_root / f"v{version}-{lora_id}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(body)
        (folder / "adapter_config.json").write_text(config)
        request = LoRARequest(f"policy-v{version}-{lora_id}", lora_id, str(folder))

        def run():
            try:
                self.llm.llm_engine.add_lora(
                    request
                )  # loads it on every worker; a failure leaves the engine as it was
            except Exception as e:  # noqa: BLE001 - vLLM's refusal of this adapter
                raise HTTPException(
                    400, f"vLLM refused the adapter: {' '.join(str(e).split())[:500]}"
                ) from None
            old, self.lora, self.version = self.lora, request, version
            self._core("set_weight_version", str(version))
            if old is not None:
                self.llm.llm_engine.remove_lora(old.lora_int_id)
                shutil.rmtree(old.lora_path, ignore_errors=True)
            self.llm.reset_prefix_cache()  # the old adapter's blocks can never be hit again: free them

        try:
            self.call(run, "weights/adapter")
        except HTTPException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("adapter %s loaded: version %d (%d bytes)", request.lora_name, version, len(body))
        return {
            "version": self.version,
            "adapter": request.lora_name,
            "sha256": hashlib.sha256(body).hexdigest(),
        }

    def checksums(self, req: ChecksumRequest) -> dict:
        timeout = self.config.sync.timeout_s
        workers = self.weight_call(
            lambda: self._rpc(
                "grpo_weight_digests", timeout, touches_weights=False, names=req.names, received=req.received
            ),
            "weights/checksums",
        )
        return {"version": self.version, "workers": workers}

    @contextlib.contextmanager
    def _locked(self, what: str, lock):
        if not lock.acquire(timeout=self.config.server.request_timeout_s):
            raise HTTPException(
                503, f"{what}: the engine stayed busy past server.request_timeout_s; try again"
            )
        try:
            yield
        finally:
            lock.release()

    def _abandon_update(self) -> None:
        """A new /weights/init or /weights/start while an update is open: its trainer died or gave up
        (one run's trainer is the only holder of the token) and some layers hold new weights, some old,
        some none. The weights are torn; this very push repairs them."""
        with self._locked("weights", self.weights):
            if self.updating:
                self._close_torn_session("a weight update was abandoned half-way")
                self._finish_update()

    def stuck_update(self) -> bool:
        """An update has been open past sync.timeout_s: its worker is stuck (the watchdog in `_rpc` is
        about to end the server), or its trainer died between calls."""
        return self.updating and time.monotonic() - self.update_started > self.config.sync.timeout_s

    def _finish_update(self) -> None:
        """The update is over: a paused generation goes on, with the new weights; with torn weights its
        requests are aborted instead (the generate answers 503), so nothing is sampled from them."""
        try:
            if self.paused and not self.fatal:
                if self.torn:
                    self._pause("abort")
                self._pause(None)
        finally:
            self.paused = False
            with self.state:
                self.updating = False
                self.state.notify_all()

    def shutdown(self) -> None:
        engine_core = getattr(self.llm.llm_engine, "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        if self.adapter_root is not None:
            shutil.rmtree(self.adapter_root, ignore_errors=True)


# vLLM's `max_lora_rank` takes these values only (vllm/config/lora.py MaxLoRARanks)
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def adapter_serving(config: Config, device: str, dtype: str) -> tuple[int, str]:
    """(vLLM's max_lora_rank, "") when this engine should serve LoRA adapters (model.lora_sync auto or
    adapter with model.lora_rank > 0), else (0, why not). vLLM-CPU serves them (its torch kernels, exact in
    fp32); on GPU its Triton kernels take 16-bit models only; the architecture must implement vLLM's
    SupportsLoRA (Llama, Qwen2, Mistral... do). model.lora_sync=adapter where it cannot is a ConfigError."""
    m = config.model
    if not m.lora_rank or m.lora_sync == "merged":
        return 0, "model.lora_sync=merged" if m.lora_rank else "model.lora_rank=0"
    why = ""
    if m.lora_rank > LORA_RANKS[-1]:
        why = f"model.lora_rank={m.lora_rank} is above vLLM's largest max_lora_rank {LORA_RANKS[-1]}"
    elif device == "cuda" and dtype == "float32":
        why = "vLLM's GPU LoRA kernels take bfloat16/float16 models only"
    elif not lora_architecture(m.path, m.trust_remote_code):
        why = "vLLM has no LoRA support for this model's architecture"
    if why and m.lora_sync == "adapter":
        raise ConfigError(f"model.lora_sync=adapter: {why}; use auto or merged")
    return (0, why) if why else (next(r for r in LORA_RANKS if r >= m.lora_rank), "")


def lora_architecture(path: str, trust_remote_code: bool) -> bool:
    """Whether vLLM's implementation of the model's architecture takes LoRA adapters (SupportsLoRA)."""
    from transformers import AutoConfig
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    try:
        architectures = (
            AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code).architectures or []
        )
        return any(
            supports_lora(ModelRegistry._try_load_model_cls(a))
            for a in architectures
            if ModelRegistry._try_load_model_cls(a) is not None
        )
    except Exception:  # noqa: BLE001 - an unknown architecture, or vLLM's private registry changed: merged pushes
        log.exception("cannot tell whether vLLM serves LoRA adapters for %s", path)
        return False


def adapter_header(body: bytes, max_rank: int) -> tuple[int, str]:
    """The `version` and `adapter_config` (JSON text) in an adapter upload's safetensors metadata; a body
    that is not one, or an adapter above the engine's max_lora_rank, is a 400 naming what is wrong."""
    import json

    try:
        size = int.from_bytes(body[:8], "little")
        if not 0 < size <= len(body) - 8:
            raise ValueError("no safetensors header")
        meta = json.loads(body[8 : 8 + size]).get("__metadata__") or {}
        version, config = int(meta["version"]), meta["adapter_config"]
        rank = json.loads(config)["r"]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise HTTPException(
            400,
            f"adapter: expected a safetensors file whose metadata holds version and "
            f"adapter_config (PEFT's JSON): {type(e).__name__}: {e}",
        ) from None
    if not 0 <= version <= SEED_MAX:
        raise HTTPException(400, f"adapter: version must be in 0..2**63-1, got {version}")
    if not isinstance(rank, int) or not 0 < rank <= max_rank:
        raise HTTPException(
            400, f"adapter: rank {rank!r} is not in 1..{max_rank} (this engine's max_lora_rank)"
        )
    return version, config


class BodyLimit:
    """Request bodies up to `max_bytes`, counted as they arrive: a larger Content-Length is a 413 before
    anything is read, and a body without one (chunked) is a 413 once its bytes pass the limit (the
    endpoint reading it gets the 413 instead of the body). A pure ASGI middleware: it sees every chunk."""

    def __init__(self, app, max_bytes: int, detail: str):
        self.app, self.max_bytes, self.detail = app, max_bytes, detail

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await JSONResponse({"detail": self.detail}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self.detail)  # FastAPI's body reading lets it through
            return message

        await self.app(scope, counted, send)


def build_app(server: GenerationServer, token: str) -> FastAPI:
    """The HTTP routes around `server`; every request needs `token` (never empty: `main` makes one)."""
    if not token:
        raise ValueError("the server needs a token")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        # Here, not after uvicorn returns: uvicorn re-raises SIGTERM once it has drained requests,
        # which would end this process before it could stop the engine-core and worker processes.
        server.shutdown()
        log.info("server stopped")

    app = FastAPI(title="grpo-pipeline generation server", version="1", lifespan=lifespan)
    max_body = server.config.server.max_request_mb * 2**20

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        # One line naming the fields. Never echo the input: it may be NaN or huge, and the default
        # handler's attempt to render NaN back as JSON was itself a 500.
        parts = []
        for error in exc.errors()[:5]:
            where = ".".join(str(x) for x in error.get("loc", ())[1:]) or "body"
            parts.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    app.add_middleware(
        BodyLimit,
        max_bytes=max_body,
        detail=f"request body over server.max_request_mb={server.config.server.max_request_mb}",
    )

    @app.middleware("http")
    async def require_token(request: Request, call_next):
        if request.url.path == "/health" and CHALLENGE in request.query_params:
            # The client's check of the server before it sends the token (pipeline/generation/client.py):
            # the proof only, to anyone; it says nothing else and changes nothing.
            nonce = request.query_params[CHALLENGE]
            if not NONCE.fullmatch(nonce):
                return JSONResponse({"detail": "challenge: expected 16-128 hex digits"}, status_code=400)
            return JSONResponse({"proof": proof(token, nonce)})
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"detail": "missing or wrong token"}, status_code=401)
        return await call_next(request)

    @app.get("/health")
    def health():
        if not server.fatal and server.engine_dead():
            server._die("the engine-core process died")
        if server.fatal:
            return JSONResponse({"status": "exiting", "detail": server.fatal, "version": server.version}, 503)
        if server.stuck_update():
            return JSONResponse(
                {
                    "status": "stuck",
                    "detail": f"a weight update has been open past "
                    f"sync.timeout_s={server.config.sync.timeout_s:.0f}s",
                    "version": server.version,
                },
                503,
            )
        return {
            "status": "ok",
            "version": server.version,
            "updating": server.updating,
            "running": server.running,  # engine calls (generate, score) under way or waiting for the engine
            "engine": server.engine_index,
            "instance": server.instance,
            "torn": bool(server.torn),
        }

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
        return {"reset": bool(server.call(server.llm.reset_prefix_cache, "reset_prefix_cache"))}

    @app.post("/weights/init")
    def weights_init(req: SyncInitRequest):
        return server.init_sync(req)

    @app.post("/weights/start")
    def weights_start(req: VersionRequest):
        return server.start_update(req)

    @app.post("/weights/update")
    def weights_update(req: UpdateRequest):
        return server.update(req)

    @app.post("/weights/abort")
    def weights_abort():
        return server.abort_update()

    @app.post("/weights/finish")
    def weights_finish(req: VersionRequest):
        return server.finish_update(req)

    @app.post("/weights/adapter")
    async def weights_adapter(request: Request):
        body = await request.body()  # the safetensors file as is (raw bytes, not JSON)
        return await run_in_threadpool(server.load_adapter, body)

    @app.post("/weights/checksums")
    def weights_checksums(req: ChecksumRequest):
        return server.checksums(req)

    return app


def setup_logging(run_dir: str | None, engine_index: int = 0) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if run_dir:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / log_name(engine_index)))
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
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.generation.serve", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", help="YAML config (the same file as training)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set server.port=8711",
    )
    parser.add_argument("--model", help="shortcut for --set model.path=...")
    parser.add_argument("--host", help="shortcut for --set server.host=...")
    parser.add_argument("--port", type=int, help="shortcut for --set server.port=...")
    parser.add_argument("--run-dir", help="also write server.log here")
    parser.add_argument(
        "--listen-fd",
        type=int,
        help="serve on this inherited listening socket instead of binding server.host:server.port (the "
        "launcher binds it and keeps it across restarts, so no other process can take the port)",
    )
    parser.add_argument(
        "--token-file",
        help=f"with no token set ({TOKEN_ENV}, server.token): write the one this server makes here (0600; "
        "default: <run-dir>/server.token, else ~/.cache/grpo-pipeline/server-PORT.token)",
    )
    parser.add_argument(
        "--engine-index",
        type=int,
        default=0,
        help="which of the run's server.data_parallel_size engines this is (0-based; the launcher "
        "sets it with --port = server.port + index)",
    )
    parser.add_argument(
        "--gpus",
        metavar="N[,N...]",
        help="the engine's GPUs (server.tensor_parallel_size of them), as positions in the GPUs this "
        "process was given: in CUDA_VISIBLE_DEVICES where it is set (under Slurm the step's GPUs, "
        "which its gres/gpu plugin sets in every task, over srun --export), else the host's GPUs "
        "in PCI bus order; sets CUDA_VISIBLE_DEVICES to the chosen ones before anything reads it",
    )
    return parser.parse_args(argv)


def set_engine_process_env(environ=os.environ) -> None:
    """Before anything touches CUDA. vLLM forks its engine and worker processes by default on GPU
    (vllm/envs.py) and forces spawn only once CUDA is *initialised* (`_maybe_force_spawn`), but
    `torch.cuda.is_available()` already makes a forked child fail with "Cannot re-initialize CUDA
    in forked subprocess". Spawn, as TRL's vllm_serve sets it; the CPU platform uses spawn anyway.
    The NVML-based availability check keeps even that probe from poisoning a fork."""
    environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def set_engine_gpus(spec: str, environ=os.environ) -> list[str]:
    """`--gpus`: positions in the GPUs the process was given (CUDA_VISIBLE_DEVICES where set: Slurm's
    list for the step, renumbered from 0 under ConstrainDevices, physical indices otherwise; else the
    host's, physical) become its CUDA_VISIBLE_DEVICES, in PCI bus order as the launch plan's ids and
    Slurm's (nvidia-smi's numbering). Before anything reads it. ValueError: the message after `--gpus SPEC: `."""
    try:
        positions = [int(p) for p in spec.split(",")]
    except ValueError:
        raise ValueError("expected GPU positions separated by commas, e.g. 0 or 2,3") from None
    if min(positions) < 0 or len(set(positions)) != len(positions):
        raise ValueError("expected distinct GPU positions >= 0")
    given = environ.get("CUDA_VISIBLE_DEVICES")
    if given is None:
        chosen = [str(p) for p in positions]
    else:
        visible = [d.strip() for d in given.split(",") if d.strip()]
        if max(positions) >= len(visible):
            raise ValueError(f"this process was given {len(visible)} GPU(s) (CUDA_VISIBLE_DEVICES={given})")
        chosen = [visible[p] for p in positions]
    environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    environ["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return chosen


def inherited_socket(fd: int) -> socket.socket:
    """`--listen-fd`: the listening TCP socket the launcher bound and keeps (across restarts); not
    passed on to any process this one starts."""
    sock = socket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        sock.detach()
        raise ValueError("not a listening TCP socket")
    sock.set_inheritable(False)
    return sock


def default_token_file(run_dir: str | None, port: int) -> Path:
    """Where a server started without a token writes the one it made: the run directory, else the
    user's cache (~/.cache/grpo-pipeline/server-PORT.token)."""
    if run_dir:
        return Path(run_dir) / "server.token"
    return (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        / "grpo-pipeline"
        / f"server-{port}.token"
    )


def write_secret(path: Path, text: str) -> None:
    """`text` in `path`, readable by this user only (0600; its directory made 0700 when new)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text + "\n")


def main(argv=None) -> int:
    set_engine_process_env()
    args = parse_args(argv)
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus: list[str] = []
    if args.gpus is not None:
        try:
            gpus = set_engine_gpus(args.gpus)
        except ValueError as e:
            print(f"error: --gpus {args.gpus}: {e}", file=sys.stderr)
            return 2
    import uvicorn

    overrides = list(args.set)
    for key, value in (("model.path", args.model), ("server.host", args.host), ("server.port", args.port)):
        if value is not None:
            overrides.append(f"{key}={value}")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    token = server_token(config.server.token)
    if not config.model.path:
        print("error: model.path: no model given (set it in the config or pass --model)", file=sys.stderr)
        return 2
    if not is_loopback(config.server.host) and not token:
        print(
            f"error: server.host={config.server.host} is not loopback; refusing to start without a token "
            f"(set {TOKEN_ENV} or server.token)",
            file=sys.stderr,
        )
        return 2
    tls = {}
    if config.server.tls_cert:
        import ssl

        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                config.server.tls_cert, config.server.tls_key
            )
        except (OSError, ssl.SSLError) as e:
            print(f"error: server.tls_cert/server.tls_key: cannot load them: {e}", file=sys.stderr)
            return 2
        tls = {"ssl_certfile": config.server.tls_cert, "ssl_keyfile": config.server.tls_key}
    if not 0 <= args.engine_index < config.server.data_parallel_size:
        print(
            f"error: --engine-index {args.engine_index}: expected 0..{config.server.data_parallel_size - 1} "
            f"(server.data_parallel_size={config.server.data_parallel_size})",
            file=sys.stderr,
        )
        return 2
    if gpus and len(gpus) != config.server.tensor_parallel_size:
        print(
            f"error: --gpus {args.gpus}: {len(gpus)} GPU(s) for server.tensor_parallel_size="
            f"{config.server.tensor_parallel_size}",
            file=sys.stderr,
        )
        return 2
    if args.listen_fd is not None:
        try:
            listening = inherited_socket(args.listen_fd)
        except (OSError, ValueError) as e:
            print(f"error: --listen-fd {args.listen_fd}: {e}", file=sys.stderr)
            return 2
        if not token and not is_loopback(listening.getsockname()[0]):
            print(
                f"error: --listen-fd {args.listen_fd} is bound to {listening.getsockname()[0]}, not loopback; "
                f"refusing to start without a token (set {TOKEN_ENV} or server.token)",
                file=sys.stderr,
            )
            return 2
    else:
        try:
            listening = bind(config.server.host, config.server.port)
        except OSError as e:
            print(
                f"error: server.port={config.server.port} on {config.server.host}: {e.strerror or e}",
                file=sys.stderr,
            )
            return 2
    if not token:  # on loopback (off it, refused above): a token of its own, in a 0600 file
        token = secrets.token_hex(16)
        path = Path(args.token_file or default_token_file(args.run_dir, listening.getsockname()[1]))
        try:
            write_secret(path, token)
        except OSError as e:
            print(f"error: --token-file {path}: cannot write it: {e.strerror or e}", file=sys.stderr)
            return 2
        print(
            f"no server token set ({TOKEN_ENV}, server.token): this server's is in {path} (0600); "
            f"clients: {TOKEN_ENV}=$(cat {path})",
            file=sys.stderr,
            flush=True,
        )
    setup_logging(args.run_dir, args.engine_index)
    log.info(
        "engine %d: CUDA_VISIBLE_DEVICES=%s%s",
        args.engine_index,
        os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
        f" (--gpus {args.gpus} of {'CUDA_VISIBLE_DEVICES=' + given if given is not None else 'the host'})"
        if args.gpus is not None
        else "",
    )
    start = time.perf_counter()
    try:
        server = GenerationServer(config, args.engine_index)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info(
        "engine ready in %.1fs: %s (%s, %s)",
        time.perf_counter() - start,
        config.model.path,
        server.dtype,
        server.device,
    )
    app = build_app(server, token)
    uv = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.server.host,
            port=config.server.port,
            log_level="warning",
            timeout_graceful_shutdown=5,
            **tls,
        )
    )
    uv.run(
        sockets=[listening]
    )  # on SIGINT/SIGTERM: drains requests, runs the lifespan exit (engine shutdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
