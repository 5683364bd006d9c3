"""`python -m jobs.bench serve [--json]`: the Serve endpoint under 64 concurrent toy questions.

Deploys configs/serve/toy.yaml (the shipped toy router, toy policy and PRM), fires `--questions` toy test questions
at POST /v1/solve all at once with a fixed arm (`--method`, `--n`), then solves the same questions with the same
method config through the search driver (what `ponder search` runs) on the SAME pools (the Serve app's, fetched
from its search deployment), then fires them once more routed (`method: auto`). Figures: every request answered,
p50 / p99 latency, and `serve_over_direct` = requests/s through Serve / problems/s of the driver. Serve runs first,
so any prefix-cache warmth helps the driver, not Serve.
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import numpy as np


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="configs/serve/toy.yaml", help="a Serve config file (ponder serve's)")
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--method", default="best_of_n")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--recipe", default="toy/best_of_n", help="the search recipe of --method (the arm's config)")
    p.add_argument("--num-cpus", type=int, default=None)


async def _fire(url: str, bodies: list[dict]) -> tuple[list[float], list[dict], float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=len(bodies))) as c:
        async def one(body):
            t = time.perf_counter()
            r = await c.post("/v1/solve", json=body)
            return time.perf_counter() - t, (r.json() if r.status_code == 200 else {"status": r.status_code})

        t0 = time.perf_counter()
        out = await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
    return [o[0] for o in out], [o[1] for o in out], wall


def _row(name: str, lat: list[float], res: list[dict], wall: float) -> dict:
    ok = sum(1 for r in res if r.get("answer") is not None or "steps" in r)
    return {"path": name, "requests": len(res), "answered": ok, "wall_s": wall, "req_per_s": len(res) / wall,
            "p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99))}


def run(args) -> tuple[list[dict], dict]:
    from ray import serve

    from app.config import load_config
    from app.datasets import load_problems
    from app.search import driver
    from app.search.recipe import SearchRecipe
    from jobs.serve import start

    problems = load_problems("toy:test", limit=args.questions, shuffle_seed=7)
    url, name = start(args.config, args.num_cpus)
    try:
        import httpx

        httpx.post(f"{url}/v1/solve", json={"question": "What is 1 + 1?", "method": args.method, "n": args.n},
                   timeout=600).raise_for_status()  # warm-up: every deployment has answered once
        fixed = [{"question": p.question, "method": args.method, "n": args.n} for p in problems]
        lat, res, wall = asyncio.run(_fire(url, fixed))
        rows = [_row(f"serve {args.method} n={args.n}", lat, res, wall)]

        pools = serve.get_deployment_handle("Searcher", app_name=name).get_pools.remote().result()
        with tempfile.TemporaryDirectory() as out:
            recipe = load_config(SearchRecipe, args.recipe, [f"search.n={args.n}", f"output_dir={out}",
                                                             f"max_in_flight={len(problems)}", "progress=false"])
            t0 = time.perf_counter()
            failures = driver.solve_all(recipe, problems, pools, None)
            dwall = time.perf_counter() - t0
        rows.append({"path": f"search driver {args.method} n={args.n}", "requests": len(problems),
                     "answered": len(problems) - len(failures), "wall_s": dwall, "req_per_s": len(problems) / dwall,
                     "p50_s": None, "p99_s": None})

        lat2, res2, wall2 = asyncio.run(_fire(url, [{"question": p.question} for p in problems]))
        rows.append(_row("serve auto (routed)", lat2, res2, wall2))
        arms = sorted({f"{r.get('method')}/{r.get('rule')}@{r.get('n')}" for r in res2 if "method" in r})
    finally:
        serve.shutdown()
    s, d, a = rows
    figures = {"questions": len(problems), "answered": s["answered"], "p50_s": s["p50_s"], "p99_s": s["p99_s"],
               "serve_req_per_s": s["req_per_s"], "direct_req_per_s": d["req_per_s"],
               "serve_over_direct": s["req_per_s"] / d["req_per_s"], "auto_answered": a["answered"],
               "auto_p50_s": a["p50_s"], "auto_p99_s": a["p99_s"], "auto_arms": ", ".join(arms)}
    return rows, figures
