"""The trainer's link to the generation server, as every rank sees it: connect and push weights
(vLLM's weight-transfer API, `weight_sync.WeightSync`), recover from a lost server, and probe that the
server serves exactly the trainer's weights. Rank 0 alone holds the HTTP client; the other ranks take
part in the collectives (ZeRO-3 gathers, the restart decision)."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from pipeline.client import ServerClient
from pipeline.config import Config
from pipeline.device import probe_tolerance
from pipeline.grpo import token_logprobs
from pipeline.weight_sync import WeightSync, WeightSyncError

log = logging.getLogger(__name__)


class ServerLink:
    def __init__(self, engine, zero_stage: int, rank: int, config: Config, client: ServerClient | None,
                 sync_host: str, dtype: torch.dtype):
        self.engine, self.rank, self.config, self.client, self.dtype = engine, rank, config, client, dtype
        s = config.sync
        self.sync = WeightSync(engine.module, zero_stage, rank, engine.device, client, host=sync_host, port=s.port,
                               timeout_s=s.timeout_s, bucket_bytes=s.bucket_mb * 2**20,
                               verify_bytes=s.verify_mb * 2**20)
        self.restarts = 0

    def connect(self) -> None:
        self.sync.connect()

    def push(self, version: int) -> None:
        """The server serves weights `version` (verified by checksums), or the run fails / recovers."""
        try:
            self.sync.push(version)
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
            fresh = [self.client.wait_healthy(server.startup_timeout_s)["version"] != version]
        dist.broadcast_object_list(fresh, src=0)
        if fresh[0]:  # a new process: the old group's peers are gone
            self.restarts += 1
            if self.rank == 0:
                log.warning("server restart %d of at most %d: pushing weights version %d", self.restarts,
                            server.max_restarts, version)
        self.sync.connect()
        self.sync.push(version)

    def probe(self, prompt_ids: list[int], token_ids: list[int], step: int) -> float:
        """Max |served - trainer| logprob over one sequence (rank 0's number; 0 elsewhere). The
        checksums are the proof of a push; this is a second signal, with a dtype-aware tolerance."""
        self.engine.eval()
        with torch.no_grad():
            ids = torch.tensor([prompt_ids + token_ids], device=self.engine.device)
            mine = token_logprobs(self.engine, ids, torch.ones_like(ids))[0, len(prompt_ids) - 1:]
        if self.rank != 0:
            return 0.0
        served = torch.tensor(self.client.score([(prompt_ids, token_ids)])["logprobs"][0])
        diff = float((served - mine.float().cpu()).abs().max())
        if diff > probe_tolerance(self.dtype):
            log.warning("step %d: served logprobs differ from the trainer's by %.2e (tolerance %.0e for %s)",
                        step, diff, probe_tolerance(self.dtype), self.dtype)
        return diff

    @property
    def last_stats(self) -> dict:
        return self.sync.last_stats

    def close(self) -> None:
        self.sync.close()
