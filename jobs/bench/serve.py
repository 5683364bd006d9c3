"""`python -m jobs.bench serve [--json]`: the Serve endpoint under 64 concurrent toy questions.

Deploys configs/serve/toy.yaml (the shipped toy router, toy policy and PRM), fires `--questions` toy test questions
at POST /v1/solve all at once with a fixed arm (`--method`, `--n`), then solves the same questions with the same
method config through the search driver (what `ponder search` runs) on the SAME pools (the Serve app's, fetched
from its search deployment), then fires them once more routed (`method: auto`). Figures: every request answered,
p50 / p99 latency, and `serve_over_direct` = requests/s through Serve / problems/s of the driver. Serve runs first,
so any prefix-cache warmth helps the driver, not Serve.

The abuse run (`--abuse`, on by default) fires the same fixed-arm questions twice more: alone (the baseline, as
warm), then while one client asks for the largest budget the app allows (`--abuse-method` at its max_n), one asks
for n = 10**9 (refused at once) and one disconnects `--abuse-disconnect-s` into a search of the largest budget.
`serve_abuse_p99_ratio` = the ordinary requests' p99 beside the abusers / their p99 alone (aim <= 1.5);
`abuse_cancelled`: the abandoned search stopped (the search deployment counted one more cancelled search, none is
left running and no pool call is in flight).
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
    p.add_argument("--abuse", action=argparse.BooleanOptionalAction, default=True, help="the abuse run")
    p.add_argument("--abuse-method", default="best_of_n", help="the method the abusive clients ask for")
    p.add_argument("--abuse-disconnect-s", type=float, default=2.0, help="when the leaving client disconnects")


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


async def _abuse(url: str, bodies: list[dict], method: str, cap: int, leave_s: float) -> tuple:
    """The ordinary bodies, fired together with a largest-budget client, an n = 10**9 client and a client that
    leaves mid-search; (latencies, results, wall, statuses of the abusers)."""
    import httpx

    async def greedy_client():
        async with httpx.AsyncClient(base_url=url, timeout=600) as c:
            r = await c.post("/v1/solve", json={"question": bodies[0]["question"], "method": method, "n": cap})
            huge = await c.post("/v1/solve", json={"question": bodies[0]["question"], "method": method, "n": 10 ** 9})
            return r.status_code, huge.status_code

    async def leaving_client():
        async with httpx.AsyncClient(base_url=url, timeout=leave_s) as c:
            try:
                r = await c.post("/v1/solve", json={"question": bodies[1]["question"], "method": method, "n": cap})
                return r.status_code
            except httpx.TimeoutException:
                return "left"

    (lat, res, wall), greedy, leaving = await asyncio.gather(_fire(url, bodies), greedy_client(), leaving_client())
    return lat, res, wall, {"max_budget": greedy[0], "huge_n": greedy[1], "leaving": leaving}


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
        abuse = _abuse_run(args, url, name, fixed, rows) if args.abuse else {}
    finally:
        serve.shutdown()
    s, d, a = rows[:3]
    figures = {"questions": len(problems), "answered": s["answered"], "p50_s": s["p50_s"], "p99_s": s["p99_s"],
               "serve_req_per_s": s["req_per_s"], "direct_req_per_s": d["req_per_s"],
               "serve_over_direct": s["req_per_s"] / d["req_per_s"], "auto_answered": a["answered"],
               "auto_p50_s": a["p50_s"], "auto_p99_s": a["p99_s"], "auto_arms": ", ".join(arms), **abuse}
    return rows, figures


def _abuse_run(args, url: str, name: str, fixed: list[dict], rows: list[dict]) -> dict:
    from ray import serve

    searcher = serve.get_deployment_handle("Searcher", app_name=name)
    router = serve.get_deployment_handle("RouterDeployment", app_name=name)
    cap = router.limits.remote().result()[args.abuse_method]
    lat, res, wall = asyncio.run(_fire(url, fixed))  # the baseline, as warm as the abuse run
    rows.append(_row(f"serve {args.method} n={args.n} again (abuse baseline)", lat, res, wall))
    before = searcher.stats.remote().result()
    lat, res, wall, status = asyncio.run(_abuse(url, fixed, args.abuse_method, cap, args.abuse_disconnect_s))
    rows.append(_row(f"serve {args.method} n={args.n} beside abusers", lat, res, wall))
    deadline = time.monotonic() + 120
    while (after := searcher.stats.remote().result())["running"] and time.monotonic() < deadline:
        time.sleep(0.5)
    return {"abuse_answered": rows[-1]["answered"], "abuse_p50_s": rows[-1]["p50_s"], "abuse_p99_s": rows[-1]["p99_s"],
            "serve_abuse_p99_ratio": rows[-1]["p99_s"] / rows[-2]["p99_s"],
            "abuse_baseline_p50_s": rows[-2]["p50_s"], "abuse_baseline_p99_s": rows[-2]["p99_s"], "abuse_max_n": cap,
            "abuse_status": status, "abuse_cancelled": after["cancelled"] > before["cancelled"]
            and after["running"] == 0 and after["pool_inflight"] == 0}
