"""Beam search over steps with a PRM (search-and-learn `beam_search`).

    active = [root]                                   # n copies of the empty solution
    for it in range(num_iterations):
        beams = tile(active, n)                       # survivors repeated up to n: each gets about M copies
        for b in beams: b += sample_one_step(b)       # stop on the delimiter; last iteration: run to EOS (split
                                                      #   into the steps it holds)
                        (+ `lookahead` greedy steps, scored, not kept)
        completed += [b for b in beams if ended(b)]   # EOS, length or an empty step
        scores = PRM(question, b) for b in beams
        active = [b for b in beams if not ended(b)]
        if filter_duplicates: keep the first beam of each text
        if not active: break
        active = top n/M of active by aggregate(scores, agg_strategy)    # completed beams use no width
    out = completed[:n]  (or the n best with sort_completed), repeated up to n if fewer

Defaults as search-and-learn: n=4, beam_width M=4, num_iterations 40, lookahead 0, temperature 0.8, top_p 1.0,
max_tokens 2048 (per step call, as theirs), agg_strategy last, filter_duplicates false, sort_completed false, seed 42;
n % M == 0.

ponder differs on purpose:
- lookahead text is scored (the beam's steps plus its lookahead steps; the reference generates it and scores only
  the beam's own text: `quirk_unscored_lookahead: true`). The kept per-step scores are the beam's own steps'.
- tokens are counted (the reference reports 0); the optional `max_total_tokens` (off by default) bounds a whole
  beam's generated tokens: each step call gets at most what is left, and a beam whose bound is spent is completed,
  unfinished. A beam that ends at EOS is finished whatever its length.
- the last iteration's completion (no stop string) is split into the steps it holds before it is scored and kept,
  as the reference re-splits texts on the delimiter before scoring (one score per real step).
- ties in the top-n/M cut go to the earlier beam (the reference's argsort picks arbitrarily).
- a text that ends in the delimiter has no empty trailing step to score.
Survivors keep the order of the beam list and are tiled as the reference does: (survivors * k)[:n].
"""
from __future__ import annotations

from pydantic import Field, model_validator

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import Candidate, StepwiseConfig, problem_key, require_prm, sample_next_steps, score_paths
from app.search.select import aggregate
from app.search.tree import Node, Trajectory


class BeamSearchConfig(StepwiseConfig):
    """max_tokens: the limit of every step call; max_total_tokens: optional whole-beam bound (`StepwiseConfig`)."""

    n: int = Field(4, ge=1, description="number of beams (N)")
    beam_width: int = Field(4, ge=1, description="M: each surviving beam is expanded M times; n/M survive")
    num_iterations: int = Field(40, ge=1, description="maximum number of steps")
    lookahead: int = Field(0, ge=0, description="greedy (temperature 0) steps rolled out after each candidate for scoring")
    filter_duplicates: bool = Field(False, description="keep only the first of identical active beams")
    sort_completed: bool = Field(False, description="return the n best completed beams instead of the first n")
    quirk_unscored_lookahead: bool = Field(False, description="reference quirk: generate lookahead but do not score it")

    @model_validator(mode="after")
    def _check(self):
        if self.n % self.beam_width != 0:
            raise ValueError(f"n ({self.n}) must be a multiple of beam_width ({self.beam_width})")
        return self


def tile(active: list[Node], n: int) -> list[Node]:
    """The survivors repeated up to n copies, in the reference's order: (active * (n // len + 1))[:n]."""
    return (active * (n // len(active) + 1))[:n]


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: BeamSearchConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """The n output beams. `problem_id` keys the request seeds (default: the question text)."""
    prm = require_prm(prm, "beam_search")
    key = problem_key(question, problem_id)
    keep = cfg.n // cfg.beam_width
    active: list[Node] = [Node()]
    completed: list[Node] = []
    for it in range(cfg.num_iterations):
        last = it == cfg.num_iterations - 1
        # (1) tile the survivors back up to n copies; (2) each copy samples one step (grouped per survivor).
        copies = tile(active, cfg.n)
        counts = [sum(1 for c in copies if c is a) for a in active]
        cands = sample_next_steps(
            policy, problem_prompt, active, counts, cfg, last=last, lookahead=cfg.lookahead, tag=("beam_search", it),
            problem=key,
        )
        taken = {id(a): 0 for a in active}
        beams: list[tuple[Node, Candidate]] = []
        for parent in copies:  # children in the tiled order of the copies
            group = cands[active.index(parent)]
            j = taken[id(parent)]
            taken[id(parent)] += 1
            if j < len(group):
                beams.append((parent.add_steps(group[j].steps), group[j]))  # several steps on the last iteration
        # (4) ended beams move to completed; a beam whose max_total_tokens is spent is completed too (unfinished).
        # Finished: it ended at EOS (whatever its length) or on an empty step, not cut by a token limit.
        done = [cand.ended or cfg.total_spent(child.tokens) for child, cand in beams]
        for (child, cand), d in zip(beams, done):
            child.terminal = d
            child.finished = cand.ended and cand.step.finish_reason != "length"
        # (3)+(5) the PRM scores every beam (active ones with their lookahead).
        paths = []
        for (child, cand), d in zip(beams, done):
            extra = [] if d or cfg.quirk_unscored_lookahead else [s.text for s in cand.lookahead]
            paths.append(child.step_texts + extra)
        scores = score_paths(prm, question, paths)
        agg = []
        for (child, cand), s in zip(beams, scores):
            for node in child.path()[-len(cand.steps):]:  # the new steps' nodes (one, or several on the last iteration)
                node.scores = s[: node.depth]
            agg.append(aggregate(s, cfg.agg_strategy))
        completed += [child for (child, _), d in zip(beams, done) if d]
        survivors = [(child, a) for (child, _), d, a in zip(beams, done, agg) if not d]
        if not survivors:
            break
        # (6) optional duplicate filter: the first beam of each identical text.
        if cfg.filter_duplicates:
            seen, unique = set(), []
            for child, a in survivors:
                if child.text not in seen:
                    seen.add(child.text)
                    unique.append((child, a))
            survivors = unique
        # (7) keep the top n/M by aggregated score, in beam-list order.
        ranked = sorted(range(len(survivors)), key=lambda i: -survivors[i][1])[:keep]
        active = [survivors[i][0] for i in sorted(ranked)]
    if not completed:  # nothing ended (only if the engine ignored max_tokens on the last iteration)
        completed = active
    if cfg.sort_completed:
        completed = sorted(completed, key=lambda c: -aggregate(c.scores, cfg.agg_strategy))  # type: ignore[arg-type]
    out = completed[: cfg.n]
    out = (out * (cfg.n // len(out) + 1))[: cfg.n]
    return [node.to_trajectory() for node in out]
