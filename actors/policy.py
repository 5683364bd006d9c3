"""PolicyActor (an async Ray actor around one engine), and the client search methods call.

    pool = start_policy_pool(PoolConfig(engine="hf", model="toy:policy", replicas=2))
    client = pool.client()                       # picklable: pass it (or the pool) into Ray tasks
    completions = client.generate([GenerationRequest("2+3=", n=4, stop=("\\n\\n",))])
    client.usage                                 # tokens and FLOPs spent through this client
    pool.stats(); pool.shutdown()

HF replicas merge the calls that reach them within `gather_ms` into one engine batch (MicroBatcher);
vLLM replicas hand every request to vLLM's async engine at once (it batches continuously by itself).
"""
from __future__ import annotations

from typing import Any, Sequence

from actors.engines.base import INSTALL_HINT, vllm_available
from actors.model_actor import ModelActor
from actors.replicas import ModelPool, PoolClient, check_model, start_replicas
from app.config import ConfigError
from app.contracts import Completion, GenerationRequest, Usage
from app.pool_config import PoolConfig


def _load(engine: str, model: str, dtype: str, kwargs: dict) -> Any:
    if engine == "hf":
        from actors.engines.hf import HFEngine

        return HFEngine(model, dtype=dtype, **kwargs)
    if engine == "vllm":
        from actors.engines.vllm import VLLMEngine

        return VLLMEngine(model, dtype=dtype, **kwargs)
    raise ValueError(f"unknown engine {engine!r}; one of hf, vllm")


class PolicyActor(ModelActor):
    """One policy model in a Ray actor. Async: concurrent `generate` calls are accepted and batched."""

    def __init__(self, engine: str = "hf", model: str = "toy:policy", dtype: str = "float32", max_batch: int = 64,
                 gather_ms: float = 5.0, engine_kwargs: dict | None = None):
        self._start(engine, model, lambda: _load(engine, model, dtype, dict(engine_kwargs or {})),
                    "generate" if engine == "hf" else None, max_batch, gather_ms)

    def reset_counters(self) -> None:
        super().reset_counters()
        self.requests = self.sequences = self.prompt_tokens = self.generated_tokens = self.cached_tokens = 0

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        requests = list(requests)
        if not requests:
            return []
        if self.batcher is not None:
            out = await self._serve(lambda: self.batcher.submit(requests))
        else:
            out = await self._serve(lambda: self.engine.generate(requests))
        self.requests += len(requests)
        for group in out:
            self.sequences += len(group)
            if group:
                self.prompt_tokens += group[0].prompt_tokens
                self.cached_tokens += group[0].cached_tokens
            self.generated_tokens += sum(c.generated_tokens for c in group)
        return out

    async def update_weights(self, state, version: int) -> int:
        """RL weight sync (OpenRLHF-style): load the trainer's new weights into the live engine, then sample with
        them. `state`: {parameter name: tensor} (all or one bucket of them) or a path to .safetensors weights;
        `version`: the trainer's optimizer step. The engine swaps them between batches and drops its prefix cache
        (`HFEngine.update_weights`, `VLLMEngine.update_weights`). Returns the version now served."""
        import asyncio
        import inspect

        if inspect.iscoroutinefunction(self.engine.update_weights):
            await self.engine.update_weights(state, version)
        else:  # the HF engine waits for its running batch: off the event loop
            await asyncio.to_thread(self.engine.update_weights, state, version)
        self.weights_version = int(version)
        return self.weights_version

    def info(self) -> dict:
        """flop_parameters: the matmul parameters per token, what the clients count FLOPs with."""
        return dict(super().info(), flop_parameters=int(getattr(self.engine, "flop_parameters", self.num_parameters)))

    def stats(self) -> dict:
        """prompt_tokens counts each request's prompt once; cached_tokens those of them its engine did not run."""
        return dict(super().stats(), weights_version=getattr(self, "weights_version", 0), requests=self.requests,
                    sequences=self.sequences,
                    prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                    generated_tokens=self.generated_tokens)


def _count_generation(usage: Usage, out: list[list[Completion]], num_parameters: int) -> None:
    """One call's tokens and FLOPs, nominal and computed (`Usage`); `num_parameters`: the pool's flop_parameters."""
    usage.add_generation(out, num_parameters)


class PolicyClient(PoolClient):
    """`PolicyHandle` over a policy pool: `generate` blocks (use it in Ray tasks and threads), `agenerate` awaits.
    Every call adds its tokens and FLOPs (2 x parameters x tokens: nominal, and computed after the engine's
    prefix cache) to `self.usage`; the parameters are the pool's `flop_parameters`."""

    account = staticmethod(_count_generation)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        requests = list(requests)
        return self.call("generate", requests) if requests else []

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        requests = list(requests)
        return await self.acall("generate", requests) if requests else []


def validate_policy_config(cfg: PoolConfig) -> None:
    """Checks that need no cluster: one-line ConfigErrors."""
    if cfg.engine == "hf" and cfg.tp != 1:
        raise ConfigError(f"policy: the hf engine runs one device per replica, tp must be 1 (got {cfg.tp}); "
                          "use engine: vllm for tensor parallelism")
    if cfg.engine == "vllm" and not vllm_available():
        raise ConfigError(f"policy: engine: vllm, but vLLM is not installed: {INSTALL_HINT}")
    check_model(cfg.model)


def start_policy_pool(cfg: PoolConfig, name: str = "policy", ready_timeout_s: float = 900.0,
                      placement: dict | None = None) -> ModelPool:
    """Start `cfg.replicas` PolicyActors (Ray must be initialised, else a local cluster is started) and wait
    until each has loaded its model. Bad configs raise ConfigError (one line) before anything starts."""
    validate_policy_config(cfg)
    pool, info = start_replicas(
        PolicyActor, dict(engine=cfg.engine, model=cfg.model, dtype=cfg.dtype, max_batch=cfg.max_batch,
                          gather_ms=cfg.gather_ms), cfg, name, ready_timeout_s, **(placement or {}))
    return ModelPool(cfg, pool, info, PolicyClient)
