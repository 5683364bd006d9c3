"""PolicyActor (an async Ray actor around one engine), the policy pool, and the client search methods call.

    pool = start_policy_pool(PoolConfig(engine="hf", model="toy:policy", replicas=2))
    client = pool.client()                       # picklable: pass it (or the pool) into Ray tasks
    completions = client.generate([GenerationRequest("2+3=", n=4, stop=("\\n\\n",))])
    client.usage                                 # tokens and FLOPs spent through this client
    pool.stats(); pool.shutdown()

HF replicas merge the calls that reach them within `gather_ms` into one engine batch (MicroBatcher);
vLLM replicas hand every request to vLLM's async engine at once (it batches continuously by itself).
"""
from __future__ import annotations

import importlib.util
import os
import socket
import time
from typing import Any, Sequence

from actors.engines.engine import Completion, GenerationRequest
from actors.engines.vllm import INSTALL_HINT
from actors.pool import ModelPool, PoolClient, PoolConfig, check_model, start_replicas
from app.config import ConfigError

VLLM_MISSING = f"engine: vllm, but vLLM is not installed: {INSTALL_HINT}"


class PolicyActor:
    """One policy model in a Ray actor. Async: concurrent `generate` calls are accepted and batched."""

    def __init__(self, engine: str = "hf", model: str = "toy:policy", dtype: str = "float32", max_batch: int = 64,
                 gather_ms: float = 5.0, engine_kwargs: dict | None = None):
        from actors.batching import MicroBatcher

        kwargs = dict(engine_kwargs or {})
        t0 = time.perf_counter()
        if engine == "hf":
            from actors.engines.hf import HFEngine

            self.engine = HFEngine(model, dtype=dtype, **kwargs)
            self.batcher: MicroBatcher | None = MicroBatcher(self.engine.generate, max_batch=max_batch,
                                                             gather_ms=gather_ms)
        elif engine == "vllm":
            from actors.engines.vllm import VLLMEngine

            self.engine = VLLMEngine(model, dtype=dtype, **kwargs)
            self.batcher = None
        else:
            raise ValueError(f"unknown engine {engine!r}; one of hf, vllm")
        self.start_s = time.perf_counter() - t0
        self.engine_name, self.model = engine, model
        self.calls = self.requests = self.sequences = 0
        self.prompt_tokens = self.generated_tokens = 0
        self.busy_s = 0.0
        self.inflight = self.max_inflight = 0

    def ready(self) -> bool:
        return True

    def info(self) -> dict:
        return dict(engine=self.engine_name, model=self.model, num_parameters=self.engine.num_parameters,
                    pid=os.getpid(), host=socket.gethostname(), start_s=self.start_s)

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        requests = list(requests)
        if not requests:
            return []
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        t0 = time.perf_counter()
        try:
            if self.batcher is not None:
                out = await self.batcher.submit(requests)
            else:
                out = await self.engine.generate(requests)
        finally:
            self.inflight -= 1
        self.busy_s += time.perf_counter() - t0
        self.calls += 1
        self.requests += len(requests)
        for group in out:
            self.sequences += len(group)
            if group:
                self.prompt_tokens += group[0].prompt_tokens
            self.generated_tokens += sum(c.generated_tokens for c in group)
        return out

    def stats(self) -> dict:
        """Calls, requests, sequences and tokens served; for HF the engine batches (sizes in requests)."""
        d: dict[str, Any] = dict(engine=self.engine_name, pid=os.getpid(), calls=self.calls, requests=self.requests,
                                 sequences=self.sequences, prompt_tokens=self.prompt_tokens,
                                 generated_tokens=self.generated_tokens, max_inflight=self.max_inflight,
                                 engine_s=0.0)
        if self.batcher is not None:
            s = self.batcher.stats  # engine_s: HF seconds inside engine.generate (the rest is gathering/queueing)
            d.update(engine_s=s.busy_s, batches=s.batches, largest_batch=s.largest, batch_sizes=list(s.sizes),
                     mean_batch=(s.items / s.batches) if s.batches else 0.0)
        if getattr(self.engine, "prefix_cache", None) is not None:
            d["prefix_cache"] = self.engine.prefix_cache.stats()
        return d

    def reset_stats(self) -> None:
        from actors.batching import BatchStats

        self.calls = self.requests = self.sequences = self.prompt_tokens = self.generated_tokens = 0
        self.max_inflight = 0
        if self.batcher is not None:
            self.batcher.stats = BatchStats()
        if getattr(self.engine, "prefix_cache", None) is not None:
            self.engine.prefix_cache.reset_counters()

    def shutdown(self) -> None:
        close = getattr(self.engine, "close", None)
        if close:
            close()


class PolicyClient(PoolClient):
    """`PolicyHandle` over a policy pool: `generate` blocks (use it in Ray tasks and threads), `agenerate` awaits.
    Every call adds its tokens and FLOPs (2 x parameters x tokens) to `self.usage`."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        requests = list(requests)
        if not requests:
            return []
        out = self.pool.call("generate", requests)
        self.usage.add_generation(out, self.num_parameters)
        return out

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        requests = list(requests)
        if not requests:
            return []
        out = await self.pool.acall("generate", requests)
        self.usage.add_generation(out, self.num_parameters)
        return out


class PolicyPool(ModelPool):
    """Replicas of PolicyActor started from a PoolConfig. Picklable (the actors are shared, not copied)."""

    client_class = PolicyClient


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def validate_policy_config(cfg: PoolConfig) -> None:
    """Checks that need no cluster: one-line ConfigErrors."""
    if cfg.engine == "hf" and cfg.tp != 1:
        raise ConfigError(f"policy: the hf engine runs one device per replica, tp must be 1 (got {cfg.tp}); "
                          "use engine: vllm for tensor parallelism")
    if cfg.engine == "vllm" and not vllm_available():
        raise ConfigError(VLLM_MISSING)
    check_model(cfg.model)


def start_policy_pool(cfg: PoolConfig, name: str = "policy", ready_timeout_s: float = 900.0) -> PolicyPool:
    """Start `cfg.replicas` PolicyActors (Ray must be initialised, else a local cluster is started) and wait
    until each has loaded its model. Bad configs raise ConfigError (one line) before anything starts."""
    validate_policy_config(cfg)
    pool, info = start_replicas(
        PolicyActor, dict(engine=cfg.engine, model=cfg.model, dtype=cfg.dtype, max_batch=cfg.max_batch,
                          gather_ms=cfg.gather_ms), cfg, name, ready_timeout_s)
    return PolicyPool(cfg, pool, info)
