"""Greedy chain-of-thought: one completion at temperature 0, no stop string, no search.

    y = argmax-decode(policy, prompt)            # temperature 0, until EOS or max_tokens

The completion is split into steps on the delimiter. Without a PRM the trajectory has no scores and selection
reports the majority rule only (n = 1: the answer itself); with `score: true` and a PRM the steps are scored too.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.contracts import PolicyHandle, RewardHandle
from app.search import majority
from app.search.tree import Trajectory


class GreedyConfig(majority.MajorityConfig):
    """Majority's config with one completion at temperature 0. max_tokens: the limit of the one completion."""

    n: Literal[1] = Field(1, description="always one completion")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy decoding")


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: GreedyConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """The one completion. `problem_id` keys the request seed (default: the question text)."""
    return majority.solve(problem_prompt, question, policy, prm, cfg, problem_id, tag="greedy")
