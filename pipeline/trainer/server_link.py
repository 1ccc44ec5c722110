"""The trainer's link to the generation engines, as every rank sees it: weight sync (pipeline/sync,
vLLM's weight-transfer API) plus what the training loop adds to it: engines that come back join the
transfer group again, recovery from a lost engine, and a probe that the engines serve exactly the
trainer's weights. Rank 0 alone holds the HTTP clients; the other ranks take part in the collectives
(ZeRO-3 gathers, the regroup and restart decisions)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.device import probe_tolerance
from pipeline.generation.engines import Engines, restarts_possible
from pipeline.sync.weight_sync import WeightSync, WeightSyncError
from pipeline.trainer.grpo import token_logprobs

log = logging.getLogger(__name__)


class ServerLink(WeightSync):
    def __init__(
        self,
        model_engine,
        zero_stage: int,
        rank: int,
        config: Config,
        client: Engines | None,
        sync_host: str,
        dtype: torch.dtype,
    ):
        s = config.sync
        super().__init__(
            model_engine.module,
            zero_stage,
            rank,
            model_engine.device,
            client,
            host=sync_host,
            port=s.port,
            timeout_s=s.timeout_s,
            bucket_bytes=s.bucket_mb * 2**20,
            verify_bytes=s.verify_mb * 2**20,
            shared_memory=s.shared_memory,
            lora_sync=config.model.lora_sync,
        )
        self.model_engine, self.config, self.dtype = model_engine, config, dtype
        self._pending_probe = None  # `probe(later=True)`'s: (score future, mine, base, version)
        self._probe_pool = None

    @property
    def restarts(self) -> dict[int, int]:
        """Restarts seen per engine (new processes at its address), rank 0's count."""
        return {e.index: e.restarts for e in self.engines.engines} if self.engines else {}

    def push(self, version: int) -> None:
        """The engines serve weights `version` (verified by checksums), or the run fails / recovers.
        An engine back from a restart (or a lost one) changes the group: it is formed again first, so a
        returning engine gets this full push before it gets prompts."""
        try:
            if self._group_changed():
                self.connect()
            super().push(version)
        except WeightSyncError as e:
            self.recover(e, version)

    def _group_changed(self) -> bool:
        changed = [False]
        if self.rank == 0:
            ready = self.engines.healthy(idle=True)
            now = {(e.index, h.get("instance", "")) for e, h in ready}
            was = {(e.index, i) for e, i in zip(self.group, self.group_instances, strict=True)}
            # none healthy: no group to form; the push fails and `recover` decides (wait, or the error)
            changed = [bool(now) and now != was]
            if changed[0]:
                log.warning(
                    "engines changed: group was %s, now %s",
                    sorted(i for i, _ in was),
                    sorted(i for i, _ in now),
                )
        return bool(_broadcast(changed))

    def recover(self, error: Exception, version: int) -> None:
        """After a lost engine: form a new transfer group with the engines that are healthy and idle
        and give them the trainer's weights (`version`). With server.restart, wait (up to the startup
        deadline) for at least one, since the launcher is bringing engines back; without it, go on
        with those left. Fail with `error` when none is left (the launcher gives up on an engine after
        server.max_restarts restarts of it)."""
        ok = [True]
        if self.rank == 0:
            log.warning("engine(s) lost (%s); forming the transfer group again", error)
            # The engines whose update broke off are torn but alive: the push below repairs them. A stuck
            # one exits (the launcher restarts it); only engines with no update open are used.
            ok = [self._wait_for_an_engine()]
        if (ok := _broadcast(ok)) is not True:
            raise WeightSyncError(f"{error}; {ok}") from None
        self.connect()
        super().push(version)

    def _wait_for_an_engine(self) -> bool | str:
        """Rank 0: True once an engine is healthy and idle; else why not. Waits (with server.restart)
        only while some engine may still come back: one that has used its server.max_restarts will not."""
        server = self.config.server
        wait_s = server.startup_timeout_s + self.config.sync.timeout_s if server.restart else 0.0
        end = time.monotonic() + wait_s
        while True:
            if self.engines.healthy(idle=True):
                return True
            if not server.restart:
                return "no generation engine left (server.restart is off)"
            if not restarts_possible():
                return "no generation engine left (the launcher that restarts them is gone, or does not own them)"
            if all(e.restarts >= server.max_restarts for e in self.engines.engines):
                return f"no generation engine left: each has used its server.max_restarts={server.max_restarts} restarts"
            if time.monotonic() >= end:
                return f"no generation engine healthy within {wait_s:.0f}s"
            time.sleep(0.5)

    def probe(
        self, prompt_ids: list[int], token_ids: list[int], step: int, later: bool = False
    ) -> dict[str, float]:
        """The engines' logprobs of one sequence against the trainer's (rank 0's numbers; {} elsewhere):
        the largest gap (`sync/logprob_max_abs_diff`, with a dtype-aware tolerance) and, with LoRA, how
        much of the adapter's effect the served logprobs show (`sync/adapter_effect`, see
        `adapter_effect`: merged bf16 weights lose most of a small update, which the gap alone, within
        bf16's kernel noise, cannot show). The checksums are the proof of a push; this is a second signal.
        `later` (train.max_staleness >= 2): the engines are generating, and a score request would wait
        for that generation; it is sent in the background and compared at a later step, if the engine
        still served version `step` when it scored (`sync/probed` says whether this row holds one)."""
        module = self.model_engine.module
        self.model_engine.eval()
        with torch.no_grad():
            ids = torch.tensor([prompt_ids + token_ids], device=self.model_engine.device)
            mine = (
                token_logprobs(self.model_engine, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1 :]
                .float()
                .cpu()
            )
            base = None
            if hasattr(module, "peft_config"):
                with module.disable_adapter():
                    base = token_logprobs(self.model_engine, ids, torch.ones_like(ids))[
                        0, len(prompt_ids) - 1 :
                    ]
                base = base.float().cpu()
        if self.rank != 0:
            return {}
        if not later:
            return self._compare(self.engines.score([(prompt_ids, token_ids)]), mine, base, step)
        row = {"sync/probed": 0.0}
        pending = self._pending_probe
        if pending is not None and not pending[0].done():
            return row  # the last one still waits for its engine: no second one queued behind it
        if pending is not None and pending[0].exception() is None:
            scored = pending[0].result()
            if scored["version"] == pending[3]:
                row = {**self._compare(scored, *pending[1:]), "sync/probed": 1.0}
        if self._probe_pool is None:
            self._probe_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        future = self._probe_pool.submit(self.engines.score, [(prompt_ids, token_ids)])
        self._pending_probe = (future, mine, base, step)
        return row

    def _compare(self, scored: dict, mine: torch.Tensor, base, step: int) -> dict[str, float]:
        served = torch.tensor(scored["logprobs"][0])
        diff = float((served - mine).abs().max())
        if diff > probe_tolerance(self.dtype):
            log.warning(
                "step %d: served logprobs differ from the trainer's by %.2e (tolerance %.0e for %s)",
                step,
                diff,
                probe_tolerance(self.dtype),
                self.dtype,
            )
        row = {"sync/logprob_max_abs_diff": diff}
        if base is not None:
            effect, shift = adapter_effect(served, mine, base)
            row.update({"sync/adapter_effect": effect, "sync/adapter_shift_rms": shift})
            if shift > 2 * NOISE_RMS[self.dtype == torch.float32] and effect < 0.5:
                log.warning(
                    "step %d: the engines serve %.0f%% of the adapter's effect on the probe's logprobs "
                    "(a merged 16-bit push rounds small updates away: model.lora_sync=adapter)",
                    step,
                    100 * effect,
                )
        return row


# The RMS of per-token logprob differences between two kernels on the same weights, below which the
# adapter's effect is not told apart from it: fp32 (True) agrees to ~1e-6, 16-bit kernels to ~1e-2.
NOISE_RMS = {True: 1e-5, False: 1e-2}


def adapter_effect(
    served: torch.Tensor, adapter_on: torch.Tensor, adapter_off: torch.Tensor
) -> tuple[float, float]:
    """How much of the adapter's effect the served logprobs show: the least-squares coefficient of
    (served - off) along (on - off), 1 = all of it, 0 = the base model's; kernel noise averages out
    instead of adding up as it does in a max. And the RMS of on - off, the effect itself."""
    shift = adapter_on - adapter_off
    energy = float((shift * shift).sum())
    effect = float(((served - adapter_off) * shift).sum()) / energy if energy > 0 else 1.0
    return effect, float(shift.pow(2).mean().sqrt())


def _broadcast(value: list):
    """Rank 0's value[0] on every rank."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(value, src=0)
    return value[0]
