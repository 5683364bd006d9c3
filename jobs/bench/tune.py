"""`python -m jobs.bench tune [--config RECIPE] [--problems K] [--concurrent C] [--json]`: what a Tune sweep costs
over running its trials by hand.

sweep_overhead = the sweep's wall time (Tuner set-up, trials, reports) / the sum of the wall times of the same
trials run back to back as plain search runs (`app.search.driver`, as `ponder search` runs them) on the same
pools. 1.0: Tune adds nothing; above it, Tune's own cost (trial actors, placement groups, reporting); below it,
`max_concurrent_trials` > 1 keeping the shared engines busier than one run at a time does.

Both phases run on one set of pools started once, over the same problems. They draw different numbers (the plain
runs take each method's seed + 1), so neither phase finds the other's trajectories in the engines' prefix caches,
and a greedy pass over the problems first warms both phases' question prompts alike.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="toy/sweep_quick", help="a sweep recipe (pools, data, grid)")
    parser.add_argument("--problems", type=int, default=8, help="problems per trial (data.limit)")
    parser.add_argument("--concurrent", type=int, default=None, help="max_concurrent_trials (default: the recipe's)")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. max_in_flight=4")


def _plain(recipe, trial, out: Path, pools) -> tuple[float, int]:
    """One trial as a plain search run (its seed + 1) into `out`; (seconds, problems)."""
    from app.search import driver

    search = recipe.search_recipe(trial)
    seed = search.search.seed
    search = search.model_copy(update={"output_dir": str(out / trial.name),
                                       "search": search.search.model_copy(update={"seed": None if seed is None
                                                                                  else seed + 1})})
    t0 = time.perf_counter()
    problems, everything = driver.load(search)
    todo = driver.pending(search, problems, everything)
    driver.solve_all(search, todo, pools, None)
    return time.perf_counter() - t0, len(todo)


def run(args) -> tuple[list[dict], dict]:
    import ray

    from actors.pools import start_pools
    from app.config import load_config
    from app.search import driver
    from app.search.recipe import SearchRecipe
    from jobs.common import init_ray
    from tune.sweep import SweepRecipe, prepare, run_sweep

    overrides = [f"data.limit={args.problems}", *args.overrides]
    if args.concurrent:
        overrides.append(f"max_concurrent_trials={args.concurrent}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    recipe = load_config(SweepRecipe, args.config, overrides).model_copy(update={"output_dir": str(tmp / "sweep")})
    trials = recipe.trials()
    started_ray = not ray.is_initialized()
    init_ray(args.num_cpus or recipe.cluster_cpus(os.cpu_count() or 2), include_dashboard=False)
    rows: list[dict] = []
    pools = start_pools(*recipe.pool_configs())
    try:
        # warm-up: the question prompts, once per problem, for both phases alike (not timed)
        warm = SearchRecipe.model_validate({**recipe.search_recipe(trials[0]).model_dump(), "method": "greedy",
                                            "search": {"max_tokens": 64}, "output_dir": str(tmp / "warm")})
        problems, everything = driver.load(warm)
        driver.solve_all(warm, driver.pending(warm, problems, everything), pools, None)
        plain_total = 0.0
        for t in trials:
            seconds, n = _plain(recipe, t, tmp / "plain", pools)
            plain_total += seconds
            rows.append({"phase": "plain search", "trial": t.name, "problems": n, "seconds": seconds})
        prepare(recipe)
        t0 = time.perf_counter()
        grid = run_sweep(recipe, pools, verbose=0)
        sweep_s = time.perf_counter() - t0
        rows.append({"phase": f"tune sweep (max_concurrent_trials={recipe.max_concurrent_trials})",
                     "trial": f"{len(trials)} trials", "problems": len(problems) * len(trials), "seconds": sweep_s})
        rows.append({"phase": "plain search, all", "trial": f"{len(trials)} trials",
                     "problems": len(problems) * len(trials), "seconds": plain_total})
        figures = {"sweep_overhead": sweep_s / plain_total if plain_total else 0.0, "sweep_seconds": sweep_s,
                   "plain_seconds": plain_total, "trials": len(trials), "problems": len(problems),
                   "max_concurrent_trials": recipe.max_concurrent_trials, "trial_errors": len(grid.errors)}
    finally:
        pools.shutdown()
        if started_ray:
            ray.shutdown()
    return rows, figures
