"""`ponder tune --config RECIPE [key=value ...]` (= `python -m jobs.tune`): a compute-budget sweep on Ray Tune.

The recipe (`tune.sweep.SweepRecipe`, e.g. configs/toy/sweep_quick.yaml) is validated whole before Ray starts (an
unknown method, an N <= 0, an empty grid: one line naming the file and the key), and so are the output path (the
`<shared>` placeholder of the cluster recipes is refused), the model paths and the first prompt. The job then
starts the policy (and PRM) pools ONCE, runs every trial of the grid as a Tune trial against them (each a search
run writing `ponder search` records under output_dir/trials/<trial>/), and writes and prints the compute-optimal
frontier, held out (`tune.frontier`: frontier.json, frontier.md, frontier_*.png in output_dir).

Started again with the same recipe it resumes: Tune restores the experiment (finished trials are not run again)
and each unfinished trial keeps the problems it solved; with every trial finished it starts no pools and only
writes the frontier again.
"""
from __future__ import annotations

import os
import sys
from typing import Sequence

from actors.pools import start_pools
from app.config import ConfigError, resolve_recipe
from app.search import driver
from app.storage import check_output_path
from jobs.common import dry_run, init_ray, parse_config, recipe_parser, user_errors
from jobs.search import check_models, prompt_tokenizer
from tune import frontier
from tune.sweep import SweepRecipe, prepare, run_sweep

Config = SweepRecipe  # the job's config class


def check(recipe: SweepRecipe, source: str) -> None:
    """What can be checked before Ray starts: the output path, the pools, the models, the first prompt."""
    try:
        check_output_path(recipe.output_dir, "output_dir", writable=True)
        recipe.pool_configs()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    trials = recipe.trials()
    for t in (trials[0], *[t for t in trials if recipe.search_recipe(t).search.needs_prm][:1]):
        check_models(recipe.search_recipe(t))
    first = recipe.search_recipe(trials[0])
    problems, _ = driver.load(first)
    driver.make_prompt(problems[0], first, prompt_tokenizer(first))


def run(recipe: SweepRecipe, source: str = "<recipe>", out=None, dry: bool = False) -> int:
    out = out or sys.stdout
    check(recipe, source)
    if dry:  # the shared pools plus the trials' own reservations, checked against the cluster
        policy_cfg, prm_cfg = recipe.pool_configs()
        trials = [[{"CPU": recipe.trial_cpus}]] * recipe.max_concurrent_trials
        return dry_run({"policy": policy_cfg, **({"prm": prm_cfg} if prm_cfg is not None else {})}, out,
                       extra={"tune": trials}, num_cpus=recipe.cluster_cpus(os.cpu_count() or 2))
    from app.run_lock import RunLock

    with RunLock.for_dir(recipe.output_dir, "tune"):  # one sweep per output_dir
        return _run(recipe, out)


def _run(recipe: SweepRecipe, out) -> int:
    left = prepare(recipe)
    trials = recipe.trials()
    done = [t for t in trials if left[t.name] == 0]
    print(f"tune: {len(trials)} trials ({', '.join(sorted({t.method for t in trials}))}) into {recipe.output_dir}; "
          f"{len(done)} finished, {len(trials) - len(done)} to run, {sum(left.values())} problems to solve",
          file=out, flush=True)
    errors: list = []
    if len(done) < len(trials):
        policy_cfg, prm_cfg = recipe.pool_configs()
        init_ray(recipe.cluster_cpus(os.cpu_count() or 2))
        pools = start_pools(policy_cfg, prm_cfg)
        try:
            errors = list(run_sweep(recipe, pools, out=out).errors)
        finally:
            pools.shutdown()
    _, text, pngs = frontier.write(recipe.output_dir)
    print(text, file=out)
    print(f"frontier: {recipe.output_dir}/frontier.json, frontier.md, {', '.join(p.name for p in pngs)}", file=out)
    if errors:
        print(f"{len(errors)} trials failed (run the same command again to retry their failed problems):", file=out)
        for e in errors[:10]:
            print(f"  {driver.one_line(e)}", file=out)
        return 1
    return 0


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_parser("ponder tune", "Sweep test-time compute budgets on Ray Tune and find the frontier.")
    args = parser.parse_args(argv)
    source = str(resolve_recipe(args.config)) if args.config else "<defaults>"
    return run(parse_config(SweepRecipe, args), source, dry=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
