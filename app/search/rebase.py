"""REBASE, reward-balanced tree search (Wu et al. 2024, "Inference Scaling Laws").

    frontier = [root]; W = width
    for depth in 0 .. max_depth - 1:
        for node in frontier:
            if node finished (final answer, EOS or an empty step) or over max_tokens:
                W -= 1; leaves += node                 # finished solutions use up width, for good
        candidates = the other frontier nodes
        if W <= 0 or no candidates: stop
        sort candidates by reward r (the PRM score of their last step), descending
        w_i = exp(r_i / T); S = sum w; R = W
        for each candidate in order: c_i = ceil(R * w_i / S); R -= c_i; S -= w_i      # sums to W exactly
        frontier = c_i children of each candidate, one sampled step each, each scored by the PRM
    answer = selection over the finished leaves (weighted majority with `last` in the paper's evaluation)

Defaults as the reference: width 16, softmax_temperature T 0.2, temperature 1.0, max_step_tokens 256,
max_tokens 1024, max_depth 25. The width is also the method's N for selection (`budget`).

ponder differs on purpose: the max_tokens guard counts the whole trajectory's generated tokens (the reference
counts only the current step's, so it rarely fires: `quirk_step_token_guard: true`); rewards come from the PRM
actor rather than a forked sglang server; the softmax is computed stably (shifted by the largest reward), which
leaves the c_i unchanged. Leaves that were not finished (over budget, or left at the depth cap or when the
width ran out) are returned only when no leaf finished.
"""
from __future__ import annotations

import math

from pydantic import Field

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import (
    SearchConfig, contains_any, derive_seed, problem_key, require_prm, sample, score_paths, step_from,
)
from app.search.tree import Node, Trajectory


class RebaseConfig(SearchConfig):
    width: int = Field(16, ge=1, description="W: total number of solutions (finished ones use it up)")
    softmax_temperature: float = Field(0.2, gt=0.0, description="T of softmax(reward / T) that splits the width")
    temperature: float = Field(1.0, ge=0.0, description="sampling temperature")
    max_step_tokens: int = Field(256, ge=1, description="tokens per sampled step")
    max_tokens: int = Field(1024, ge=1, description="generated-token budget of a whole trajectory")
    max_depth: int = Field(25, ge=1, description="depth cap (steps)")
    final_markers: list[str] = Field(["\\boxed{", "The answer is"], description="a step with one of these has a final answer")
    quirk_step_token_guard: bool = Field(False, description="reference quirk: the max_tokens guard counts only the current step")

    @property
    def budget(self) -> int:
        return self.width


def allocate(rewards: list[float], width: int, temperature: float) -> list[int]:
    """Children per candidate (in the given order): c_i = ceil(R w_i / S) down the reward-sorted list.

    w_i = exp(r_i / T); R and S shrink as the list is walked, so the counts sum exactly to `width`
    (the tail can get 0).
    """
    if not rewards:
        return []
    order = sorted(range(len(rewards)), key=lambda i: -rewards[i])  # stable: ties keep their order
    top = max(rewards)
    w = [math.exp((r - top) / temperature) for r in rewards]
    counts = [0] * len(rewards)
    R = width
    for k, i in enumerate(order):
        if R <= 0:
            break
        S = sum(w[j] for j in order[k:])
        x = R * w[i] / S if S > 0 else float(R)
        c = min(R, math.ceil(x - 1e-9 * max(1.0, x)))
        counts[i] = c
        R -= c
    return counts


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: RebaseConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """The leaves. `problem_id` keys the request seeds (default: the question text)."""
    prm = require_prm(prm, "rebase")
    key = problem_key(question, problem_id)
    root = Node()
    frontier: list[Node] = [root]
    remaining = cfg.width
    finished: list[Node] = []
    unfinished: list[Node] = []

    def is_finished(node: Node) -> bool:
        s = node.step
        return s is not None and (s.finish_reason == "eos" or s.text == "" or contains_any(s.text, cfg.final_markers))

    def over_budget(node: Node) -> bool:
        if node.step is None:
            return False
        used = node.step.tokens if cfg.quirk_step_token_guard else node.tokens
        return used >= cfg.max_tokens

    candidates: list[Node] = []
    for depth in range(cfg.max_depth + 1):
        # 1. finished nodes and nodes over budget take one unit of width each, for good.
        candidates = []
        for node in frontier:
            if is_finished(node):
                node.terminal = node.finished = True
                finished.append(node)
                remaining -= 1
            elif over_budget(node):
                node.terminal = True
                unfinished.append(node)
                remaining -= 1
            else:
                candidates.append(node)
        # 2. stop when the width is used up, nothing is left to expand, or at the depth cap.
        if remaining <= 0 or not candidates or depth == cfg.max_depth:
            break
        # 3. split the remaining width by softmax(reward / T), down the reward-sorted list.
        rewards = [n.score if n.score is not None else 0.0 for n in candidates]  # the root is the only unscored one
        counts = allocate(rewards, remaining, cfg.softmax_temperature)
        # 4. expand each candidate into c_i children, one sampled step each; the PRM scores each child. Every call
        #    stops on the delimiter, so a completion is one step (the delimiter can only end it: one stop rule).
        left = [cfg.max_tokens - (0 if cfg.quirk_step_token_guard else n.tokens) for n in candidates]
        groups = sample(
            policy, [problem_prompt + n.text for n in candidates], counts,
            max_tokens=[max(1, min(cfg.max_step_tokens, l)) for l in left],
            temperature=cfg.temperature, top_p=cfg.top_p, stop=(cfg.step_delimiter,),
            seeds=[derive_seed(cfg.seed, key, "rebase", depth, i) for i in range(len(candidates))],
        )
        frontier = [n.add_child(step_from(c)) for n, g in zip(candidates, groups) for c in g]
        for child, s in zip(frontier, score_paths(prm, question, [c.step_texts for c in frontier])):
            child.scores = s
    unfinished += candidates  # left unexpanded: the width ran out, or the depth cap
    leaves = finished or unfinished
    return [n.to_trajectory() for n in leaves]
