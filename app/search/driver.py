"""The run of a search recipe over a data set: one Ray task per problem, a bounded window of them in flight
(`app.fanout.windowed`), each finished problem's record written at once.

    problems, everything = load(recipe)           # this job's problems (its shard), and all the run's (id -> level)
    todo = pending(recipe, problems, everything)  # what the output directory does not hold yet
    failures = solve_all(recipe, todo, pools, tokenizer)
    print(report(recipe, problems))               # every problem counts: a failed or missing one is wrong

The driver receives the pools (anything with `.policy` and `.prm`, each giving picklable handles by `.client()`)
and the prompt tokenizer; it never starts them (`actors.pools.start_pools` does, in the job). Records are
append-only shards under `output_dir`, so a killed run resumes where it stopped; `problems.json` there holds every
problem the run set out to solve and `failures.jsonl` the ones that failed, so that `ponder report` counts them.

`max_in_flight` bounds the Ray tasks in flight, and a problem is one task whatever the method: DVTS runs a
problem's n / M subtrees in threads inside its task (they wait on the actors side by side), so a recipe with
n = 256 never starts thousands of worker processes.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from app.config import ConfigError
from app.datasets import load_problems, shard_problems
from app.fanout import windowed
from app.problems import Problem, build_prompt
from app.search.record import parts_of, record_from_parts, solve_part
from app.search.recipe import SearchRecipe
from app.search.results import (ResultsWriter, Tally, clear_failures, finished_ids, format_run, iter_records,
                                read_failures, write_failure, write_plan, write_run_config)


def make_prompt(problem: Problem, recipe: SearchRecipe, tokenizer: Any) -> str:
    return build_prompt(problem, tokenizer=tokenizer, template=recipe.prompt.template,
                        system_prompt=recipe.prompt.system_prompt)


def load(recipe: SearchRecipe) -> tuple[list[Problem], dict[str, Any]]:
    """This job's problems (its `data.shard`), and every problem of the run, all shards (id -> level).

    A selection with no problem in it is a ConfigError naming the key that emptied it."""
    d = recipe.data
    everything = load_problems(d.source, limit=d.limit, shuffle_seed=d.shuffle_seed, split=d.split, subset=d.subset)
    if not everything:
        raise ConfigError(f"data.limit: {d.limit} leaves no problems of {d.source} to solve; give data.limit >= 1 "
                          "(or leave it out for all of them)")
    problems = shard_problems(everything, d.shard)
    if not problems:
        raise ConfigError(f"data.shard: shard {d.shard} holds no problems (the run has {len(everything)}); "
                          "use fewer shards")
    return problems, {p.id: p.level for p in everything}


def pending(recipe: SearchRecipe, problems: Sequence[Problem], everything: dict[str, Any] | None = None) -> list[Problem]:
    """The problems not yet in `output_dir`; a directory written by a different run is refused (ConfigError).

    Records the run's problems (`everything`, by default `problems`) in problems.json, the report's denominator."""
    out_dir = Path(recipe.output_dir)
    write_run_config(out_dir, {**recipe.identity(), "config": recipe.model_dump(mode="json")}, list(recipe.identity()))
    write_plan(out_dir, everything if everything is not None else {p.id: p.level for p in problems})
    done = finished_ids(out_dir)
    clear_failures(out_dir, done)
    return [p for p in problems if p.id not in done]


# ---------------------------------------------------------------- Ray tasks (made on first use: importing needs no Ray)

_TASKS: dict[str, Any] = {}


def _solve(problem: Problem, prompt: str, recipe: SearchRecipe, policy_pool: Any, prm_pool: Any) -> dict:
    """One problem, in one Ray task. A method that runs in parts (DVTS: its subtrees) runs them in threads here,
    each with its own clients: they wait on the actors side by side, and the problem stays one task in the window."""
    parts = parts_of(recipe.method, recipe.search)

    def run(index: int | None) -> dict:
        policy = policy_pool.client()
        prm = prm_pool.client() if prm_pool is not None else None
        return solve_part(prompt, problem.question, recipe.method, recipe.search, policy, prm, index,
                          problem_id=problem.id)

    if parts == [None]:
        done = [run(None)]
    else:
        with ThreadPoolExecutor(max_workers=len(parts), thread_name_prefix=f"{recipe.method}-part") as pool:
            done = list(pool.map(run, parts))
    return record_from_parts(problem, recipe.method, recipe.search, done, exact_grouping=recipe.selection.exact_grouping)


def _tasks() -> dict[str, Any]:
    if not _TASKS:
        import ray

        _TASKS.update(solve=ray.remote(_solve))
    return _TASKS


def submit(problem: Problem, prompt: str, recipe: SearchRecipe, pools: Any):
    """One problem's record as an ObjectRef: one task, whatever the method.

    The task is scheduled on the cluster ("DEFAULT"), never in the caller's placement group: called from a Tune
    trial, whose placement group captures child tasks, it would otherwise wait for the trial's own bundle."""
    return _tasks()["solve"].options(num_cpus=recipe.task_cpus, scheduling_strategy="DEFAULT").remote(
        problem, prompt, recipe, pools.policy, pools.prm)


def one_line(error: BaseException) -> str:
    """`Type: first line` of the error that raised inside the task (the cause a RayTaskError wraps)."""
    seen = 0
    while getattr(error, "cause", None) is not None and error.cause is not error and seen < 8:
        error, seen = error.cause, seen + 1
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def solve_all(recipe: SearchRecipe, todo: Sequence[Problem], pools: Any, tokenizer: Any = None) -> list[tuple[str, str]]:
    """Solve `todo`, writing each record as it arrives and each failure to failures.jsonl; returns (problem id,
    one-line error) of the failures."""
    from tqdm import tqdm

    failures: list[tuple[str, str]] = []
    out_dir = Path(recipe.output_dir)
    writer = ResultsWriter(out_dir)
    bar = tqdm(total=len(todo), unit="problem", disable=not recipe.progress, dynamic_ncols=True)
    start, tokens = time.perf_counter(), 0
    try:
        for problem, record, error in windowed(
                todo, lambda p: submit(p, make_prompt(p, recipe, tokenizer), recipe, pools), recipe.max_in_flight):
            bar.update(1)
            if error is not None:
                failures.append((problem.id, one_line(error)))
                write_failure(out_dir, problem.id, failures[-1][1])
                continue
            writer.write(record)
            tokens += int(record["compute"].get("generated_tokens", 0))
            bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.perf_counter() - start):.0f}", failed=len(failures))
    finally:
        bar.close()
        writer.close()
        clear_failures(out_dir)  # the problems this run solved are failed no more
    return failures


def report(recipe: SearchRecipe, problems: Sequence[Problem]) -> str:
    """The accuracy table over `problems` (a failed or missing one counts as wrong), from `output_dir`."""
    expected = {p.id: p.level for p in problems}
    tally = Tally(expected, by_level=True)  # streamed: no record is held
    for rec in iter_records(recipe.output_dir):
        if rec["id"] in expected:
            tally.add(rec)
    failed = [pid for pid in read_failures(recipe.output_dir, done=tally.ids) if pid in expected]
    return format_run(tally, by_level=True, title=str(recipe.output_dir), expected=expected, failed=failed)
