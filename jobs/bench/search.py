"""`python -m jobs.bench search [--config RECIPE] [--problems K] [--json]`: throughput of search on the actor pools.

Three figures, each a ratio measured in one run on the same machine:

- search_efficiency: generated tokens/s of the recipe's step-wise search (beam search by default: many small
  calls that stop at step boundaries, interleaved with PRM scoring) over generated tokens/s of plain sampling of
  the same number of tokens on the same policy pool (one request of n samples per problem, no stop string,
  max_tokens sized so the total matches). 1.0 means step-wise search keeps the engine as busy as plain sampling.
- engine_efficiency (HF engines): the same ratio per second of policy-engine compute, so the time the engine
  sat idle waiting on PRM scores is left out. Where the PRM shares the policy's CPUs (one machine), its
  concurrent work still slows the engine's own seconds; with the PRM on its own device that cost goes too.
- replica_scaling: problems/s of the same search with 2 policy replicas over problems/s with 1 (ideal: 2.0,
  bounded by the PRM pool and the CPUs or GPUs the replicas get).

Both phases run the problems as Ray tasks through the search job's own submission code, with the same window of
problems in flight. The default 64 problems keep the window full for most of the run: with 16 and a window of 8,
much of the beam-search phase ran with the window draining, and the ratio read 0.30-0.35 where 64 problems read
0.44-0.52 on the same 2 cores. The sampling row's `rounds` says how many top-up rounds plain sampling needed
(samples that end at EOS early).
"""
from __future__ import annotations

import argparse
import math
import os
import time

from app.config import load_config


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="toy/beam_search", help="a search recipe (pools, data, method)")
    parser.add_argument("--problems", type=int, default=64, help="problems per phase (the first and last `in-flight` "
                        "of them run with the window filling or draining: too few and that dominates)")
    parser.add_argument("--in-flight", type=int, default=None, help="problems in flight (default: the recipe's)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("--skip-replicas", action="store_true", help="measure search_efficiency only")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. search.n=8")


def _drive(submit_fns: list, window: int) -> tuple[list, float]:
    """Run the thunks (each returns an ObjectRef) with at most `window` in flight; results in order, seconds."""
    from app.fanout import windowed_map

    t0 = time.perf_counter()
    results = windowed_map(submit_fns, lambda fn: fn(), window, progress=False)
    return results, time.perf_counter() - t0


def _sample_task():
    import ray

    @ray.remote
    def sample(policy_pool, prompt: str, n: int, max_tokens: int, temperature: float, top_p: float, seed: int | None):
        from app.contracts import GenerationRequest

        client = policy_pool.client()
        client.generate([GenerationRequest(prompt=prompt, n=n, max_tokens=max_tokens, temperature=temperature,
                                           top_p=top_p, seed=seed)])
        return client.usage.generated_tokens

    return sample


def _search_phase(cfg, problems, prompts, policy_pool, prm_pool, window: int) -> dict:
    from actors.pools import Pools
    from app.search.driver import submit

    pools = Pools(policy_pool, prm_pool)
    fns = [(lambda p=p, q=q: submit(p, q, cfg, pools)) for p, q in zip(problems, prompts)]
    records, seconds = _drive(fns, window)
    tokens = [int(r["compute"]["generated_tokens"]) for r in records]
    return {"problems": len(records), "generated_tokens": sum(tokens), "seconds": seconds, "per_problem": tokens}


def _row(method: str, replicas: int, r: dict) -> dict:
    return {"phase": method, "replicas": replicas, "problems": r["problems"], "generated_tokens": r["generated_tokens"],
            "seconds": r["seconds"], "tokens_per_s": r["generated_tokens"] / r["seconds"],
            "problems_per_s": r["problems"] / r["seconds"]}


def _reset(policy_pool, prm_pool) -> None:
    for pool in (policy_pool, prm_pool):
        if pool is not None:
            pool.reset_stats()


def _engine_share(pool, seconds: float) -> float | None:
    """Share of the phase's wall time the pool's engines spent computing (summed over replicas); None where the
    actors did not micro-batch (vLLM batches inside its engine: no busy time to read)."""
    stats = pool.stats()
    if not seconds or not any(s.get("batches") for s in stats):
        return None
    return sum(s.get("engine_s", 0.0) for s in stats) / seconds


def _mean_batch(pool) -> float | None:
    """Sequences (rows) per engine call of the pool's HF micro-batchers: bigger batches keep a CPU or GPU busier."""
    stats = pool.stats()
    batches = sum(s.get("batches", 0) for s in stats)
    return sum(s.get("sequences", 0) for s in stats) / batches if batches else None


def _prefix_hits(pool) -> float | None:
    """Share of the tokens the pool's HF engines looked up that their prefix caches already held."""
    caches = [s["prefix_cache"] for s in pool.stats() if s.get("prefix_cache")]
    query = sum(c["query_tokens"] for c in caches)
    return sum(c["hit_tokens"] for c in caches) / query if query else None


def _busy(policy_pool, prm_pool, seconds: float) -> dict:
    """Where the time went when search is slower than sampling."""
    out = {"policy_busy": _engine_share(policy_pool, seconds), "policy_prefix_hits": _prefix_hits(policy_pool),
           "policy_rows": _mean_batch(policy_pool)}
    if prm_pool is not None:
        out["prm_busy"] = _engine_share(prm_pool, seconds)
        out["prm_prefix_hits"] = _prefix_hits(prm_pool)
    return out


def _phase_one(cfg, problems, prompts, policy_pool, prm_pool, window: int, rows: list, figures: dict) -> dict:
    """The search on one replica, then plain sampling of the same number of tokens on the same pool."""
    s = cfg.search
    _search_phase(cfg, problems[:1], prompts[:1], policy_pool, prm_pool, 1)  # warm-up, not timed
    _reset(policy_pool, prm_pool)
    search1 = _search_phase(cfg, problems, prompts, policy_pool, prm_pool, window)
    rows.append({**_row(cfg.method, 1, search1), **_busy(policy_pool, prm_pool, search1["seconds"])})
    sample = _sample_task()
    n = max(1, s.budget)
    temperature = getattr(s, "temperature", 0.8)
    top_p = getattr(s, "top_p", 1.0)
    target = search1["generated_tokens"]
    total, seconds, rounds = 0, 0.0, 0
    _reset(policy_pool, None)
    while total < 0.95 * target and rounds < 5:  # samples may end at EOS early: top up, in rounds
        left = target - total
        share = [max(1, math.ceil(left * t / max(1, target) / n)) for t in search1["per_problem"]]
        fns = [(lambda q=q, m=m, i=i, r=rounds: sample.remote(policy_pool, q, n, m, temperature, top_p, 1000 * r + i))
               for i, (q, m) in enumerate(zip(prompts, share))]
        got, sec = _drive(fns, window)
        total += sum(got)
        seconds += sec
        rounds += 1
    rows.append({"phase": "sampling", "replicas": 1, "problems": len(problems), "generated_tokens": total,
                 "seconds": seconds, "tokens_per_s": total / seconds if seconds else 0.0, "problems_per_s": None,
                 "rounds": rounds, **_busy(policy_pool, None, seconds)})
    figures["search_tokens_per_s"] = search1["generated_tokens"] / search1["seconds"]
    figures["sampling_tokens_per_s"] = total / seconds if seconds else 0.0
    figures["search_efficiency"] = (
        figures["search_tokens_per_s"] / figures["sampling_tokens_per_s"] if figures["sampling_tokens_per_s"] else 0.0
    )
    # the same ratio per second the policy engine computed: what is left when the PRM does not share its CPUs
    busy = [rows[-2].get("policy_busy"), rows[-1].get("policy_busy")]
    if all(busy):
        figures["engine_efficiency"] = figures["search_efficiency"] * busy[1] / busy[0]
    return search1


def run(args) -> tuple[list[dict], dict]:
    import ray

    from jobs.common import init_ray
    from app.datasets import load_problems
    from app.search.driver import make_prompt
    from jobs.search import Config, pool_configs, prompt_tokenizer, start_pools

    cfg = load_config(Config, args.config, args.overrides)
    window = args.in_flight or cfg.max_in_flight
    problems = load_problems(cfg.data.source, limit=args.problems, shuffle_seed=cfg.data.shuffle_seed,
                             split=cfg.data.split, subset=cfg.data.subset)
    if not problems:
        raise SystemExit("no problems to benchmark")
    policy_cfg, prm_cfg = pool_configs(cfg)
    need = 2 * policy_cfg.num_cpus + (prm_cfg.num_cpus if prm_cfg is not None else 0) + 1
    started_ray = not ray.is_initialized()
    # no dashboard: its periodic work would share the 2 cores with what is being measured
    init_ray(args.num_cpus or max(os.cpu_count() or 2, math.ceil(need)), include_dashboard=False)
    tokenizer = prompt_tokenizer(cfg)
    prompts = [make_prompt(p, cfg, tokenizer) for p in problems]
    rows: list[dict] = []
    figures: dict = {}

    first = start_pools(policy_cfg.model_copy(update={"replicas": 1}), prm_cfg)
    policy_pool, prm_pool = first.policy, first.prm
    try:
        search1 = _phase_one(cfg, problems, prompts, policy_pool, prm_pool, window, rows, figures)
        if not args.skip_replicas:
            policy_pool.shutdown()
            policy_pool = None
            policy_pool = start_pools(policy_cfg.model_copy(update={"replicas": 2}), None).policy
            _search_phase(cfg, problems[:2], prompts[:2], policy_pool, prm_pool, 2)  # warm both replicas
            _reset(policy_pool, prm_pool)
            search2 = _search_phase(cfg, problems, prompts, policy_pool, prm_pool, window)
            rows.append({**_row(cfg.method, 2, search2), **_busy(policy_pool, prm_pool, search2["seconds"])})
            figures["replica_scaling"] = (search2["problems"] / search2["seconds"]) / (search1["problems"] / search1["seconds"])
    finally:
        if policy_pool is not None:
            policy_pool.shutdown()
        if prm_pool is not None:
            prm_pool.shutdown()
    if started_ray:
        ray.shutdown()
    return rows, figures
