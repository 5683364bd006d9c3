"""The Qwen2.5-Math-PRM layout (ponder's own PRM) on vLLM's pooling runner.

vLLM serves the architecture `Qwen2ForProcessRewardModel` natively (vllm/model_executor/models/qwen2_rm.py: a Qwen2
body, score head Linear-ReLU-Linear to 2 labels, token pooling type STEP). With
`runner="pooling"`, `PoolerConfig(step_tag_id=ID)` and the `token_classify` task, a request returns one row per
step-tag token of its prompt, holding the softmax of the two labels; the step score is column 1 ("good").
This is `LLM(path, runner="pooling", pooler_config=PoolerConfig(step_tag_id=ID)).encode(..., pooling_task=
"token_classify")`, run here on the async engine (`AsyncLLM`, continuous batching across concurrent callers), or
on the sync `LLM` when `async_engine=False` (the PRM actor then runs it in a worker thread through its
MicroBatcher).

Prompts are sent as token ids laid out by `actors.prm_formats.QwenPRMFormat`, so both engines read exactly the same tokens.

Memory: on CPU, vLLM's `gpu_memory_utilization` is the share of RAM reserved for the KV cache (checked per NUMA
node); ponder sets `kv_cache_memory_bytes` instead (default `CPU_KV_CACHE_BYTES`), which also skips vLLM's warm-up
forward when `enforce_eager` is on. A PRM reads each prompt once (prefill only, no decoding), so it needs little
KV cache: `max_model_len` tokens is the floor vLLM accepts (tiny toy PRM, float32, 1024 positions: 2 KiB a token,
2 MiB fails, 4 MiB starts).
"""
from __future__ import annotations

import uuid
from typing import Any, Sequence

from actors.engines.base import StepScores, checkpoint_parameters, import_vllm, vllm_dtype, vllm_executor_args

CPU_KV_CACHE_BYTES = 256 * 2**20  # ample for PRM prefills of toy/1.5B models on CPU; raise it in engine_kwargs


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()
    except Exception:  # pragma: no cover - platform detection failed: assume CPU, the safe side for memory
        return True


class VLLMPRMEngine:
    """Scores `EncodedTrajectory`s (Qwen layout) with vLLM. `ascore` (async engine) or `score` (sync engine).

    engine_kwargs go to vLLM's engine arguments (e.g. tensor_parallel_size, gpu_memory_utilization,
    kv_cache_memory_bytes, max_model_len, max_num_seqs, enforce_eager), plus `async_engine` (default True).
    """

    def __init__(self, path: str, fmt, dtype: str = "float32", async_engine: bool = True, **engine_kwargs: Any):
        import_vllm()
        from vllm.config import PoolerConfig

        self.fmt = fmt
        self.step_tag_id = fmt.step_tag_id
        self.is_async = async_engine
        kw: dict[str, Any] = dict(engine_kwargs)
        # Prompts arrive as token ids and nothing is decoded: vLLM needs no tokenizer (and would load the toy
        # character tokenizer as a Qwen2Tokenizer through AutoTokenizer, see actors.prm.load_tokenizer).
        kw.setdefault("skip_tokenizer_init", True)
        if _on_cpu():
            kw.setdefault("enforce_eager", True)
            if kw.get("gpu_memory_utilization") is None and kw.get("kv_cache_memory_bytes") is None:
                kw["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        self.dtype = dtype = vllm_dtype(dtype, path, bool(kw.get("trust_remote_code")))
        for key, value in vllm_executor_args(int(kw.get("tensor_parallel_size", 1))).items():
            kw.setdefault(key, value)
        args = dict(
            model=path,
            runner="pooling",
            pooler_config=PoolerConfig(step_tag_id=self.step_tag_id),
            dtype=dtype,
            **kw,
        )
        if async_engine:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
            self.llm = None
            model_config = self.engine.model_config
        else:
            from vllm import LLM

            self.llm = LLM(**args)
            self.engine = None
            model_config = self.llm.model_config
        self.max_length = model_config.max_model_len
        counts = checkpoint_parameters(path, "classifier", trust_remote_code=bool(kw.get("trust_remote_code")))
        self.num_parameters = counts.total
        self.flop_parameters = counts.per_token
        self.score_head_parameters = counts.per_score

    # -- results -------------------------------------------------------------------------------------------------

    def _scores(self, item, out) -> StepScores:
        data = out.outputs.data
        rows = data.tolist() if hasattr(data, "tolist") else list(data)
        if len(rows) != len(item.positions):
            raise RuntimeError(
                f"vLLM returned {len(rows)} step rows for a prompt with {len(item.positions)} step tags "
                f"(step_tag_id={self.step_tag_id}); is the checkpoint's pooler the STEP pooler?"
            )
        # vLLM turns prefix caching off for STEP pooling (ModelConfig.is_prefix_caching_supported, vLLM 0.32: the
        # pooler needs the hidden state of every step tag), so this is 0 there; read anyway, should that change
        cached = int(getattr(out, "num_cached_tokens", None) or 0)
        return StepScores([float(r[1]) for r in rows], cached_tokens=cached,
                          cached_scores=sum(1 for p in item.positions if p < cached))

    # -- async engine ----------------------------------------------------------------------------------------------

    async def _one(self, item) -> list[float]:
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        if not item.positions:
            return []
        out = None
        async for out in self.engine.encode(
            TokensPrompt(prompt_token_ids=list(item.input_ids)),
            PoolingParams(task="token_classify"),
            request_id=f"prm-{uuid.uuid4().hex}",
        ):
            pass
        return self._scores(item, out)

    async def ascore(self, items: Sequence) -> list[list[float]]:
        import asyncio

        if not self.is_async:
            return await asyncio.to_thread(self.score, items)
        return list(await asyncio.gather(*(self._one(it) for it in items)))

    # -- sync engine -------------------------------------------------------------------------------------------------

    def score(self, items: Sequence) -> list[list[float]]:
        if self.llm is None:
            raise RuntimeError("this VLLMPRMEngine runs the async engine: call `await ascore(items)`")
        from vllm.inputs import TokensPrompt

        todo = [i for i, it in enumerate(items) if it.positions]
        outs = self.llm.encode(
            [TokensPrompt(prompt_token_ids=list(items[i].input_ids)) for i in todo],
            pooling_task="token_classify",
            use_tqdm=False,
        ) if todo else []
        result: list[list[float]] = [[] for _ in items]
        for i, o in zip(todo, outs):
            result[i] = self._scores(items[i], o)
        return result

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
