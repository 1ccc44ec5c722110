"""The trainer's view of its generation engines (`server.data_parallel_size`): one client per engine
server, a step's prompts spread over them, and an engine that fails left out instead of ending the run.

`Engines` answers `generate`, `score`, `model_info` and `health` like one server's `ServerClient`, so
rollouts, evaluation and the probe do not care how many engines there are. What it adds:

- **Load balancing.** A request's prompts are cut into contiguous runs of whole groups (all `n`
  completions of a prompt on one engine: they share its prefix cache), one run per engine, sized by
  each engine's measured speed (completions per second, a moving average) so that they finish together.
  With fewer prompts than engines, each prompt's group is split instead (else engines would idle).
  Prompt i is sampled with seed `seed + i` whichever engine gets it, as one server would.
- **Membership.** `members` are the engines that hold the trainer's current weights: those in the
  transfer group of the last successful push, each known by its process `instance` (a restarted
  engine has a new one and version 0, and is not a member until a push has given it the weights).
  Only members generate. Before the first push every healthy engine serves (the weights on disk).
- **An engine that fails alone.** A member whose request fails (connection lost, HTTP error, deadline),
  or that answers as another process instance, leaves `members`; its share is re-sent to the others.
  Only when no member is left does `generate` raise `ServerError`, for the trainer's recovery.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipeline.generation.client import ServerClient, ServerError

log = logging.getLogger("pipeline.generation.engines")

SPEED_MEMORY = 0.5  # weight of the newest measurement in an engine's speed (completions per second)
# The launcher that started the engines (and restarts them, server.restart): its pid, set in the ranks'
# environment only when it owns them. A rank waits for a restarted engine only while that process lives.
LAUNCHER_PID_ENV = "GRPO_LAUNCHER_PID"


def restarts_possible() -> bool:
    """Whether an engine may still come back: the launcher that owns the engines is alive (an engine run
    elsewhere, --server-url or SLURM, is nobody's to restart)."""
    import os

    pid = os.environ.get(LAUNCHER_PID_ENV)
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:  # alive, another user's (never ours: it started us)
        return True
    return True


HEALTH_TIMEOUT_S = 5.0
SPLIT_SEED_STRIDE = 2**32  # part j of a split group samples with seed + i + j * stride (distinct streams)


@dataclass
class Engine:
    index: int
    client: ServerClient
    instance: str = ""  # the process that holds the trainer's weights (set by a push); "" = none yet
    tensor_parallel_size: int = 1
    speed: float = 0.0  # completions per second, measured; 0 = not yet
    last_seen: str = ""  # the instance that last answered at this address
    instances_seen: int = 0  # processes seen at this address; restarts = instances_seen - 1

    @property
    def restarts(self) -> int:
        return max(0, self.instances_seen - 1)


@dataclass
class Piece:
    """Part of a request: prompts [start, stop) with `n` completions each, on one engine."""

    start: int
    stop: int
    n: int
    seed: int | None


class Engines:
    def __init__(
        self,
        urls: list[str] | str,
        token: str = "",
        timeout_s: float = 600.0,
        clients: list[ServerClient] | None = None,
        ca_file: str = "",
    ):
        """`urls`: engine i's base URL at position i (a list, or comma-separated as on the command line);
        or `clients`, existing ones (see `of`). `ca_file`: what https:// engines are verified against."""
        if clients is None:
            urls = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
            clients = [ServerClient(url, token, timeout_s, ca_file) for url in urls]
        if not clients:
            raise ValueError("no generation engine URL given")
        self.engines = [Engine(i, client) for i, client in enumerate(clients)]
        self.members: list[Engine] | None = None  # None: no push yet, every healthy engine serves
        self.version = 0  # the weights version the members hold
        self.pool = ThreadPoolExecutor(max_workers=max(2, len(clients)), thread_name_prefix="engines")

    @classmethod
    def of(cls, clients: list[ServerClient]) -> Engines:
        """Engines around existing clients (their tokens and deadlines)."""
        return cls([], clients=clients)

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def base_url(self) -> str:
        return ",".join(e.client.base_url for e in self.engines)

    # --- health and membership ---------------------------------------------------------------------

    def _note_instance(self, engine: Engine, instance: str) -> None:
        if instance and engine.last_seen != instance:
            if engine.last_seen:
                log.warning("engine %d is a new process (restart %d)", engine.index, engine.instances_seen)
            engine.last_seen = instance
            engine.instances_seen += 1
            engine.speed = 0.0  # a new process: measured afresh

    def healthy(self, idle: bool = True) -> list[tuple[Engine, dict]]:
        """The engines answering /health ok now (with `idle`, also with no weight update open), asked in
        parallel with a short deadline: a dead or wedged engine costs seconds, not the run."""

        def ask(engine: Engine):
            try:
                health = engine.client.health(HEALTH_TIMEOUT_S)
            except ServerError:
                return None
            self._note_instance(engine, health.get("instance", ""))
            return None if idle and health.get("updating") else health

        answers = list(self.pool.map(ask, self.engines))
        return [(e, h) for e, h in zip(self.engines, answers, strict=True) if h is not None]

    def wait_healthy(self, deadline_s: float, alive=lambda: True, idle: bool = False) -> dict:
        """Until at least one engine is healthy (and idle); its /health answer."""
        end = time.monotonic() + deadline_s
        while True:
            ready = self.healthy(idle)
            if ready:
                return ready[0][1]
            if time.monotonic() >= end or not alive():
                raise ServerError(f"no generation engine healthy after {deadline_s:.0f}s ({self.base_url})")
            time.sleep(0.5)

    def health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict:
        ready = self.healthy(idle=False)
        if not ready:
            raise ServerError(f"no generation engine answers ({self.base_url})")
        return ready[0][1]

    def set_members(self, group: list[Engine], version: int) -> None:
        """After a verified push of `version` into `group`: they, and only they, generate."""
        self.members, self.version = list(group), version

    def keep_newest(self) -> int:
        """Outside the trainer (the launcher's evaluation after training): the members are the healthy
        engines at the newest weights version (one restarted and never pushed to has version 0)."""
        ready = self.healthy(idle=False)
        newest = max((h["version"] for _, h in ready), default=0)
        self.set_members([e for e, h in ready if h["version"] == newest], newest)
        return newest

    def drop(self, engine: Engine, why: str) -> None:
        if self.members is not None and engine in self.members:
            self.members.remove(engine)
            log.warning(
                "engine %d left out: %s (%d engine(s) generating)", engine.index, why, len(self.members)
            )

    def serving(self) -> list[Engine]:
        if self.members is not None:
            return list(self.members)
        return [e for e, _ in self.healthy(idle=False)]

    def first(self) -> Engine:
        serving = self.serving()
        if not serving:
            raise ServerError(f"no generation engine left ({self.base_url})")
        return serving[0]

    # --- one-engine calls --------------------------------------------------------------------------------

    def model_info(self) -> dict:
        return self.first().client.model_info()

    def score(self, sequences: list[tuple[list[int], list[int]]]) -> dict:
        return self.first().client.score(sequences)

    # --- generate -----------------------------------------------------------------------------------

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        *,
        n: int,
        max_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        **extra,
    ) -> dict:
        """One server's /generate answer for all prompts, made by the serving engines together. Every
        completion says which engine and weights version made it ("engine", "version"); "version" is
        the oldest part's; "split" says how many engines took part and their imbalance (the slowest
        engine's time over the mean); "timing" has the slowest engine's engine time."""
        params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, **extra}
        per_prompt: list[list[dict]] = [[] for _ in prompt_token_ids]
        todo = [Piece(0, len(prompt_token_ids), n, seed)]
        versions, seconds, engine_s, phases = [], {}, {}, {}
        last_error, failed = "", set()
        while todo:
            engines = [e for e in self.serving() if e.index not in failed]
            if not engines:  # the last failure first: one server's error reads as before
                raise ServerError(
                    f"{last_error}{'; ' if last_error else ''}no generation engine left to "
                    f"generate with ({self.base_url})"
                )
            assigned = [(e, p) for piece in todo for e, p in self.split(piece, engines)]
            todo = []
            futures = [
                (e, p, self.pool.submit(self._run, e, p, prompt_token_ids, params)) for e, p in assigned
            ]
            for engine, piece, future in futures:
                try:
                    out, took = future.result()
                    if engine.instance and out.get("instance") != engine.instance:
                        raise ServerError(
                            f"answered as a new process (instance {out.get('instance')}), "
                            f"without the trainer's weights"
                        )
                except ServerError as e:
                    if e.status is not None and 400 <= e.status < 500 and e.status != 408:
                        raise  # the request itself is refused: every engine would refuse it
                    last_error = str(e)
                    failed.add(engine.index)
                    self.drop(engine, last_error)
                    todo.append(piece)  # re-sent to the engines left
                    continue
                versions.append(out["version"])
                for i, result in zip(range(piece.start, piece.stop), out["results"], strict=True):
                    per_prompt[i] += [
                        {**c, "engine": engine.index, "version": c.get("versions", [[out["version"]]])[0][0]}
                        for c in result["completions"]
                    ]
                done = (piece.stop - piece.start) * piece.n
                measured = done / max(took, 1e-6)
                engine.speed = (
                    measured
                    if not engine.speed
                    else (SPEED_MEMORY * measured + (1 - SPEED_MEMORY) * engine.speed)
                )
                seconds[engine.index] = seconds.get(engine.index, 0.0) + took
                engine_s[engine.index] = engine_s.get(engine.index, 0.0) + out.get("timing", {}).get(
                    "engine_s", 0.0
                )
                for k, v in out.get("timing", {}).items():
                    if k != "engine_s":
                        phases[k] = max(phases.get(k, 0.0), v)
        mean = sum(seconds.values()) / len(seconds)
        split = {"engines": len(seconds), "imbalance": max(seconds.values()) / mean if mean else 1.0}
        return {
            "version": min(versions),
            "split": split,
            "results": [
                {"prompt_token_ids": ids, "completions": completions}
                for ids, completions in zip(prompt_token_ids, per_prompt, strict=True)
            ],
            "timing": {"engine_s": max(engine_s.values()), **phases},
        }

    def _run(self, engine: Engine, piece: Piece, prompt_token_ids: list[list[int]], params: dict):
        start = time.perf_counter()
        out = engine.client.generate(
            prompt_token_ids[piece.start : piece.stop], n=piece.n, seed=piece.seed, **params
        )
        return out, time.perf_counter() - start

    def split(self, piece: Piece, engines: list[Engine]) -> list[tuple[Engine, Piece]]:
        """`piece` over `engines` by speed: runs of whole groups, or (fewer prompts than engines) each
        group's `n` split. Engines never measured count as the fastest measured one. With at least one
        prompt per engine, each engine gets one and the rest follow speed: an engine once measured slow
        (busy cores, a restart) would otherwise get nothing, never be measured again, and idle for good."""
        known = [e.speed for e in engines if e.speed > 0]
        speeds = [e.speed if e.speed > 0 else (max(known) if known else 1.0) for e in engines]
        prompts = piece.stop - piece.start
        if prompts >= len(engines):
            counts = [1 + c for c in shares(prompts - len(engines), speeds)]
        elif piece.n == 1:
            counts = shares(prompts, speeds)
        if prompts >= len(engines) or piece.n == 1:
            out, start = [], piece.start
            for engine, count in zip(engines, counts, strict=True):
                if count:
                    seed = None if piece.seed is None else piece.seed + (start - piece.start)
                    out.append((engine, Piece(start, start + count, piece.n, seed)))
                    start += count
            return out
        return [
            (
                engine,
                Piece(
                    piece.start,
                    piece.stop,
                    count,
                    None if piece.seed is None else piece.seed + j * SPLIT_SEED_STRIDE,
                ),
            )
            for j, (engine, count) in enumerate(zip(engines, shares(piece.n, speeds), strict=True))
            if count
        ]

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def shares(total: int, speeds: list[float]) -> list[int]:
    """`total` items in proportion to `speeds` (largest remainder), summing to `total`."""
    whole = sum(speeds)
    exact = [total * s / whole for s in speeds]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(speeds)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
