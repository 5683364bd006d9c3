"""Greedy chain-of-thought: one completion at temperature 0, no stop string, no search.

    y = argmax-decode(policy, prompt)            # temperature 0, until EOS or max_tokens

The completion is split into steps on the delimiter. Without a PRM the trajectory has no scores and selection
reports the majority rule only (n = 1: the answer itself); with `score: true` and a PRM the steps are scored too.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import SearchConfig, derive_seed, problem_key, sample, score_paths
from app.search.tree import Trajectory, split_steps


class GreedyConfig(SearchConfig):
    """max_tokens: the limit of the one completion."""

    n: Literal[1] = Field(1, description="always one completion")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy decoding")
    score: bool = Field(False, description="also score the steps with the PRM (costs PRM tokens)")

    @property
    def needs_prm(self) -> bool:
        return self.score


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: GreedyConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """The one completion. `problem_id` keys the request seed (default: the question text)."""
    [[c]] = sample(
        policy, [problem_prompt], [1], max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seeds=[derive_seed(cfg.seed, problem_key(question, problem_id), "greedy")],
    )
    traj = Trajectory(
        steps=split_steps(c.text, cfg.step_delimiter), finished=c.finish_reason != "length",
        finish_reason=c.finish_reason, tokens=c.generated_tokens,
    )
    if cfg.score and prm is not None and traj.steps:
        traj.scores = score_paths(prm, question, [traj.steps])[0]
    return [traj]
