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

import logging
from typing import Any, Sequence

from actors.engines.base import INSTALL_HINT, vllm_available
from actors.model_actor import ModelActor
from actors.replicas import ModelPool, PoolClient, check_model, start_replicas
from app.config import ConfigError
from app.contracts import Completion, GenerationRequest, Usage
from app.pool_config import PoolConfig

log = logging.getLogger(__name__)


def _load(engine: str, model: str, dtype: str, kwargs: dict) -> Any:
    if engine == "hf":
        from actors.engines.hf import HFEngine

        return HFEngine(model, dtype=dtype, **kwargs)
    if engine == "vllm":
        from actors.engines.vllm import VLLMEngine

        return VLLMEngine(model, dtype=dtype, **kwargs)
    raise ValueError(f"unknown engine {engine!r}; one of hf, vllm")


START_VERSION = -1  # the weights version a replica serves before its first push: the checkpoint it started from


class StaleWeights(RuntimeError):
    """A rollout asked for weights version `wanted`; the replica serves `served` (a restart, or a push in flight)."""

    def __init__(self, served: int, wanted: int):
        super().__init__(f"this policy replica serves weights version {served}, the caller wants {wanted}")
        self.served, self.wanted = served, wanted

    def __reduce__(self):  # Ray pickles it back to the caller
        return StaleWeights, (self.served, self.wanted)


class PolicyActor(ModelActor):
    """One policy model in a Ray actor. Async: concurrent `generate` calls are accepted and batched.

    RL weight sync: one session per version, `start_weight_update` -> `load_weights_chunk` per bucket ->
    `finish_weight_update(version)`; no batch runs while a session is open (new calls wait, running ones finish
    first). vLLM takes the chunks into its own session (its layer-wise reload rebuilds a layer once it holds all
    its tensors); for the HF engine the actor keeps the chunks and loads them in one go at finish. `weights_from`:
    the name of the `WeightLedger` of the pool's trainer; a replica (e.g. one Ray restarted) loads the version
    recorded there before it serves its first batch."""

    def __init__(self, engine: str = "hf", model: str = "toy:policy", dtype: str = "float32", max_batch: int = 64,
                 gather_ms: float = 5.0, engine_kwargs: dict | None = None, weights_from: str | None = None):
        import asyncio

        self._start(engine, model, lambda: _load(engine, model, dtype, dict(engine_kwargs or {})),
                    "generate" if engine == "hf" else None, max_batch, gather_ms)
        self.weights_version = START_VERSION
        self._open = asyncio.Event()  # set while no weight-update session is open
        self._open.set()
        self._chunks: list | None = None  # HF engine: the open session's chunks
        self._weights_from = weights_from

    def reset_counters(self) -> None:
        super().reset_counters()
        self.requests = self.sequences = self.prompt_tokens = self.generated_tokens = self.cached_tokens = 0

    async def generate(self, requests: Sequence[GenerationRequest], version: int | None = None
                       ) -> list[list[Completion]]:
        """Completions of `requests`; with `version`, refused (`StaleWeights`) unless this replica serves that
        weights version (checked after any open weight-update session, so the whole batch runs on it)."""
        requests = list(requests)
        await self._ready_to_serve()
        if version is not None and int(version) != self.weights_version:
            raise StaleWeights(self.weights_version, int(version))
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

    async def _ready_to_serve(self) -> None:
        if self._weights_from is not None:  # once: catch up with the trainer's latest push
            name, self._weights_from = self._weights_from, None
            await self._catch_up(name)
        await self._open.wait()

    async def _catch_up(self, ledger_name: str) -> None:
        import ray

        try:
            version, refs = await ray.get_actor(ledger_name).latest.remote()
            if version == self.weights_version or not refs:
                return
            chunks = [await r for r in refs]
        except Exception as e:  # no ledger, or its objects died with the trainer (which pushes again on restart)
            log.warning("policy replica: no weights to catch up with from %s (%s)", ledger_name, e)
            return
        await self.start_weight_update()
        for c in chunks:
            await self.load_weights_chunk(c)
        await self.finish_weight_update(version)
        log.info("policy replica: caught up with weights version %s", version)

    async def start_weight_update(self) -> None:
        """Open a weight-update session: new batches wait, running ones finish, then the chunks may come."""
        import asyncio

        if not self._open.is_set():
            raise RuntimeError("start_weight_update: a weight-update session is already open")
        self._open.clear()
        while self.inflight:
            await asyncio.sleep(0.005)
        if hasattr(self.engine, "start_weight_update"):
            await self.engine.start_weight_update()
        else:
            self._chunks = []

    async def load_weights_chunk(self, state) -> int:
        """One chunk of the open session ({parameter name: tensor}, any subset, or a path to .safetensors)."""
        if self._open.is_set():
            raise RuntimeError("load_weights_chunk: no weight-update session is open (call start_weight_update)")
        if self._chunks is not None:
            self._chunks.append(state)
            return len(state) if isinstance(state, dict) else 1
        return await self.engine.load_weights_chunk(state)

    async def finish_weight_update(self, version: int) -> int:
        """Close the session: the engine serves the chunks' weights as `version` (returned), and batches resume.
        A chunk that does not fit the model raises here (HF engine: and nothing changes)."""
        import asyncio

        from actors.engines.hf import read_weights

        if self._open.is_set():
            raise RuntimeError("finish_weight_update: no weight-update session is open")
        try:
            if self._chunks is not None:
                state = {k: v for c in self._chunks for k, v in read_weights(c).items()}
                self._chunks = None
                await asyncio.to_thread(self.engine.update_weights, state, version)
            else:
                await self.engine.finish_weight_update(version)
            self.weights_version = int(version)
        finally:
            self._chunks = None
            self._open.set()
        return self.weights_version

    async def update_weights(self, state, version: int) -> int:
        """RL weight sync in one call (a session of one chunk): `state` {parameter name: tensor} or a path to
        .safetensors weights, `version` the trainer's optimizer step. Returns the version now served."""
        await self.start_weight_update()
        try:
            await self.load_weights_chunk(state)
        except BaseException:
            self._chunks = None
            self._open.set()
            raise
        return await self.finish_weight_update(version)

    def served_version(self) -> int:
        return self.weights_version

    def info(self) -> dict:
        """flop_parameters: the matmul parameters per token, what the clients count FLOPs with."""
        return dict(super().info(), flop_parameters=int(getattr(self.engine, "flop_parameters", self.num_parameters)))

    def stats(self) -> dict:
        """prompt_tokens counts each request's prompt once; cached_tokens those of them its engine did not run."""
        return dict(super().stats(), weights_version=self.weights_version, requests=self.requests,
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

    def generate_at(self, requests: Sequence[GenerationRequest], version: int) -> list[list[Completion]]:
        """`generate` sampled from weights `version`, or refused with `StaleWeights` (an RL trainer's rollouts)."""
        return self.call("generate", list(requests), int(version))


def validate_policy_config(cfg: PoolConfig) -> None:
    """Checks that need no cluster: one-line ConfigErrors."""
    if cfg.engine == "hf" and cfg.tp != 1:
        raise ConfigError(f"policy: the hf engine runs one device per replica, tp must be 1 (got {cfg.tp}); "
                          "use engine: vllm for tensor parallelism")
    if cfg.engine == "vllm" and not vllm_available():
        raise ConfigError(f"policy: engine: vllm, but vLLM is not installed: {INSTALL_HINT}")
    check_model(cfg.model)


def start_policy_pool(cfg: PoolConfig, name: str = "policy", ready_timeout_s: float = 900.0,
                      placement: dict | None = None, weights_from: str | None = None) -> ModelPool:
    """Start `cfg.replicas` PolicyActors (Ray must be initialised, else a local cluster is started) and wait
    until each has loaded its model. Bad configs raise ConfigError (one line) before anything starts.
    `weights_from`: a `WeightLedger`'s name (RL rollout pools): a replica loads the weights it records first."""
    validate_policy_config(cfg)
    kwargs = dict(engine=cfg.engine, model=cfg.model, dtype=cfg.dtype, max_batch=cfg.max_batch,
                  gather_ms=cfg.gather_ms, **({"weights_from": weights_from} if weights_from else {}))
    pool, info = start_replicas(PolicyActor, kwargs, cfg, name, ready_timeout_s, **(placement or {}))
    return ModelPool(cfg, pool, info, PolicyClient)
