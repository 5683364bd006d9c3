"""`python -m jobs.bench engine [--engine hf|vllm] [--model toy:policy] [--json]`

On one model, in one run:
- raw HF engine tokens/s at batch 1, 16 and 64 (in this process, `--threads` torch threads);
- the same work through one PolicyActor with 64 concurrent callers of one request each (the actor merges them
  into engine batches): `actor_over_raw` = actor tokens/s / raw tokens/s at batch 64 (aim >= 0.9). The callers
  are coroutines of this one process, each waiting for its result before its next call, so the figure includes
  this process turning 64 results around between batches; `actor_over_raw_2_in_flight` (each caller keeps two
  calls in flight, so the next batch is queued while one runs) shows the actor's own capacity;
- 2 replicas vs 1 under the same 64 callers: `replica_scaling`;
- with `--engine vllm`: vLLM (async engine, in this process) tokens/s at batch 64 over the HF engine's:
  `vllm_over_hf`, and the vLLM engine's start seconds: `vllm_start_s`.

Every replica gets `--cpus-per-replica` CPUs (Ray then gives it as many torch threads), and the raw runs use as
many threads, so the ratios compare like with like. Sampling at temperature 1 with fixed seeds, no stop strings:
every sequence runs to EOS or `--max-tokens`. When `toy:policy` is not built yet, a random tiny model of the same
shape is made on the fly (the table says so).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="hf: HF engine and actors only; vllm: also vLLM vs HF at batch 64 and vLLM start time")
    parser.add_argument("--model", default="toy:policy", help="checkpoint (default toy:policy; a random tiny "
                                                                "model of the same shape if it is not built)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--callers", type=int, default=64, help="concurrent callers of the actor runs")
    parser.add_argument("--rounds", type=int, default=4, help="calls per caller in the actor runs")
    parser.add_argument("--cpus-per-replica", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the raw runs (default: --cpus-per-replica)")
    parser.add_argument("--gather-ms", type=float, default=None, help="actor gather window (default: PoolConfig's)")
    parser.add_argument("--dtype", default="float32")


def _model(name: str) -> tuple[str, str]:
    """(path, note). A random tiny toy-shaped model when `toy:policy` is not built."""
    from actors.replicas import check_model
    from app.config import ConfigError

    try:
        return check_model(name), name
    except ConfigError:
        if name != "toy:policy":
            raise
    import torch
    from transformers import AutoModelForCausalLM

    from app.toy.models import policy_config
    from app.toy.tokenizer import build_tokenizer

    path = Path(tempfile.mkdtemp(prefix="ponder-bench-")) / "random-tiny"
    torch.manual_seed(0)
    tok = build_tokenizer()
    AutoModelForCausalLM.from_config(policy_config(tok, "tiny")).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path), "random tiny Qwen2 (toy:policy not built)"


def _prompts(k: int) -> list[str]:
    try:
        from app.toy.world import toy_problems, toy_prompt

        problems = toy_problems("test", n_per_level=max(1, -(-k // 5)))
        return [toy_prompt(p) for p in problems][:k]
    except Exception:  # the generator is not there: plain arithmetic prompts
        return [f"Question: What is {i + 7} + {3 * i + 2}?\n\nAnswer:\n\n" for i in range(k)]


def _requests(k: int, max_tokens: int, offset: int = 0):
    from app.contracts import GenerationRequest

    return [GenerationRequest(p, max_tokens=max_tokens, temperature=1.0, seed=offset + i)
            for i, p in enumerate(_prompts(k))]


def _tokens(groups) -> int:
    return sum(c.generated_tokens for g in groups for c in g)


def _raw(generate, batch: int, total: int, max_tokens: int) -> dict:
    calls = max(1, total // batch)
    generate(_requests(min(batch, 4), max_tokens=8))  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for c in range(calls):
        tokens += _tokens(generate(_requests(batch, max_tokens, offset=c * batch)))
    dt = time.perf_counter() - t0
    return dict(sequences=calls * batch, tokens=tokens, seconds=dt, tokens_per_s=tokens / dt)


def _through_pool(pool, callers: int, rounds: int, max_tokens: int, outstanding: int = 1) -> dict:
    """`callers` concurrent callers, each making `rounds` calls of one request, `outstanding` of them in flight at
    a time (1: a caller waits for its result before its next call)."""
    client = pool.client()
    client.generate(_requests(4, max_tokens=8))  # warm-up (every replica is loaded already)
    pool.reset_stats()
    reqs = _requests(callers, max_tokens)
    per_lane = max(1, rounds // outstanding)

    async def lane(i: int) -> int:
        n = 0
        for _ in range(per_lane):
            n += _tokens(await client.agenerate([reqs[i]]))
        return n

    async def everyone() -> int:
        return sum(await asyncio.gather(*[lane(i) for i in range(callers) for _ in range(outstanding)]))

    t0 = time.perf_counter()
    tokens = asyncio.run(everyone())
    dt = time.perf_counter() - t0
    stats = pool.stats()
    batches = sum(s.get("batches", 0) for s in stats)
    return dict(sequences=callers * outstanding * per_lane, tokens=tokens, seconds=dt, tokens_per_s=tokens / dt,
                mean_batch=(sum(s["requests"] for s in stats) / batches) if batches else None,
                engine_tokens_per_s=tokens / max(1e-9, sum(s.get("engine_s", 0.0) for s in stats)),
                calls_per_replica="/".join(str(s["calls"]) for s in stats))


def run(args) -> tuple[list[dict], dict]:
    import ray
    import torch

    from actors.engines.hf import HFEngine
    from actors.policy import start_policy_pool
    from app.pool_config import PoolConfig

    path, note = _model(args.model)
    threads = args.threads or args.cpus_per_replica
    torch.set_num_threads(threads)
    rows: list[dict] = []
    figures: dict = dict(model=note, max_tokens=args.max_tokens, threads=threads)

    # --- raw HF engine -----------------------------------------------------------------------------------------
    hf = HFEngine(path, dtype=args.dtype, device="cpu")
    raw = {}
    for batch, total in ((1, 8), (16, 32), (64, 128)):
        raw[batch] = r = _raw(hf.generate, batch, total, args.max_tokens)
        rows.append(dict(run="hf raw", batch=batch, callers=None, replicas=None, **r))
        figures[f"hf_raw_tokens_per_s_b{batch}"] = r["tokens_per_s"]

    # --- through PolicyActors ----------------------------------------------------------------------------------
    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=max(2, 2 * args.cpus_per_replica), include_dashboard=False, log_to_driver=False)
    try:
        extra = {} if args.gather_ms is None else {"gather_ms": args.gather_ms}
        runs = {}
        for replicas, outstanding in ((1, 1), (1, 2), (2, 1)):
            if outstanding == 1 or replicas == 1:
                cfg = PoolConfig(engine="hf", model=path, replicas=replicas, num_cpus=args.cpus_per_replica,
                                 dtype=args.dtype, max_batch=args.callers, engine_kwargs={"device": "cpu"}, **extra)
            if (replicas, outstanding) != (1, 2):
                pool = start_policy_pool(cfg, name=f"bench-{replicas}")
            try:
                runs[replicas, outstanding] = r = _through_pool(pool, args.callers, args.rounds, args.max_tokens,
                                                                outstanding)
            finally:
                if (replicas, outstanding) != (1, 1):
                    pool.shutdown()
            rows.append(dict(run="hf PolicyActor" + (" (2 calls in flight per caller)" if outstanding > 1 else ""),
                             batch=None, callers=args.callers, replicas=replicas, **r))
    finally:
        if started_ray:
            ray.shutdown()
    # raw batch 64 once more, now that the actors are gone: the machine is shared, so the ratios use the mean
    again = _raw(hf.generate, 64, 128, args.max_tokens)
    rows.append(dict(run="hf raw (again)", batch=64, callers=None, replicas=None, **again))
    del hf
    raw64 = (raw[64]["tokens_per_s"] + again["tokens_per_s"]) / 2
    figures["hf_raw_tokens_per_s_b64"] = raw64
    figures["actor_tokens_per_s"] = runs[1, 1]["tokens_per_s"]
    figures["actor_mean_batch"] = runs[1, 1]["mean_batch"]
    figures["actor_over_raw"] = runs[1, 1]["tokens_per_s"] / raw64
    figures["actor_over_raw_2_in_flight"] = runs[1, 2]["tokens_per_s"] / raw64
    figures["replica_scaling"] = runs[2, 1]["tokens_per_s"] / runs[1, 1]["tokens_per_s"]

    # --- vLLM ----------------------------------------------------------------------------------------------------
    if args.engine == "vllm":
        from actors.engines.vllm import VLLMEngine

        t0 = time.perf_counter()
        eng = VLLMEngine(path, dtype=args.dtype)
        start_s = time.perf_counter() - t0
        try:
            for batch, total in ((1, 8), (64, 128)):
                r = _raw(eng.generate_sync, batch, total, args.max_tokens)
                rows.append(dict(run="vllm raw", batch=batch, callers=None, replicas=None, **r))
                figures[f"vllm_tokens_per_s_b{batch}"] = r["tokens_per_s"]
        finally:
            eng.close()
        figures["vllm_start_s"] = start_s
        figures["vllm_over_hf"] = figures["vllm_tokens_per_s_b64"] / raw64
        figures["vllm_cpu_threads"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
    for r in rows:
        r["model"] = note
    return rows, figures
