"""LPR's intermediate states (Jiao et al. 2024, SparkJiao/dpo-trajectory-reasoning): PRM data from the policy pool.

For each question the SFT policy samples `samples` trajectories (LPR: 10, temperature 0.8); ponder's step is a
"\\n\\n" chunk. A trajectory of L steps offers the prefixes of int(start * L) .. L - 1 steps (LPR: start 0.2: the
states end in the last 0.8 of the trajectory; they are not drawn from the first 0.2), each kept with probability
`ratio` (LPR's default 0.4; their published data 0.3). Each kept state is completed `completions` times (LPR: 3, at
temperature 0.7, top_p 0.8); its value v is how many of the completions reach the right answer (0..3). A state
with an empty completion is dropped, as LPR does. The PRM data are (question + state, v) for every state, plus
(question + full trajectory, 3 if right else 0): a 4-way head on the last token, trained with cross-entropy
(`ponder train prm` with `format: lpr`); its step score is P(v >= 2) (`actors.prm_formats.LPRFormat`).

ponder's choices where LPR's code is silent or wasteful: an empty state (0 steps: the question alone) is never
kept; a state (or full trajectory) that two samples share is one record, completed once (a duplicate only
re-weights the data); a trajectory cut at `max_tokens` is a full trajectory of value 0 (it has no answer).
The keep-draws are seeded per (seed, problem, sample), so a rerun or another batching keeps the same states.

Execution and resume as every synthesis job (`train.synthesize.resumable`): one Ray task per problem over the
policy pool, two engine calls per problem (the samples, then every state's completions at once), `max_in_flight`
problems in flight, OUTPUT + OUTPUT.done, `num_shards` / `shard`.

Output: JSONL, one record per state or full trajectory::

    {"problem_id", "question", "answer", "level", "kind": "state" | "full", "sample", "steps": [...],
     "value": 0..completions, "completions", "correct", "exact": [...] (toy problems: the true step labels)}

`steps` are as the policy wrote them (a state's last step keeps its delimiter): what `train.prm` lays out.
"""
from __future__ import annotations

import random
import time
from typing import Literal, Sequence

from pydantic import Field

from app.grading import grade
from train.synthesize.resumable import (SynthesisConfig, exact_checker, load_problems, make_prompt, pending,
                                        policy_pool, seed_of, write_records)


class StatesConfig(SynthesisConfig):
    """A `job: states` recipe (`ponder synthesize states --config RECIPE`). Defaults: LPR's."""

    job: Literal["states"] = "states"
    samples: int = Field(10, ge=1, description="trajectories sampled per question (LPR: 10)")
    temperature: float = Field(0.8, ge=0, description="for the trajectories (LPR: 0.8)")
    top_p: float = Field(1.0, gt=0, le=1, description="for the trajectories (LPR: 1.0)")
    max_tokens: int = Field(512, ge=1, description="per trajectory and per completion")
    step_delimiter: str = "\n\n"
    start: float = Field(0.2, ge=0, lt=1, description="states have int(start * L) .. L - 1 of a trajectory's L "
                         "steps (LPR: 0.2)")
    ratio: float = Field(0.4, gt=0, le=1, description="each such prefix is kept with this probability (LPR's "
                         "default: 0.4; their published data: 0.3)")
    completions: int = Field(3, ge=1, description="completions per state; its value is how many end right "
                             "(LPR: 3, so values 0..3 and a 4-way PRM head)")
    completion_temperature: float = Field(0.7, ge=0, description="for the completions (LPR: 0.7)")
    completion_top_p: float = Field(0.8, gt=0, le=1, description="for the completions (LPR: 0.8)")
    full: bool = Field(True, description="also a record per full trajectory, value `completions` if right else 0 "
                       "(LPR's PRM data)")
    max_in_flight: int = Field(8, ge=1)
    seed: int = 0
    output: str = "runs/states.jsonl"
    progress: bool = True


# --- pure: which states, their values (tested on scripted data) -------------------------------------------------

def state_lengths(n_steps: int, ratio: float, start: float, rng: random.Random) -> list[int]:
    """The prefix lengths (steps in the state) kept from a trajectory of `n_steps`: each of
    max(1, int(start * n_steps)) .. n_steps - 1 with probability `ratio`, one draw each in that order."""
    return [k for k in range(max(1, int(start * n_steps)), n_steps) if rng.random() < ratio]


def state_value(state: str, completions: Sequence[str], gold: str) -> int | None:
    """How many completions of `state` reach `gold`; None (drop the state) when one completion is empty."""
    if any(not c.strip() for c in completions):
        return None
    return sum(bool(grade(state + c, gold)) for c in completions)


def pick_states(trajectories: Sequence[Sequence[str]], ratio: float, start: float, seed: int) -> list[tuple[int, list[str]]]:
    """(sample index, state steps) of every distinct kept state, in sample order; draws seeded per sample."""
    out, seen = [], set()
    for j, steps in enumerate(trajectories):
        rng = random.Random(seed_of(seed, "states", j))
        for k in state_lengths(len(steps), ratio, start, rng):
            text = "".join(steps[:k])
            if text not in seen:
                seen.add(text)
                out.append((j, list(steps[:k])))
    return out


def records_of(problem: dict, trajectories: Sequence[tuple[list[str], bool, str]],
               states: Sequence[tuple[int, list[str]]], values: Sequence[int | None], completions: int,
               full: bool = True) -> list[dict]:
    """The records of one problem: every state with a value, then every distinct full trajectory (3 / 0)."""
    exact = exact_checker(problem)
    base = dict(problem_id=problem["id"], question=problem["question"], answer=problem["answer"],
                level=problem.get("level"), completions=completions)

    def record(kind, sample, steps, value, correct):
        r = dict(base, kind=kind, sample=sample, steps=list(steps), value=value, correct=correct)
        if exact is not None:
            r["exact"] = exact(steps)
        return r

    out = [record("state", j, steps, v, v > 0) for (j, steps), v in zip(states, values) if v is not None]
    if full:
        seen: set[str] = set()
        for j, (steps, right, _) in enumerate(trajectories):
            text = "".join(steps)
            if text.strip() and text not in seen:
                seen.add(text)
                out.append(record("full", j, steps, completions if right else 0, bool(right)))
    return out


def states_problem(client, problem: dict, c: StatesConfig) -> list[dict]:
    """Sample, pick the states, complete them (one call for all), value them. Runs inside a Ray task."""
    from app.contracts import GenerationRequest
    from app.search.tree import split_steps

    prompt = make_prompt(problem, c.prompt)
    base = seed_of(c.seed, problem["id"])
    comps = client.generate([GenerationRequest(prompt, n=c.samples, max_tokens=c.max_tokens,
                                               temperature=c.temperature, top_p=c.top_p, seed=base)])[0]
    trajs = [(split_steps(x.text, c.step_delimiter), grade(x.text, problem["answer"]), x.finish_reason)
             for x in comps]
    states = pick_states([t[0] for t in trajs], c.ratio, c.start, base)
    reqs = [GenerationRequest(prompt + "".join(s), n=c.completions, max_tokens=c.max_tokens,
                              temperature=c.completion_temperature, top_p=c.completion_top_p,
                              seed=seed_of(base, "".join(s))) for _, s in states]
    outs = client.generate(reqs) if reqs else []
    values = [state_value("".join(s), [o.text for o in group], problem["answer"]) for (_, s), group in zip(states, outs)]
    return records_of(problem, trajs, states, values, c.completions, c.full)


def run(cfg: StatesConfig, pool=None) -> dict:
    """Write the states of `cfg` to `cfg.output`; starts (and stops) a policy pool unless one is given."""
    import ray

    all_problems = load_problems(cfg.problems, cfg.n_per_level, cfg.levels, cfg.offset, cfg.limit, cfg.seed)
    problems, done = pending(all_problems, cfg.output, cfg)
    stats: dict = dict(problems=len(problems), skipped=len(done), records=0, state=0, full=0,
                       values={v: 0 for v in range(cfg.completions + 1)}, seconds=0.0)
    if not problems:
        return stats
    t0 = time.time()
    with policy_pool(cfg.policy, pool) as pool:
        client = pool.client()
        task = ray.remote(num_cpus=0, max_retries=2)(states_problem)
        for _, records in write_records(cfg.output, problems, lambda p: task.remote(client, p, cfg),
                                        cfg.max_in_flight, "states", cfg.progress):
            stats["records"] += len(records)
            for r in records:
                stats[r["kind"]] += 1
                if r["kind"] == "state":
                    stats["values"][r["value"]] += 1
    stats["seconds"] = time.time() - t0
    return stats
