"""OmegaPRM (Luo et al. 2024; OpenR's MATH-APS, `data/omegaPRM_v2`): step labels by binary search, over the policy pool.

Per question (defaults OpenR's):

1. Filter: `filter_rollouts` (32) rollouts from the question; the question is kept only if at least one is right
   and one wrong (else it gives no records).
2. The root (the question alone) is estimated: MC(s) = right / total over `k` (16) rollouts from state s. A state
   with 0 < MC < 1 puts each of its wrong rollouts into the candidate pool; a state with MC > 0 adds each right
   rollout to the tree as a child with MC 1 (`keep_correct_rollouts`).
3. Up to `max_searches` (20) times, while fewer than `rollout_budget` (200) rollouts were spent: pick the candidate
   (s, r) with the largest Q + U, Q = alpha^(1 - MC(s)) * beta^(words(r) / L), U = c_puct * sqrt(visits of all
   states) / (1 + N(s)) (alpha 0.5, beta 0.9, L 500 words, c_puct 0.125; N(s) counts how often s was picked; a
   total of 0 counts as 1), and binary-search r's steps for the first prefix with MC = 0: probe the middle; MC = 0
   -> search the left half from the same state, else continue from the middle state on the right half. Every
   probed prefix is estimated (step 2's rule applies to it too) and becomes a node of the tree.
4. Labels: every node's MC is the soft label of its last step; the hard label is OpenR's "+": MC > 0.5.

Where ponder differs from OpenR's code, on purpose: the candidates' Q + U is computed afresh when one is picked
(OpenR's heap keeps stale priorities of states it did not touch); the picked (s, r) leaves the pool; a prefix
estimated once is reused, not estimated again (the tree is a prefix tree); a prefix that already states a final
answer is graded, not rolled out (no budget spent, as `mc_labels`); an estimate that would pass `rollout_budget` is
not started (OpenR checks the budget between searches only, so a search may overrun it).

Output: the MC-label format `train.prm` reads (`ponder train prm` trains on it directly; `mc_labels`' layout),
one record per leaf of the tree (its path from the root): `steps` (as the policy wrote them), `soft` = the MC of
the prefix ending at each step where an estimated prefix ends, null elsewhere (no loss there), `hard` = 1 if that
MC > 0.5, 0 if not, null elsewhere. A prefix on several paths is labelled in each (as `mc_labels` labels a prefix
that several trajectories share). Plus `problem_id`, `question`, `answer`, `level`, `sample`, `n_samples`, `k`, `correct` (the path ends in
a right final answer), `searches` and `rollouts` (the problem's), and `exact` (toy problems: the checker's true
step labels).

Execution and resume as every synthesis job (`train.synthesize.resumable`); a problem's searches are sequential
engine calls (each estimate one request of n = k), so `max_in_flight` problems in flight keep the pool busy.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from pydantic import Field

from app.grading import grade
from train.synthesize.mc_labels import has_final_answer
from train.synthesize.resumable import (SynthesisConfig, exact_checker, load_problems, make_prompt, pending,
                                        policy_pool, seed_of, write_records)


class OmegaConfig(SynthesisConfig):
    """A `job: omega` recipe (`ponder synthesize omega --config RECIPE`). Defaults: OpenR's OmegaPRM (MATH-APS)."""

    job: Literal["omega"] = "omega"
    filter_rollouts: int = Field(32, ge=0, description="rollouts from the question; kept only with one right and "
                                 "one wrong (OpenR: 32); 0 keeps every question")
    k: int = Field(16, ge=1, description="rollouts per MC estimate (OpenR: 16)")
    alpha: float = Field(0.5, gt=0, description="Q = alpha^(1 - MC) * beta^(words / L) (OpenR: 0.5)")
    beta: float = Field(0.9, gt=0, description="(OpenR: 0.9)")
    length_scale: int = Field(500, ge=1, description="L, in words (OpenR: 500)")
    c_puct: float = Field(0.125, ge=0, description="U = c_puct * sqrt(total visits) / (1 + N(s)) (OpenR: 0.125)")
    max_searches: int = Field(20, ge=1, description="binary searches per question (OpenR: 20)")
    rollout_budget: int = Field(200, ge=1, description="rollouts per question, the filter's not counted (OpenR: 200)")
    keep_correct_rollouts: bool = Field(True, description="a right rollout of an estimated state joins the tree "
                                        "with MC 1 (OpenR)")
    temperature: float = Field(0.7, ge=0, description="for every rollout")
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    step_delimiter: str = "\n\n"
    max_in_flight: int = Field(8, ge=1)
    seed: int = 0
    output: str = "runs/omega.jsonl"
    progress: bool = True


# --- the search (pure: a rollout function in, the tree out; tested with scripted MC values) -----------------------

@dataclass(eq=False)
class Node:
    steps: tuple[str, ...]
    mc: float
    parent: "Node | None" = None
    visits: int = 0
    children: list["Node"] = field(default_factory=list)


Rollouts = Callable[[Sequence[str]], list[tuple[str, bool]]]  # prefix steps -> k (text, right) rollouts


class OmegaSearch:
    """OmegaPRM over one question. `rollouts(prefix_steps)` returns the k rollouts of a prefix as (text, right);
    `final(prefix_text)` is the grade of a prefix that already states its answer, None for one that does not;
    `split(text)` cuts a rollout into steps (each keeping its delimiter)."""

    def __init__(self, rollouts: Rollouts, split: Callable[[str], list[str]], final: Callable[[str], bool | None],
                 *, alpha=0.5, beta=0.9, length_scale=500, c_puct=0.125, max_searches=20, rollout_budget=200,
                 k=16, keep_correct_rollouts=True):
        self.rollout_fn, self.split, self.final = rollouts, split, final
        self.alpha, self.beta, self.L, self.c_puct = alpha, beta, length_scale, c_puct
        self.max_searches, self.budget, self.k = max_searches, rollout_budget, k
        self.keep_correct = keep_correct_rollouts
        self.nodes: dict[tuple[str, ...], Node] = {}
        self.candidates: list[tuple[Node, str]] = []
        self.rollouts = 0
        self.searches = 0
        self.first_wrong: list[int | None] = []  # per search: the step index of the first MC = 0 prefix found

    def run(self) -> Node | None:
        root = self.estimate((), None)
        while self.searches < self.max_searches and self.rollouts < self.budget and self.candidates:
            node, rollout = self.pick()
            node.visits += 1
            self.first_wrong.append(self.binary_search(node, self.split(rollout)))
            self.searches += 1
        return root

    def q(self, node: Node, rollout: str) -> float:
        return self.alpha ** (1 - node.mc) * self.beta ** (len(rollout.split()) / self.L)

    def u(self, node: Node) -> float:
        total = sum(n.visits for n in self.nodes.values()) or 1
        return self.c_puct * math.sqrt(total) / (1 + node.visits)

    def pick(self) -> tuple[Node, str]:
        """The candidate with the largest Q + U now (the first of equals), taken out of the pool."""
        scores = [self.q(n, r) + self.u(n) for n, r in self.candidates]
        return self.candidates.pop(max(range(len(scores)), key=scores.__getitem__))

    def estimate(self, steps: tuple[str, ...], parent: Node | None) -> Node | None:
        """The node of `steps`: known, graded (a final answer), or rolled out k times; None when out of budget."""
        if steps in self.nodes:
            return self.nodes[steps]
        graded = self.final("".join(steps)) if steps else None
        outs: list[tuple[str, bool]] = []
        if graded is not None:
            mc = float(graded)
        else:
            if self.rollouts + self.k > self.budget:
                return None
            outs = self.rollout_fn(steps)
            self.rollouts += len(outs)
            mc = sum(ok for _, ok in outs) / len(outs) if outs else 0.0
        node = self._add(steps, mc, parent)
        if mc > 0 and self.keep_correct:
            for rollout, ok in outs:
                more = tuple(s for s in self.split(rollout) if s)
                if ok and more and steps + more not in self.nodes:
                    self._add(steps + more, 1.0, node)
        if 0 < mc < 1:
            self.candidates += [(node, rollout) for rollout, ok in outs if not ok and rollout.strip()]
        return node

    def _add(self, steps: tuple[str, ...], mc: float, parent: Node | None) -> Node:
        node = Node(steps, mc, parent)
        self.nodes[steps] = node
        if parent is not None:
            parent.children.append(node)
        return node

    def binary_search(self, node: Node, steps: Sequence[str]) -> int | None:
        """The first prefix of node + steps with MC = 0, by bisection; its last step's index in the whole path, or
        None when no probe found MC = 0 (or the budget ran out before one did)."""
        base, left, right, found = node, 0, len(steps) - 1, None
        while left <= right:
            mid = (left + right) // 2
            probe = self.estimate(base.steps + tuple(steps[left:mid + 1]), base)
            if probe is None:
                break
            if probe.mc == 0:
                right, found = mid - 1, len(probe.steps) - 1
            else:
                base, left = probe, mid + 1
        return found

    def records(self) -> list[tuple[list[str], list[float | None]]]:
        """(steps, soft labels) per leaf of the tree: at each step, the MC of the prefix ending there if that prefix
        was estimated (an ancestor, or a node the search left on another branch: a probe with MC 0 stays the child
        of the state it was probed from, while its one-step-shorter prefix may be probed later from elsewhere)."""
        out = []
        for leaf in (n for n in self.nodes.values() if n.steps and not n.children):
            soft: list[float | None] = [None] * len(leaf.steps)
            for i in range(len(leaf.steps)):
                node = self.nodes.get(leaf.steps[:i + 1])
                if node is not None:
                    soft[i] = node.mc
            out.append((list(leaf.steps), soft))
        return out


# --- over the policy pool ------------------------------------------------------------------------------------------

def omega_problem(client, problem: dict, c: OmegaConfig) -> list[dict]:
    """Filter, search, label one problem. Runs inside a Ray task."""
    from app.contracts import GenerationRequest
    from app.search.tree import split_steps

    prompt, gold = make_prompt(problem, c.prompt), problem["answer"]
    base = seed_of(c.seed, problem["id"])
    if c.filter_rollouts:
        first = client.generate([GenerationRequest(prompt, n=c.filter_rollouts, max_tokens=c.max_tokens,
                                                   temperature=c.temperature, top_p=c.top_p, seed=base)])[0]
        right = sum(bool(grade(x.text, gold)) for x in first)
        if right in (0, len(first)):
            return []

    def rollouts(steps: Sequence[str]) -> list[tuple[str, bool]]:
        head = "".join(steps)
        out = client.generate([GenerationRequest(prompt + head, n=c.k, max_tokens=c.max_tokens,
                                                 temperature=c.temperature, top_p=c.top_p,
                                                 seed=seed_of(base, "omega", head))])[0]
        return [(x.text, bool(grade(head + x.text, gold))) for x in out]

    search = OmegaSearch(rollouts, lambda t: split_steps(t, c.step_delimiter),
                         lambda t: bool(grade(t, gold)) if has_final_answer(t) else None,
                         alpha=c.alpha, beta=c.beta, length_scale=c.length_scale, c_puct=c.c_puct,
                         max_searches=c.max_searches, rollout_budget=c.rollout_budget, k=c.k,
                         keep_correct_rollouts=c.keep_correct_rollouts)
    search.run()
    return label_records(problem, search, c.k)


def label_records(problem: dict, search: OmegaSearch, k: int) -> list[dict]:
    """The search's paths as MC-label records (the module docstring's layout)."""
    exact = exact_checker(problem)
    paths = search.records()
    out = []
    for j, (steps, soft) in enumerate(paths):
        text = "".join(steps)
        rec = dict(problem_id=problem["id"], question=problem["question"], answer=problem["answer"],
                   level=problem.get("level"), sample=j, n_samples=len(paths), steps=steps, soft=soft,
                   hard=[None if p is None else int(p > 0.5) for p in soft], k=k,
                   correct=bool(has_final_answer(text) and grade(text, problem["answer"])),
                   searches=search.searches, rollouts=search.rollouts)
        if exact is not None:
            rec["exact"] = exact(steps)
        out.append(rec)
    return out


def agreement(records: Sequence[dict]) -> dict:
    """Against the toy checker (records with `exact`). `first_wrong`: the paths whose first MC = 0 step directly
    follows a step with MC > 0 (or is the first step): OmegaPRM located the first wrong step exactly; the share
    where the checker's first wrong step is the same one. `hard_agree`: of the distinct labelled prefixes, the
    share whose hard label ("+": MC > 0.5) equals the checker's."""
    firsts: dict[tuple[str, str], bool] = {}
    labels: dict[tuple[str, str], tuple[int, int]] = {}
    for r in records:
        if "exact" not in r:
            continue
        soft, pid = r["soft"], str(r["problem_id"])
        i = next((i for i, p in enumerate(soft) if p == 0), None)
        if i is not None and (i == 0 or (soft[i - 1] or 0) > 0):  # each located step once, however many paths
            firsts[(pid, "".join(r["steps"][:i + 1]))] = i == next((j for j, y in enumerate(r["exact"]) if not y), None)
        for j, (h, y) in enumerate(zip(r["hard"], r["exact"])):
            if h is not None:
                labels[(pid, "".join(r["steps"][:j + 1]))] = (h, y)
    same = sum(h == y for h, y in labels.values())
    return dict(first_wrong=len(firsts), first_wrong_agree=sum(firsts.values()) / len(firsts) if firsts else float("nan"),
                labelled_prefixes=len(labels), hard_agree=same / len(labels) if labels else float("nan"))


def run(cfg: OmegaConfig, pool=None) -> dict:
    """Write OmegaPRM's labels for the problems of `cfg` to `cfg.output`; starts (and stops) a policy pool unless
    one is given."""
    import ray

    all_problems = load_problems(cfg.problems, cfg.n_per_level, cfg.levels, cfg.offset, cfg.limit, cfg.seed)
    problems, done = pending(all_problems, cfg.output, cfg)
    stats: dict = dict(problems=len(problems), skipped=len(done), kept=0, records=0, labelled_steps=0, rollouts=0,
                       searches=0, seconds=0.0)
    if not problems:
        return stats
    t0 = time.time()
    with policy_pool(cfg.policy, pool) as pool:
        client = pool.client()
        task = ray.remote(num_cpus=0, max_retries=2)(omega_problem)
        for _, records in write_records(cfg.output, problems, lambda p: task.remote(client, p, cfg),
                                        cfg.max_in_flight, "omega", cfg.progress):
            stats["records"] += len(records)
            stats["labelled_steps"] += sum(p is not None for r in records for p in r["soft"])
            if records:
                stats["kept"] += 1
                stats["rollouts"] += records[0]["rollouts"]
                stats["searches"] += records[0]["searches"]
    stats["seconds"] = time.time() - t0
    return stats
