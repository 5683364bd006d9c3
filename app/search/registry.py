"""The registry of search methods: name -> (config class, solve function).

Every solve function has the same signature:

    solve(problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg,
          problem_id: str | None = None) -> list[Trajectory]

`problem_prompt` is the full prompt the policy continues (template applied); `question` is the bare problem text
the PRM reads; `problem_id` keys the request seeds (default: the question text), so problems draw different
numbers. The returned trajectories are in the order selection subsamples them (first n for every n).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from app.config import Config, ConfigError
from app.search import beam_search, best_of_n, dvts, greedy, majority, mcts, particle_filter, particle_gibbs, rebase


class Method(NamedTuple):
    config: type[Config]
    solve: Callable


METHODS: dict[str, Method] = {
    "greedy": Method(greedy.GreedyConfig, greedy.solve),
    "majority": Method(majority.MajorityConfig, majority.solve),
    "best_of_n": Method(best_of_n.BestOfNConfig, best_of_n.solve),
    "beam_search": Method(beam_search.BeamSearchConfig, beam_search.solve),
    "dvts": Method(dvts.DVTSConfig, dvts.solve),
    "rebase": Method(rebase.RebaseConfig, rebase.solve),
    "mcts": Method(mcts.MCTSConfig, mcts.solve),
    "particle_filter": Method(particle_filter.ParticleFilterConfig, particle_filter.solve),
    "particle_gibbs": Method(particle_gibbs.ParticleGibbsConfig, particle_gibbs.solve),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"unknown search method {name!r} (one of: {', '.join(METHODS)})")
    return METHODS[name]


def method_config(name: str, data: dict | Config | None = None):
    """Validate a method's config section (a dict, or an instance of its class)."""
    from app.config import build_config

    cls = get_method(name).config
    if isinstance(data, cls):
        return data
    if isinstance(data, Config):
        data = data.model_dump()
    return build_config(cls, dict(data or {}), source=f"search ({name})")
