"""The run of a search recipe over a data set: one Ray task per problem (DVTS: one per subtree, and a join),
a bounded window of them in flight, each finished problem's record written at once.

    todo = pending(recipe, problems)              # what the output directory does not hold yet
    failures = solve_all(recipe, todo, pools, tokenizer)
    print(report(recipe, problems))

The driver receives the pools (anything with `.policy` and `.prm`, each giving picklable handles by `.client()`)
and the prompt tokenizer; it never starts them (`actors.pools.start_pools` does, in the job). Records are
append-only shards under `output_dir`, so a killed run resumes where it stopped.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from app.fanout import windowed
from app.problems import Problem, build_prompt
from app.search.record import parts_of, record_from_parts, solve_part
from app.search.recipe import SearchRecipe
from app.search.results import ResultsWriter, finished_ids, format_report, read_records, write_run_config


def make_prompt(problem: Problem, recipe: SearchRecipe, tokenizer: Any) -> str:
    return build_prompt(problem, tokenizer=tokenizer, template=recipe.prompt.template,
                        system_prompt=recipe.prompt.system_prompt)


def pending(recipe: SearchRecipe, problems: Sequence[Problem]) -> list[Problem]:
    """The problems not yet in `output_dir`; a directory written by a different run is refused (ConfigError)."""
    out_dir = Path(recipe.output_dir)
    write_run_config(out_dir, {**recipe.identity(), "config": recipe.model_dump(mode="json")}, list(recipe.identity()))
    done = finished_ids(out_dir)
    return [p for p in problems if p.id not in done]


# ---------------------------------------------------------------- Ray tasks (made on first use: importing needs no Ray)

_TASKS: dict[str, Any] = {}


def _solve(problem: Problem, prompt: str, recipe: SearchRecipe, policy_pool: Any, prm_pool: Any) -> dict:
    part = _part(prompt, problem.question, recipe, policy_pool, prm_pool, None)
    return record_from_parts(problem, recipe.method, recipe.search, [part], exact_grouping=recipe.selection.exact_grouping)


def _part(prompt: str, question: str, recipe: SearchRecipe, policy_pool: Any, prm_pool: Any, index: int | None) -> dict:
    policy = policy_pool.client()
    prm = prm_pool.client() if prm_pool is not None else None
    return solve_part(prompt, question, recipe.method, recipe.search, policy, prm, index)


def _join(problem: Problem, recipe: SearchRecipe, *parts: dict) -> dict:
    return record_from_parts(problem, recipe.method, recipe.search, list(parts),
                             exact_grouping=recipe.selection.exact_grouping)


def _tasks() -> dict[str, Any]:
    if not _TASKS:
        import ray

        _TASKS.update(solve=ray.remote(_solve), part=ray.remote(_part), join=ray.remote(_join))
    return _TASKS


def submit(problem: Problem, prompt: str, recipe: SearchRecipe, pools: Any):
    """One problem's record as an ObjectRef: one task, or (DVTS) one task per subtree and a join."""
    t = _tasks()
    opts = {"num_cpus": recipe.task_cpus}
    parts = parts_of(recipe.method, recipe.search)
    if parts == [None]:
        return t["solve"].options(**opts).remote(problem, prompt, recipe, pools.policy, pools.prm)
    refs = [t["part"].options(**opts).remote(prompt, problem.question, recipe, pools.policy, pools.prm, i)
            for i in parts]
    return t["join"].options(**opts).remote(problem, recipe, *refs)


def solve_all(recipe: SearchRecipe, todo: Sequence[Problem], pools: Any, tokenizer: Any = None) -> list[tuple[str, str]]:
    """Solve `todo`, writing each record as it arrives; returns (problem id, one-line error) of the failures."""
    from tqdm import tqdm

    failures: list[tuple[str, str]] = []
    writer = ResultsWriter(Path(recipe.output_dir))
    bar = tqdm(total=len(todo), unit="problem", disable=not recipe.progress, dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0
    try:
        for problem, record, error in windowed(
                todo, lambda p: submit(p, make_prompt(p, recipe, tokenizer), recipe, pools), recipe.max_in_flight):
            bar.update(1)
            if error is not None:  # failed after the pool's retries: reported, left for a rerun
                failures.append((problem.id, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))
                continue
            writer.write(record)
            tokens += int(record["compute"].get("generated_tokens", 0))
            bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.perf_counter() - start):.0f}", failed=len(failures))
    finally:
        bar.close()
        writer.close()
    return failures


def report(recipe: SearchRecipe, problems: Sequence[Problem]) -> str:
    """The accuracy table of the records of `problems` in `output_dir`."""
    ids = {p.id for p in problems}
    records = [r for r in read_records(recipe.output_dir) if r["id"] in ids]
    return format_report(records, by_level=True, title=str(recipe.output_dir))
