"""Monte-Carlo process supervision (Math-Shepherd): step labels from completions of every step prefix.

For each problem, `samples` trajectories are sampled from the policy; for every step prefix of each trajectory,
`k` completions are sampled and graded (defaults as RLHFlow's re-run of Math-Shepherd: 15 samples, k = 16,
temperature 0.7; the toy world's build uses fewer, see configs/toy/world.yaml). The step's
soft label is the fraction of completions that reach the right answer, its hard label 1 if any does. A prefix
that already holds a final answer needs no completions: its label is whether that answer is right. Identical
prefixes of one problem (two samples that agree on their first steps) are completed once.

`k=0` (toy problems only) samples the trajectories and labels every step with the toy world's exact checker
(`app.toy.checker.exact_step_labels`) instead of completions; identical trajectories of a problem are kept
once. A slip in a toy solution is never undone, so these are the limit of the hard labels as k grows, at the
cost of sampling alone: the toy PRM's training data (a tiny PRM needs ~10k labelled trajectories to learn to
check a sum, which Monte-Carlo completions would take hours to label on a laptop).

Execution: the policy runs as a replica pool (`actors.policy.start_policy_pool`); each problem is one Ray task
(`num_cpus=0`: it only waits on the pool) that sends its requests to `pool.client()` in two calls (the samples,
then all prefixes at once, so the engines see big batches); the driver keeps at most `max_in_flight` tasks in
flight and shows a progress bar; `num_shards` / `shard` split the problems between jobs (the bookkeeping every
synthesis job shares: `train.synthesize.resumable`).

Output: JSONL, append-only, one record per trajectory, all records of a problem written together::

    {"problem_id", "question", "answer", "level", "sample", "n_samples", "steps": [...], "soft": [...], "hard": [...],
     "k", "correct", "finish_reason", "exact": [...] (toy problems: the true step correctness)}

`steps` are as the policy wrote them (each ending in the step delimiter but the last): what `train.prm` and the
PRM actor lay out. Resumable: a problem is done once its id is in `OUTPUT.done` and all its `n_samples` records are
in OUTPUT (a file from before done files: the records alone decide); a torn last line is cut off.
"""
from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field, model_validator

from app.grading import grade
from train.synthesize.resumable import (SynthesisConfig, exact_checker, load_problems, make_prompt, pending,
                                        policy_pool, seed_of, write_records)
from train.synthesize.resumable import read_done as resumable_read_done


class MCLabelConfig(SynthesisConfig):
    """A `job: mc` recipe (`ponder synthesize mc --config RECIPE`), also the `mc:` section of the toy build."""

    job: Literal["mc"] = "mc"
    # Defaults: the published setting (RLHFlow's re-run of Math-Shepherd: 15 solutions per problem, 16 completions
    # per step, temperature 0.7). The toy world's recipe (configs/toy/world.yaml, `mc:`) passes smaller ones.
    samples: int = Field(15, ge=1, description="trajectories sampled per problem (published: 15)")
    k: int = Field(16, ge=0, description="completions per step prefix (published: 16); 0: toy problems only, label "
                   "steps with the toy world's exact checker instead (see the module docstring)")
    temperature: float = Field(0.7, ge=0, description="for the samples and the completions (published: 0.7)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(400, ge=1)
    step_delimiter: str = "\n\n"
    skip_after_zero: bool = Field(False, description="label 0 without completions once an earlier prefix of the trajectory got 0")
    max_in_flight: int = Field(8, ge=1)
    seed: int = 0
    output: str = "runs/mc_labels.jsonl"
    progress: bool = True

    @model_validator(mode="after")
    def _oracle_needs_toy(self):
        if self.k == 0 and self.problems not in ("toy:train", "toy:test"):
            raise ValueError(f"k=0 (exact step labels) needs toy:train or toy:test problems, not {self.problems!r}; "
                             "set k >= 1 for Monte-Carlo labels")
        return self




def has_final_answer(text: str) -> bool:
    """Does a prefix already state its final answer (a complete \\boxed{} or "The answer is ...")? Stricter than
    `extract_answer`, which falls back to the last number of any text."""
    from app.grading.extract import last_boxed

    return last_boxed(text) is not None or bool(re.search(r"[Tt]he (?:final )?answer is\s*\S", text))


def label_problem(client, problem: dict, c: MCLabelConfig) -> list[dict]:
    """Sample trajectories for one problem and label every step prefix. Runs inside a Ray task."""
    from app.contracts import GenerationRequest
    from app.search.tree import split_steps

    prompt = make_prompt(problem, c.prompt)
    gold = problem["answer"]
    base = seed_of(c.seed, problem["id"])
    first = client.generate([GenerationRequest(prompt, n=c.samples, max_tokens=c.max_tokens,
                                               temperature=c.temperature, top_p=c.top_p, seed=base)])[0]
    trajs = [split_steps(comp.text, c.step_delimiter) for comp in first]
    if c.k == 0:
        return _oracle_records(problem, first, trajs, c)
    # Every distinct prefix without a final answer gets k completions, in one call.
    prefixes: dict[str, None] = {}
    for steps in trajs:
        for i in range(len(steps)):
            text = "".join(steps[: i + 1])
            if not has_final_answer(text):
                prefixes.setdefault(text, None)
    keys = list(prefixes)
    if c.skip_after_zero:
        keys = _needed(keys, trajs, client, c, prompt, gold, base)
        labels = keys  # _needed returns the finished table
    else:
        reqs = [GenerationRequest(prompt + t, n=c.k, max_tokens=c.max_tokens, temperature=c.temperature,
                                  top_p=c.top_p, seed=seed_of(base, t)) for t in keys]
        outs = client.generate(reqs) if reqs else []
        labels = {t: sum(grade(t + o.text, gold) for o in group) / c.k for t, group in zip(keys, outs)}
    exact_fn = exact_checker(problem)
    records = []
    for j, (comp, steps) in enumerate(zip(first, trajs)):
        soft, zero = [], False
        for i in range(len(steps)):
            text = "".join(steps[: i + 1])
            if has_final_answer(text):
                p = float(grade(text, gold))
            elif zero and c.skip_after_zero:
                p = 0.0
            else:
                p = labels[text]
            zero = zero or p == 0.0
            soft.append(p)
        records.append(_record(problem, j, len(first), comp, steps, soft, c.k,
                               exact_fn(steps) if exact_fn is not None else None))
    return records


def _record(problem: dict, sample: int, n_samples: int, comp, steps: list[str], soft: list[float], k: int,
            exact: list[int] | None) -> dict:
    """One output line (the layout in the module docstring); the hard label is 1 where any completion was right."""
    rec = dict(problem_id=problem["id"], question=problem["question"], answer=problem["answer"],
               level=problem.get("level"), sample=sample, n_samples=n_samples, steps=steps, soft=soft,
               hard=[int(p > 0) for p in soft], k=k, correct=grade(comp.text, problem["answer"]),
               finish_reason=comp.finish_reason)
    if exact is not None:
        rec["exact"] = exact
    return rec


def _oracle_records(problem: dict, first: list, trajs: list[list[str]], c: MCLabelConfig) -> list[dict]:
    """k=0: each distinct trajectory once, soft = hard = the toy checker's exact step labels."""
    exact_fn = exact_checker(problem)
    seen: set[str] = set()
    keep = []
    for comp, steps in zip(first, trajs):
        if steps and comp.text not in seen:
            seen.add(comp.text)
            keep.append((comp, steps))
    records = []
    for j, (comp, steps) in enumerate(keep):
        exact = exact_fn(steps)
        records.append(_record(problem, j, len(keep), comp, steps, [float(x) for x in exact], 0, exact))
    return records


def _needed(keys, trajs, client, c, prompt, gold, base) -> dict:
    """skip_after_zero: complete prefixes depth by depth, and stop a trajectory after its first 0 label."""
    from app.contracts import GenerationRequest

    table: dict[str, float] = {}
    dead = [False] * len(trajs)
    depth = 0
    while True:
        todo = []
        for j, steps in enumerate(trajs):
            if dead[j] or depth >= len(steps):
                continue
            t = "".join(steps[: depth + 1])
            if not has_final_answer(t) and t not in table and t not in todo:
                todo.append(t)
        if not todo and all(dead[j] or depth >= len(s) for j, s in enumerate(trajs)):
            break
        if todo:
            reqs = [GenerationRequest(prompt + t, n=c.k, max_tokens=c.max_tokens, temperature=c.temperature,
                                      top_p=c.top_p, seed=seed_of(base, t)) for t in todo]
            for t, group in zip(todo, client.generate(reqs)):
                table[t] = sum(grade(t + o.text, gold) for o in group) / c.k
        for j, steps in enumerate(trajs):
            if depth < len(steps):
                t = "".join(steps[: depth + 1])
                if table.get(t) == 0.0:
                    dead[j] = True
        depth += 1
    return table


def load_problem_dicts(c: MCLabelConfig) -> list[dict]:
    return load_problems(c.problems, c.n_per_level, c.levels, c.offset, c.limit, c.seed)


def _complete(records: list[dict]) -> bool:
    """All of a problem's trajectories are written (each record carries how many there are)."""
    return len(records) == records[0].get("n_samples", len(records))


def read_done(path: Path) -> set[str]:
    """Problem ids already fully written (`resumable.read_done`). A killed run can leave a torn last line or a
    problem with only some of its records: those are dropped (the files are rewritten once, atomically) and the
    problem is redone."""
    return resumable_read_done(path, _complete)


def run(cfg: MCLabelConfig, pool=None) -> dict:
    """Label the problems of `cfg` into `cfg.output`. Starts (and stops) a policy pool unless one is given."""
    import ray

    problems, done = pending(load_problem_dicts(cfg), cfg.output, cfg, _complete)
    stats = dict(problems=len(problems), skipped=len(done), trajectories=0, steps=0, seconds=0.0)
    if not problems:
        return stats
    t0 = time.time()
    with policy_pool(cfg.policy, pool) as pool:
        client = pool.client()
        task = ray.remote(num_cpus=0, max_retries=2)(label_problem)
        for _, records in write_records(cfg.output, problems, lambda p: task.remote(client, p, cfg),
                                        cfg.max_in_flight, "mc labels", cfg.progress):
            stats["trajectories"] += len(records)
            stats["steps"] += sum(len(r["steps"]) for r in records)
    stats["seconds"] = time.time() - t0
    return stats


def read_labels(path: str | Path) -> list[dict]:
    from train.sft import read_jsonl

    return read_jsonl(path)


def summarize(records: Sequence[dict]) -> dict:
    """Share of correct trajectories and of positive steps, per level."""
    by: dict = {}
    for r in records:
        d = by.setdefault(r.get("level"), dict(trajectories=0, correct=0, steps=0, hard_pos=0, soft_sum=0.0))
        d["trajectories"] += 1
        d["correct"] += bool(r["correct"])
        d["steps"] += len(r["steps"])
        d["hard_pos"] += sum(r["hard"])
        d["soft_sum"] += sum(r["soft"])
    return by
