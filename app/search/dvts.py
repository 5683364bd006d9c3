"""Diverse Verifier Tree Search (search-and-learn `dvts`): n/M independent subtrees, each a greedy walk on the PRM.

    for each subtree (n / beam_width of them; ponder runs each as its own Ray task):
        beam = root
        for it in range(num_iterations):
            if not live: break
            cands = sample M next steps from beam (+ `lookahead` greedy steps each; the last iteration runs to EOS,
                    each such continuation split into the steps it holds)
            if fewer than M came back: stop after this iteration
            scores = PRM(question, beam + cand (+ lookahead)) for cand in cands
            prev, beam = beam, beam + cands[argmax aggregate(scores)]
            stop if the chosen step is empty or ended at EOS, or beam's text contains "boxed{"
        output the M final siblings prev + cand_i, each with its own scores
    -> n completions per problem, in contiguous groups of M (one per subtree; selection keeps groups whole)

Defaults as search-and-learn: n=4, beam_width M=4, num_iterations 40, lookahead 0, temperature 0.8, top_p 1.0,
max_tokens 2048 (per step call, as theirs), agg_strategy last, seed 42; n % M == 0.

ponder differs on purpose: the optional `max_total_tokens` (off by default) bounds a whole trajectory's generated
tokens (each step call gets at most what is left) and a subtree whose bound is spent, or whose chosen step hit
the length limit, stops too; the last iteration's continuations (no stop string) are split into the steps they
hold before they are scored and kept (one score per real step, as the reference re-splits texts before scoring);
the kept per-step scores of an output are those of its own steps (the lookahead's scores served only to choose);
request seeds derive from the problem and the subtree index, so a subtree gives the same result whether it runs
alone (a Ray task) or batched with the others.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import Field, model_validator

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import Candidate, StepwiseConfig, problem_key, require_prm, sample_next_steps, score_paths
from app.search.select import aggregate
from app.search.tree import Node, Trajectory


class DVTSConfig(StepwiseConfig):
    """max_tokens: the limit of every step call; max_total_tokens: optional whole-path bound (`StepwiseConfig`)."""

    n: int = Field(4, ge=1, description="completions per problem (N); n / beam_width subtrees")
    beam_width: int = Field(4, ge=1, description="M: candidates per step in each subtree, and outputs per subtree")
    num_iterations: int = Field(40, ge=1, description="maximum number of steps")
    lookahead: int = Field(0, ge=0, description="greedy (temperature 0) steps rolled out after each candidate, scored")
    final_marker: str = Field("boxed{", description="a subtree stops once its text contains this")

    @model_validator(mode="after")
    def _check(self):
        if self.n % self.beam_width != 0:
            raise ValueError(f"n ({self.n}) must be a multiple of beam_width ({self.beam_width})")
        return self

    @property
    def num_subtrees(self) -> int:
        return self.n // self.beam_width

    @property
    def group_size(self) -> int:
        return self.beam_width


@dataclass
class _Subtree:
    index: int
    beam: Node = field(default_factory=Node)
    prev: Node | None = None
    live: bool = True
    cands: list[Candidate] = field(default_factory=list)
    cand_scores: list[list[float]] = field(default_factory=list)


def run_subtrees(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: DVTSConfig,
    indices: list[int], problem_id: str | None = None,
) -> list[Trajectory]:
    """Run the given subtrees in lockstep (one batched policy call and one PRM call per iteration).

    `problem_id` keys the request seeds (default: the question text).
    """
    prm = require_prm(prm, "dvts")
    key = problem_key(question, problem_id)
    M = cfg.beam_width
    trees = [_Subtree(index=i) for i in indices]
    for it in range(cfg.num_iterations):
        live = [t for t in trees if t.live]
        if not live:
            break
        last = it == cfg.num_iterations - 1
        cands = sample_next_steps(
            policy, problem_prompt, [t.beam for t in live], [M] * len(live), cfg,
            last=last, lookahead=cfg.lookahead, tag=("dvts", it), problem=key, keys=[t.index for t in live],
        )
        paths, owner = [], []
        for k, (t, group) in enumerate(zip(live, cands)):
            if len(group) != M:
                t.live = False  # fewer than M candidates came back: this is the subtree's last iteration
            for cand in group:
                paths.append(t.beam.step_texts + cand.texts + [s.text for s in cand.lookahead])
                owner.append(k)
        scores = score_paths(prm, question, paths)
        for k, (t, group) in enumerate(zip(live, cands)):
            if not group:
                t.live = False
                continue
            s = [scores[j] for j in range(len(paths)) if owner[j] == k]
            aggs = [aggregate(x, cfg.agg_strategy) for x in s]
            best = max(range(len(group)), key=lambda j: (aggs[j], -j))  # ties: the first candidate
            t.cands = group
            t.cand_scores = [x[: t.beam.depth + len(c.steps)] for x, c in zip(s, group)]  # own steps, no lookahead
            t.prev = t.beam
            t.beam = t.beam.add_steps(group[best].steps, scores=t.cand_scores[best])
            chosen = group[best].step
            if (
                chosen.text == ""
                or chosen.finish_reason in ("eos", "length")
                or cfg.final_marker in t.beam.text
                or cfg.total_spent(t.beam.tokens)
            ):
                t.live = False
    out: list[Trajectory] = []
    for t in trees:
        if t.prev is None:
            continue
        for cand, s in zip(t.cands, t.cand_scores):
            node = t.prev
            for step in cand.steps:  # the sibling's own chain, not attached to the tree
                node = Node(step=step, parent=node, depth=node.depth + 1)
            node.scores = s
            finished = cand.step.finish_reason == "eos" or cfg.final_marker in node.text  # EOS: whatever its length
            out.append(node.to_trajectory(group=t.index, finished=finished))
    return out


def solve_subtree(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: DVTSConfig, index: int,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """One subtree (what the search job runs as one Ray task): its M final siblings."""
    if not 0 <= index < cfg.num_subtrees:
        raise ValueError(f"subtree index {index} out of range (n / beam_width = {cfg.num_subtrees} subtrees)")
    return run_subtrees(problem_prompt, question, policy, prm, cfg, [index], problem_id)


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: DVTSConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """All n / M subtrees, batched in lockstep in this process; outputs in contiguous groups of M."""
    return run_subtrees(problem_prompt, question, policy, prm, cfg, list(range(cfg.num_subtrees)), problem_id)
