"""PRMActor (an async Ray actor around one PRM engine), and the client search methods call.

    pool = start_prm_pool(PRMPoolConfig(engine="hf", model="toy:prm", format="qwen"))
    prm = pool.client()                          # RewardHandle: picklable
    scores = prm.score(question, [[step1, step2], [step1]])     # one score in [0, 1] per step

The input layouts of the published PRMs are in `actors.prm_formats` (LPR's value model: its 4-way head folded
into P(v < 2), P(v >= 2) once loaded, `fold_value_head`); the engines in `actors.engines` (`hf_prm`:
transformers, any layout; `vllm_prm`: the Qwen layout on vLLM's pooling runner; `toy_checker`: the toy world's
checker, no model, the oracle verifier for measuring a search method's ceiling). Concurrent `score` calls are
merged into one forward batch by the MicroBatcher (HF, checker), or handed straight to vLLM's async engine, which
batches continuously. The trajectories are laid out in the caller's call, so a malformed one fails only its own
caller, with a `PRMInputError` that names it.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Sequence

from actors.engines.base import INSTALL_HINT, load_tokenizer, vllm_available
from actors.model_actor import ModelActor
from actors.prm_formats import FORMATS, EncodedTrajectory, PRMInputError, describe, fold_value_head, make_format
from actors.replicas import ModelPool, PoolClient, check_model, start_replicas
from app.config import ConfigError
from app.contracts import ScoreResult, Usage
from app.pool_config import PRMFormatName, PRMPoolConfig


class PRMActor(ModelActor):
    """One PRM in a Ray actor. `score(question, trajectories)` -> ScoreResult: one score in [0, 1] per step, and
    the tokens the PRM read."""

    def __init__(self, model: str, format: PRMFormatName = "qwen", engine: Literal["hf", "vllm"] = "hf",
                 dtype: str = "float32", max_batch: int = 64, gather_ms: float = 5.0,
                 engine_kwargs: dict[str, Any] | None = None, step_delimiter: str = "\n\n"):
        if format not in (*FORMATS, "toy-checker"):
            raise ValueError(f"unknown PRM format {format!r}; one of {sorted(FORMATS)} or toy-checker")
        if engine == "vllm" and format != "qwen":
            raise ValueError(f"the vLLM PRM engine serves the Qwen PRM layout only, not {format!r}; use engine: hf")
        kw = dict(engine_kwargs or {})

        def load():
            from app.toy import resolve_model

            if format == "toy-checker":
                from actors.engines.toy_checker import ToyCheckerEngine, ToyCheckerFormat

                self.fmt = ToyCheckerFormat(step_delimiter)
                return ToyCheckerEngine()
            path = resolve_model(model)
            self.fmt = make_format(format, load_tokenizer(path), step_delimiter)
            if engine == "vllm":
                from actors.engines.vllm_prm import VLLMPRMEngine

                return VLLMPRMEngine(path, self.fmt, dtype=dtype, **kw)
            from actors.engines.hf_prm import HFPRMEngine

            hf = HFPRMEngine(path, self.fmt, dtype=dtype, **kw)
            if self.fmt.num_labels != 2:  # a value head (LPR's 4 ways): the two columns P(bad), P(good)
                fold_value_head(hf.model, self.fmt.good_labels)
            return hf

        name = "toy-checker" if format == "toy-checker" else model
        self._start(engine, name, load, "score", max_batch, gather_ms)
        self._async = bool(getattr(self.engine, "is_async", False))
        if self._async:  # vLLM's async engine batches continuously by itself
            self.batcher = None
        self.max_length = getattr(self.engine, "max_length", None)
        self._encoder = ThreadPoolExecutor(1, thread_name_prefix="prm-encode")

    def encode(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[EncodedTrajectory]:
        encoded = [self.fmt.encode(question, list(t), index=i) for i, t in enumerate(trajectories)]
        if self.max_length:
            for i, e in enumerate(encoded):
                if len(e.input_ids) > self.max_length:
                    raise PRMInputError(
                        f"{self.fmt.name} PRM: {describe(i, trajectories[i])} is {len(e.input_ids)} tokens, "
                        f"more than the model's {self.max_length}"
                    )
        return encoded

    async def score(self, question: str, trajectories: Sequence[Sequence[str]]) -> ScoreResult:
        # Laying trajectories out renders and tokenizes every step prefix (RLHFlow: a chat template per step): off
        # the event loop, so that new calls keep arriving while it runs; one thread, as HF tokenizers are not
        # safe to share between threads.
        encoded = await asyncio.get_running_loop().run_in_executor(self._encoder, self.encode, question,
                                                                   trajectories)
        if self._async:
            scores = await self._serve(lambda: self.engine.ascore(encoded))
        else:
            scores = await self._serve(lambda: self.batcher.submit(encoded))
        return ScoreResult(scores=[list(s) for s in scores], tokens=sum(len(e.input_ids) for e in encoded),
                           cached_tokens=sum(getattr(s, "cached_tokens", 0) for s in scores),
                           cached_scores=sum(getattr(s, "cached_scores", 0) for s in scores),
                           head_parameters=int(getattr(self.engine, "score_head_parameters", 0)))

    def info(self) -> dict:
        """flop_parameters: the body's matmul parameters per token, what the clients count FLOPs with (the head's,
        per score, come with each ScoreResult)."""
        return dict(super().info(), format=self.fmt.name, max_length=self.max_length,
                    flop_parameters=int(getattr(self.engine, "flop_parameters", self.num_parameters)))


def _count_scoring(usage: Usage, out: ScoreResult, num_parameters: int) -> None:
    """One call's tokens and FLOPs, nominal and computed (`Usage`); `num_parameters`: the pool's flop_parameters."""
    usage.add_scoring(out.tokens, num_parameters, cached_tokens=out.cached_tokens,
                      scores=sum(len(s) for s in out.scores), head_parameters=out.head_parameters,
                      cached_scores=out.cached_scores)


class PRMClient(PoolClient):
    """`RewardHandle` over a PRM pool: `score` blocks (Ray tasks, threads), `ascore` awaits.

    Every call adds the tokens the PRM read and its FLOPs (2 x parameters x tokens, plus its head at each score:
    nominal, and computed after the engine's prefix cache) to `self.usage`. Calls are retried by the pool when a
    replica dies.
    """

    account = staticmethod(_count_scoring)

    def score(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[list[float]]:
        trajs = [list(t) for t in trajectories]
        return self.call("score", question, trajs).scores if trajs else []

    async def ascore(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[list[float]]:
        trajs = [list(t) for t in trajectories]
        return (await self.acall("score", question, trajs)).scores if trajs else []


def validate_prm_config(cfg: PRMPoolConfig) -> None:
    """Checks that need no cluster: one-line ConfigErrors."""
    if cfg.engine == "hf" and cfg.tp != 1:
        raise ConfigError(f"prm: the hf engine runs one device per replica, tp must be 1 (got {cfg.tp}); "
                          "use engine: vllm for tensor parallelism")
    if cfg.engine == "vllm":
        if cfg.format != "qwen":
            raise ConfigError(f"prm: engine vllm serves the qwen PRM layout only, not format {cfg.format!r}; "
                              "use engine: hf")
        if not vllm_available():
            raise ConfigError(f"prm: engine: vllm, but vLLM is not installed: {INSTALL_HINT}")
    if cfg.format != "toy-checker":
        check_model(cfg.model)


def start_prm_pool(cfg: PRMPoolConfig, name: str = "prm", ready_timeout_s: float = 900.0,
                      placement: dict | None = None) -> ModelPool:
    """Start `cfg.replicas` PRMActors (Ray must be initialised, else a local cluster is started) and wait until
    each has loaded its model. Bad configs raise ConfigError (one line) before anything starts."""
    validate_prm_config(cfg)
    pool, info = start_replicas(
        PRMActor, dict(model=cfg.model, format=cfg.format, engine=cfg.engine, dtype=cfg.dtype,
                       max_batch=cfg.max_batch, gather_ms=cfg.gather_ms, step_delimiter=cfg.step_delimiter),
        cfg, name, ready_timeout_s, **(placement or {}))
    return ModelPool(cfg, pool, info, PRMClient, shutdown_timeout_s=60.0)
