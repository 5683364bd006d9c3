"""`ponder search --config RECIPE [key=value ...]` (= `python -m jobs.search`): solve a data set with a search method.

The recipe (`app.search.recipe.SearchRecipe`, e.g. configs/toy/beam_search.yaml) is validated whole before Ray
starts, and so are its inputs: the problems (none, or an id twice, is an error), the model paths, and the prompt
of the first problem (a chat template the tokenizer lacks). The job then starts the policy (and PRM) pools, hands
them to the search driver (`app.search.driver`: a bounded window of Ray tasks, each record written as it arrives),
and prints how many problems it solved, failed and missed, and the accuracy table per selection rule and n over
all of them, with compute per problem. Started again with the same recipe, it skips the problems already written
(a killed run resumes) and retries the failed ones; with nothing left to do it starts no pools.
"""
from __future__ import annotations

import sys
from typing import Sequence

from actors.engines.base import load_tokenizer
from actors.pools import start_pools
from actors.replicas import check_model
from app.search import driver
from app.run_lock import RunLock
from app.search.recipe import SearchRecipe
from app.toy import resolve_model
from app.storage import check_output_path
from jobs.common import dry_run, init_ray, parse_config, recipe_parser, user_errors

Config = SearchRecipe  # the job's config class (`ponder config show` finds it here)


def pool_configs(recipe: SearchRecipe):
    return recipe.pool_configs()


def prompt_tokenizer(recipe: SearchRecipe):
    """The tokenizer chat-template prompts are rendered with; None for plain and toy prompts."""
    name = recipe.tokenizer_name
    return load_tokenizer(resolve_model(name)) if name else None


def check_models(recipe: SearchRecipe) -> None:
    """A model path that does not exist is one line naming its key, before Ray starts (Hub ids are not checked)."""
    names = [("policy.model", recipe.policy.model)]
    if recipe.search.needs_prm and recipe.prm is not None and recipe.prm.format != "toy-checker":
        names.append(("prm.model", recipe.prm.model))
    if recipe.prompt.tokenizer and recipe.tokenizer_name:
        names.append(("prompt.tokenizer", recipe.prompt.tokenizer))
    for key, name in names:
        check_model(name, key)


def run(recipe: SearchRecipe, out=None, dry: bool = False) -> int:
    out = out or sys.stdout
    policy_cfg, prm_cfg = pool_configs(recipe)
    check_output_path(recipe.output_dir, "output_dir", writable=not dry)
    check_models(recipe)
    if dry:
        return dry_run({"policy": policy_cfg, **({"prm": prm_cfg} if prm_cfg is not None else {})}, out,
                       num_cpus=recipe.num_cpus)
    problems, everything = driver.load(recipe)  # bad data is one line here, before anything is written
    tokenizer = prompt_tokenizer(recipe)
    driver.make_prompt(problems[0], recipe, tokenizer)  # a template the tokenizer cannot render fails here, not in Ray
    with RunLock.for_dir(recipe.output_dir, f"search {recipe.method}"):  # one run per output_dir
        return _run(recipe, policy_cfg, prm_cfg, problems, everything, tokenizer, out)


def _run(recipe: SearchRecipe, policy_cfg, prm_cfg, problems, everything, tokenizer, out) -> int:
    todo = driver.pending(recipe, problems, everything)
    print(f"search: {recipe.method} on {len(problems)} problems from {recipe.data.source}; {len(problems) - len(todo)} "
          f"already in {recipe.output_dir}, {len(todo)} to solve", file=out, flush=True)
    failures: list = []
    if todo:
        init_ray(recipe.num_cpus)
        pools = start_pools(policy_cfg, prm_cfg)
        try:
            failures = driver.solve_all(recipe, todo, pools, tokenizer)
        finally:
            pools.shutdown()
    print(driver.report(recipe, problems), file=out, flush=True)
    if failures:
        print(f"{len(failures)} problems failed (run the same command again to retry them):", file=out)
        for pid, err in failures[:10]:
            print(f"  {pid}: {err}", file=out)
        return 1
    return 0


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_parser("ponder search", "Solve a data set with a search method against a verifier.")
    args = parser.parse_args(argv)
    return run(parse_config(SearchRecipe, args), dry=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
