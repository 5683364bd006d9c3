"""Self-consistency (Wang et al. 2023): sample n complete solutions, answer with the most frequent answer class.

    ys = sample(policy, prompt, n, temperature, top_p)      # independent, no stop string
    answer = the largest class of equivalent answers among ys (ties: the class seen first)

No verifier is needed; with `score: true` and a PRM the steps are scored as well, so the naive and weighted rules
can be reported beside the vote (that is best-of-N; see best_of_n.py).
"""
from __future__ import annotations

from pydantic import Field

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import SearchConfig, derive_seed, problem_key, sample, score_paths
from app.search.tree import Trajectory, split_steps


class MajorityConfig(SearchConfig):
    """max_tokens: the limit of each whole completion (one call)."""

    n: int = Field(4, ge=1, description="number of sampled solutions")
    score: bool = Field(False, description="also score the steps with the PRM (costs PRM tokens)")

    @property
    def needs_prm(self) -> bool:
        return self.score


def sample_solutions(
    problem_prompt: str, policy: PolicyHandle, cfg: SearchConfig, n: int, tag: str, problem: str
) -> list[Trajectory]:
    """n independent complete solutions from one request (no stop string; max_tokens bounds each whole one), each
    split into steps on the delimiter. `problem` (`sampling.problem_key`) and `tag` seed the request."""
    [group] = sample(
        policy, [problem_prompt], [n], max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        seeds=[derive_seed(cfg.seed, problem, tag)],
    )
    return [
        Trajectory(
            steps=split_steps(c.text, cfg.step_delimiter), finished=c.finish_reason != "length",
            finish_reason=c.finish_reason, tokens=c.generated_tokens,
        )
        for c in group
    ]


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: MajorityConfig,
    problem_id: str | None = None, tag: str = "majority",
) -> list[Trajectory]:
    """The n solutions. `problem_id` keys the request seed (default: the question text)."""
    trajs = sample_solutions(problem_prompt, policy, cfg, cfg.n, tag, problem_key(question, problem_id))
    if cfg.score and prm is not None:
        scored = [t for t in trajs if t.steps]
        for t, s in zip(scored, score_paths(prm, question, [t.steps for t in scored])):
            t.scores = s
    return trajs
