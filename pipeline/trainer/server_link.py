"""The trainer's link to the generation server, as every rank sees it: weight sync (pipeline/sync,
vLLM's weight-transfer API) plus what the training loop adds to it: recovery from a lost server, and
a probe that the server serves exactly the trainer's weights. Rank 0 alone holds the HTTP client; the
other ranks take part in the collectives (ZeRO-3 gathers, the restart decision)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from pipeline.config import Config
from pipeline.device import probe_tolerance
from pipeline.generation.client import ServerClient
from pipeline.sync.weight_sync import WeightSync, WeightSyncError
from pipeline.trainer.grpo import token_logprobs

log = logging.getLogger(__name__)


class ServerLink(WeightSync):
    def __init__(self, model_engine, zero_stage: int, rank: int, config: Config, client: ServerClient | None,
                 sync_host: str, dtype: torch.dtype):
        s = config.sync
        super().__init__(model_engine.module, zero_stage, rank, model_engine.device, client, host=sync_host,
                         port=s.port, timeout_s=s.timeout_s, bucket_bytes=s.bucket_mb * 2**20,
                         verify_bytes=s.verify_mb * 2**20)
        self.model_engine, self.config, self.dtype = model_engine, config, dtype
        self.restarts = 0

    def push(self, version: int) -> None:
        """The server serves weights `version` (verified by checksums), or the run fails / recovers."""
        try:
            super().push(version)
        except WeightSyncError as e:
            self.recover(e, version)

    def recover(self, error: Exception, version: int) -> None:
        """After a lost server: with server.restart, wait for the launcher's new server, form a new
        transfer group with it and give it the trainer's weights (`version`); else fail with `error`."""
        server = self.config.server
        if not server.restart or self.restarts >= server.max_restarts:
            raise error
        fresh = [False]
        if self.rank == 0:
            log.warning("server lost (%s); waiting up to %.0fs for a restarted server", error, server.startup_timeout_s)
            # A server whose update was torn or is stuck exits (the launcher restarts it): wait for one
            # with no update open rather than re-initialise a wedged one.
            fresh = [self.http.wait_healthy(server.startup_timeout_s + self.config.sync.timeout_s, idle=True)["version"]
                     != version]
        dist.broadcast_object_list(fresh, src=0)
        if fresh[0]:  # a new process: the old group's peers are gone
            self.restarts += 1
            if self.rank == 0:
                log.warning("server restart %d of at most %d: pushing weights version %d", self.restarts,
                            server.max_restarts, version)
        self.connect()
        super().push(version)

    def probe(self, prompt_ids: list[int], token_ids: list[int], step: int) -> float:
        """Max |served - trainer| logprob over one sequence (rank 0's number; 0 elsewhere). The
        checksums are the proof of a push; this is a second signal, with a dtype-aware tolerance."""
        self.model_engine.eval()
        with torch.no_grad():
            ids = torch.tensor([prompt_ids + token_ids], device=self.model_engine.device)
            mine = token_logprobs(self.model_engine, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1:]
        if self.rank != 0:
            return 0.0
        served = torch.tensor(self.http.score([(prompt_ids, token_ids)])["logprobs"][0])
        diff = float((served - mine.float().cpu()).abs().max())
        if diff > probe_tolerance(self.dtype):
            log.warning("step %d: served logprobs differ from the trainer's by %.2e (tolerance %.0e for %s)",
                        step, diff, probe_tolerance(self.dtype), self.dtype)
        return diff
