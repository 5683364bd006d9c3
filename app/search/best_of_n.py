"""Best-of-N with a process reward model (search-and-learn `best_of_n`).

    ys     = sample(policy, prompt, n, temperature=0.8, top_p=1.0)   # one prompt, n samples, no stop string
    scores = PRM(question, split_steps(y)) for y in ys                 # one score per step
    answer = selection over aggregate(scores, agg_strategy)            # naive / weighted / maj, at n = 1, 2, 4, ...

Defaults as search-and-learn: n=4, temperature 0.8, top_p 1.0, max_tokens 2048, agg_strategy last, seed 42.
ponder differs on purpose: `agg_strategy` really applies (the reference always aggregates with `last`, whatever
the config says; `quirk_always_last: true` reproduces that).
"""
from __future__ import annotations

from pydantic import Field

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import SearchConfig, problem_key, require_prm, score_paths
from app.search.majority import sample_solutions
from app.search.tree import Trajectory


class BestOfNConfig(SearchConfig):
    """max_tokens: the limit of each whole completion (one call, as search-and-learn)."""

    n: int = Field(4, ge=1, description="number of sampled solutions (N)")
    quirk_always_last: bool = Field(False, description="reference quirk: select with `last` whatever agg_strategy says")

    @property
    def selection_agg(self) -> str:
        return "last" if self.quirk_always_last else self.agg_strategy


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: BestOfNConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """The n scored solutions. `problem_id` keys the request seed (default: the question text)."""
    prm = require_prm(prm, "best_of_n")
    trajs = sample_solutions(problem_prompt, policy, cfg, cfg.n, "best_of_n", problem_key(question, problem_id))
    for t, s in zip(trajs, score_paths(prm, question, [t.steps for t in trajs])):
        t.scores = s
    return trajs
