"""Preference pairs for DPO and step-DPO, over the policy (and PRM) pools: one record per pair.

Three kinds (docs/algorithms.md, LPR and Step-DPO):

- `outcome` (LPR's plain DPO data): `samples` trajectories per question from the policy (LPR: 10, temperature
  0.8); every right one against every wrong one (distinct texts; a trajectory cut at `max_tokens` is neither: it
  has no answer, and DPO would append an EOS it never wrote). `max_pairs_per_problem` caps them (default: all).
- `prm` (LPR's PRM best-of pairs): the same trajectories scored by the PRM pool, reward = the `prm_aggregate`
  of the step scores (LPR: the product). chosen = the `prm_top` (10) right ones with the highest reward, each
  against the `prm_top` best-scored wrong ones, plus right-vs-right pairs among the chosen whose rewards differ by
  more than `prm_margin` (0.5). LPR's merge script keeps only a question's last pair; here each pair is its own
  record.
- `step` (Step-DPO): from Monte-Carlo step labels (`mc_data`, train.synthesize.mc_labels output): in each wrong
  trajectory the first bad step k is the first whose label (`bad_step_label`: the MC `hard` label, i.e. no
  completion of the prefix reached the answer; or `exact`, the toy checker's) is 0. From the prefix before step k
  the policy continues `continuations` times (Step-DPO: 20, temperature 0.8); chosen = the first step of the
  first continuation that ends right (and differs from the bad step), rejected = step k. The record's `prefix` is
  the shared steps before k; the trainer conditions on prompt + prefix and appends no EOS to either step.

Record (JSONL, one pair per line)::

    {"pair_id", "problem_id", "question", "answer", "level", "kind", "prompt", "prefix", "chosen", "rejected",
     "eos", ...kind-specific: "chosen_reward"/"rejected_reward" (prm), "step_index"/"right_continuations" (step)}

`eos` is true for whole responses (outcome, prm) and false for steps: what `train.dpo` appends.

Execution as every synthesis job (`train.synthesize.resumable`): one Ray task per problem (`num_cpus=0`, it waits
on the pools), at most `max_in_flight` in flight, a progress bar; `num_shards` / `shard` split the problems between
jobs (each writes its own output). Resumable: the pairs of a problem are appended and fsynced, then its id goes
into `OUTPUT.done` (with its pair count; a problem may give none); a restart skips the done problems and drops the
pairs of any problem that is not in the done file (a kill between the two writes) and a torn last line.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field, model_validator

from app.grading import grade
from app.pool_config import PRMPoolConfig
from train.synthesize.resumable import (SynthesisConfig, load_problems, make_prompt, pending, policy_pool, seed_of,
                                        write_records)
from train.synthesize.resumable import read_done as resumable_read_done


class PairsConfig(SynthesisConfig):
    """A `job: pairs` recipe (`ponder synthesize pairs --config RECIPE`). Defaults: LPR's and Step-DPO's."""

    job: Literal["pairs"] = "pairs"
    kinds: list[Literal["outcome", "prm", "step"]] = Field(["outcome"], min_length=1,
                                                           description="which pairs to make")
    prm: PRMPoolConfig | None = Field(None, description="the PRM pool (kind prm)")
    problems: str = Field("toy:train", description="toy:train, toy:test, a load_problems source, or `mc`: the "
                          "problems of mc_data")
    samples: int = Field(10, ge=2, description="trajectories per problem for outcome/prm pairs (LPR: 10)")
    temperature: float = Field(0.8, ge=0, description="sampling temperature, trajectories and continuations "
                               "(LPR and Step-DPO: 0.8)")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    step_delimiter: str = "\n\n"
    max_pairs_per_problem: int | None = Field(None, ge=1, description="outcome: at most this many right x wrong "
                                              "pairs per problem (default: all, as LPR)")
    prm_aggregate: Literal["prod", "min", "last", "mean"] = Field("prod", description="trajectory reward from the "
                                                                  "step scores (LPR: the product)")
    prm_top: int = Field(10, ge=1, description="prm: the best-rewarded right (chosen) and wrong (rejected) "
                         "trajectories kept (LPR: 10)")
    prm_margin: float = Field(0.5, ge=0, description="prm: right-vs-right pairs whose rewards differ by more "
                              "(LPR: 0.5)")
    mc_data: str | None = Field(None, description="step: MC step-label JSONL (train.synthesize.mc_labels)")
    bad_step_label: Literal["hard", "exact"] = Field("hard", description="step: which label finds the first bad "
                                                     "step (hard: MC, no completion right; exact: the toy checker's)")
    continuations: int = Field(20, ge=1, description="step: continuations of the prefix before the bad step "
                               "(Step-DPO: 20)")
    max_in_flight: int = Field(8, ge=1)
    seed: int = 0
    output: str = "runs/pairs.jsonl"
    progress: bool = True

    @model_validator(mode="after")
    def _needs(self):
        if "prm" in self.kinds and self.prm is None:
            raise ValueError("kinds: prm pairs need a `prm:` pool section (e.g. prm: {engine: hf, model: toy:prm})")
        if "step" in self.kinds and not self.mc_data:
            raise ValueError("kinds: step pairs need mc_data: the MC step labels (train.synthesize.mc_labels)")
        if self.problems == "mc" and not self.mc_data:
            raise ValueError("problems: mc takes the problems of mc_data, which is not set")
        return self


# --- the pairs of one problem (pure: tested on scripted trajectories) ------------------------------------------

def _base(problem: dict, prompt: str, kind: str, i: int) -> dict:
    return dict(pair_id=f"{problem['id']}:{kind}:{i}", problem_id=problem["id"], question=problem["question"],
                answer=problem["answer"], level=problem.get("level"), kind=kind, prompt=prompt)


def outcome_pairs(problem: dict, prompt: str, trajs: Sequence[tuple[str, bool, str]],
                  limit: int | None = None) -> list[dict]:
    """Every right x every wrong trajectory (text, right, finish_reason): distinct texts, none cut at max_tokens."""
    right, wrong = _split(trajs)
    out = []
    for c in right:
        for r in wrong:
            if limit is not None and len(out) >= limit:
                return out
            out.append(dict(_base(problem, prompt, "outcome", len(out)), prefix="", chosen=c, rejected=r, eos=True))
    return out


def _split(trajs):
    seen: set[str] = set()
    right, wrong = [], []
    for text, ok, finish in trajs:
        if finish == "length" or text in seen or not text.strip():
            continue
        seen.add(text)
        (right if ok else wrong).append(text)
    return right, wrong


def prm_pairs(problem: dict, prompt: str, trajs: Sequence[tuple[str, bool, str]], rewards: Sequence[float],
              top: int = 10, margin: float = 0.5) -> list[dict]:
    """LPR's best-of pairs: top right x top wrong by reward, plus right-vs-right pairs with reward gap > margin."""
    reward = {}
    for (text, _, _), r in zip(trajs, rewards):
        reward.setdefault(text, r)
    right, wrong = _split(trajs)
    right = sorted(right, key=lambda t: -reward[t])[:top]
    wrong = sorted(wrong, key=lambda t: -reward[t])[:top]
    pairs = [(c, r) for c in right for r in wrong]
    pairs += [(a, b) for i, a in enumerate(right) for b in right[i + 1:] if reward[a] - reward[b] > margin]
    return [dict(_base(problem, prompt, "prm", i), prefix="", chosen=c, rejected=r, eos=True,
                 chosen_reward=reward[c], rejected_reward=reward[r]) for i, (c, r) in enumerate(pairs)]


def first_bad_step(rec: dict, label: str = "hard") -> int | None:
    """Index of the first step whose label is 0 in a wrong trajectory's MC record; None if there is none. A step
    labelled null (OmegaPRM's output: a step no search ended at) is skipped."""
    if rec.get("correct"):
        return None
    labels = rec.get(label)
    if labels is None:
        raise ValueError(f"an MC record of {rec.get('problem_id')} has no {label!r} labels")
    return next((i for i, y in enumerate(labels) if y is not None and not y), None)


def step_candidates(records: Sequence[dict], label: str = "hard") -> list[tuple[list[str], str, int]]:
    """(prefix steps, bad step, its index) of each wrong trajectory's first bad step, each distinct one once."""
    out, seen = [], set()
    for rec in records:
        k = first_bad_step(rec, label)
        if k is None:
            continue
        key = ("".join(rec["steps"][:k]), rec["steps"][k])
        if key not in seen:
            seen.add(key)
            out.append((list(rec["steps"][:k]), rec["steps"][k], k))
    return out


def step_pairs(problem: dict, prompt: str, candidates, continuations: Sequence[Sequence[str]],
               delimiter: str = "\n\n") -> list[dict]:
    """chosen = the first step of the first continuation (of the prefix before the bad step) that ends right."""
    from app.search.tree import split_steps

    out = []
    for (prefix, bad, k), conts in zip(candidates, continuations):
        head = "".join(prefix)
        right = [t for t in conts if t.strip() and grade(head + t, problem["answer"])]
        for text in right:
            step = split_steps(text, delimiter)[0]
            if step.strip() and step != bad:
                out.append(dict(_base(problem, prompt, "step", len(out)), prefix=head, chosen=step, rejected=bad,
                                eos=False, step_index=k, right_continuations=len(right)))
                break
    return out


def pair_problem(policy, prm, problem: dict, mc_records: list[dict], c: PairsConfig) -> list[dict]:
    """All pairs of one problem. Runs inside a Ray task (the clients are picklable pool handles)."""
    from app.contracts import GenerationRequest
    from app.search.select import aggregate
    from app.search.tree import split_steps

    prompt = make_prompt(problem, c.prompt)
    base = seed_of(c.seed, problem["id"])
    out: list[dict] = []
    if {"outcome", "prm"} & set(c.kinds):
        comps = policy.generate([GenerationRequest(prompt, n=c.samples, max_tokens=c.max_tokens,
                                                   temperature=c.temperature, top_p=c.top_p, seed=base)])[0]
        trajs = [(x.text, grade(x.text, problem["answer"]), x.finish_reason) for x in comps]
        if "outcome" in c.kinds:
            out += outcome_pairs(problem, prompt, trajs, c.max_pairs_per_problem)
        if "prm" in c.kinds:
            scores = prm.score(problem["question"], [split_steps(t, c.step_delimiter) for t, _, _ in trajs])
            rewards = [aggregate(s, c.prm_aggregate) for s in scores]
            out += prm_pairs(problem, prompt, trajs, rewards, c.prm_top, c.prm_margin)
    if "step" in c.kinds and mc_records:
        cands = step_candidates(mc_records, c.bad_step_label)
        reqs = [GenerationRequest(prompt + "".join(pre), n=c.continuations, max_tokens=c.max_tokens,
                                  temperature=c.temperature, top_p=c.top_p, seed=seed_of(base, "".join(pre)))
                for pre, _, _ in cands]
        outs = policy.generate(reqs) if reqs else []
        out += step_pairs(problem, prompt, cands, [[x.text for x in group] for group in outs], c.step_delimiter)
    return out


# --- problems, resume, the run -----------------------------------------------------------------------------------

def read_mc(path: str | Path) -> dict[str, list[dict]]:
    """MC-label records by problem id."""
    from train.sft import read_jsonl

    by: dict[str, list[dict]] = {}
    for r in read_jsonl(path):
        by.setdefault(str(r["problem_id"]), []).append(r)
    return by


def load_problem_dicts(c: PairsConfig, mc: dict[str, list[dict]]) -> list[dict]:
    """All the recipe's problems (every shard: `resumable.pending` takes this job's)."""
    if c.problems == "mc":
        return [dict(id=pid, question=rs[0]["question"], answer=str(rs[0]["answer"]), level=rs[0].get("level"))
                for pid, rs in mc.items()]
    return load_problems(c.problems, c.n_per_level, c.levels, c.offset, c.limit, c.seed)


def read_done(path: str | Path) -> set[str]:
    """Problem ids whose pairs are all written. Pairs of other problems (a kill between the pairs and the done
    line) and torn last lines are dropped, each file rewritten once, atomically (`resumable.read_done`)."""
    return resumable_read_done(path)


def run(cfg: PairsConfig, pool=None, prm_pool=None) -> dict:
    """Write the pairs of `cfg` to `cfg.output`; starts (and stops) the pools it needs unless they are given."""
    import ray

    mc = read_mc(cfg.mc_data) if cfg.mc_data else {}
    problems, done = pending(load_problem_dicts(cfg, mc), cfg.output, cfg)
    stats: dict = dict(problems=len(problems), skipped=len(done), pairs=0, by_kind={}, seconds=0.0)
    if not problems:
        return stats
    own_prm = prm_pool is None and "prm" in cfg.kinds
    t0 = time.time()
    with policy_pool(cfg.policy, pool) as pool:
        try:
            if own_prm:
                from actors.prm import start_prm_pool

                prm_pool = start_prm_pool(cfg.prm)
            client = pool.client()
            prm = prm_pool.client() if prm_pool is not None else None
            task = ray.remote(num_cpus=0, max_retries=2)(pair_problem)
            submit = lambda p: task.remote(client, prm, p, mc.get(str(p["id"]), []), cfg)  # noqa: E731
            for _, records in write_records(cfg.output, problems, submit, cfg.max_in_flight, "pairs", cfg.progress):
                stats["pairs"] += len(records)
                for r in records:
                    stats["by_kind"][r["kind"]] = stats["by_kind"].get(r["kind"], 0) + 1
        finally:
            if own_prm and prm_pool is not None:
                prm_pool.shutdown()
    stats["seconds"] = time.time() - t0
    return stats


def check(cfg: PairsConfig) -> None:
    """Before Ray: mc_data exists and every record has what step pairs read (one line: file, line, field)."""
    if cfg.mc_data:
        from app.config import ConfigError
        from train.sft import check_records

        if not Path(cfg.mc_data).is_file():
            raise ConfigError(f"mc_data: file not found: {cfg.mc_data}")
        fields = {"problem_id": (str, int), "question": str, "answer": (str, int, float), "steps": list}
        if "step" in cfg.kinds:
            fields[cfg.bad_step_label] = list
        check_records(cfg.mc_data, fields, " (an MC step-label record: train.synthesize.mc_labels)")
