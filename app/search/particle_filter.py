"""Particle filtering over steps with a PRM (Puri et al. 2025; its_hub `ParticleFiltering`; the paper's
probabilistic-inference-scaling `particle_gibbs_kernel` with one iteration).

    particles = [empty] * N
    for t in 1, 2, ...:                                        # one round per step
        for p in particles if p active: p += sample_one_step(p)     # stop on the delimiter
            r_p = PRM(question, p)                             # the WHOLE current prefix (agg `model`), or the
                                                               #   per-step scores aggregated (last / min / prod / mean)
            p is done on `\\boxed`, EOS, an empty step, the length limit or max_steps
        if no particle is active: break                        # argmax BEFORE any final resampling
        w = logit(clip(r, 1e-7, 1 - 1e-7))                     # not accumulated: the current prefix's score
        particles = [copy(particles[i]) for i ~ multinomial(softmax(w / T), N)]
                                                               # done particles take part with their final
                                                               #   weight; their copies stay done
    answer = argmax_p r_p                                      # (`final_selection: sample`: a draw ~ softmax(w / T))

Defaults as the paper: N particles (`n`, the budget), step "\\n\\n", stop on `\\boxed`, EOS or max_steps 40,
temperature 0.8, top_p 1.0, max_tokens 2048 per step call, softmax_temperature 1.0, agg_strategy `model`,
resample_inactive true, final_selection argmax, seed 42.

The aggregation is named explicitly. `model` (the paper's default) scores the whole prefix as ONE step (one step
tag at its end); a trajectory's stored `scores` are then that score after each of its steps (score k = the PRM's
score of the prefix of k steps read as one step), so the record's selection reads them with `last`. `last`, `min`,
`prod`, `mean`: the PRM scores the prefix step by step and the weight is the aggregate; `scores` are the per-step
scores of the last scoring.

`resample_inactive: false` (the paper's other setting): done particles keep their places and only the active ones
are resampled, among themselves.

Output: the N final particles, the method's own answer first (the argmax, or the draw), the others in particle
order; so every selection rule at n = 1 reports the method's answer, and `naive` at n = N is the argmax too.

ponder differs from the references on purpose, each quirk behind a flag (off by default):
- `quirk_no_eos_check` (its_hub): only `\\boxed` (the final markers) and max_steps end a particle; one that ended
  at EOS, on an empty step or at the length limit keeps taking (empty) steps.
- `quirk_final_resample` (its_hub): resample once more after the last particle is done, then take the argmax of the
  resampled set (it can lose the best particle; ponder takes the argmax first).
- `quirk_generate_inactive` (the paper's code): every round also samples a step for each done particle and
  discards it (compute only; the search is unchanged).
Also: one request per particle (n = 1, its own seed), as both references; `max_total_tokens` (ponder's, off)
bounds a particle's whole generated text; the depth cap is `max_steps` steps (its_hub stops after max_steps + 1);
a step ending at the length limit ends the particle, unfinished; the softmax is computed stably.
Particle Gibbs (`particle_gibbs.py`) runs the same kernel (`run_particles`) with reference particles.
"""
from __future__ import annotations

import math
import random
from typing import Literal, Sequence

from pydantic import Field

from app.contracts import PolicyHandle, RewardHandle
from app.search.sampling import (
    StepwiseConfig, contains_any, derive_seed, problem_key, require_prm, sample, score_paths, step_from,
)
from app.search.select import aggregate
from app.search.tree import Node, Trajectory

CLIP = 1e-7


class ParticleFilterConfig(StepwiseConfig):
    """max_tokens: the limit of every step call; max_total_tokens: optional whole-particle bound (`StepwiseConfig`)."""

    n: int = Field(4, ge=1, description="N: number of particles (the budget)")
    max_steps: int = Field(40, ge=1, description="a particle is done after this many steps (depth cap)")
    softmax_temperature: float = Field(1.0, gt=0.0, description="T of softmax(logit(r) / T), the resampling weights")
    agg_strategy: Literal["model", "last", "min", "prod", "mean"] = Field(
        "model",
        description="r of a prefix: `model` = the PRM's score of the whole prefix read as one step (the paper's "
        "default); last / min / prod / mean = the aggregate of its per-step scores",
    )
    final_markers: list[str] = Field(["\\boxed"], description="a step holding one of these ends its particle (a final answer)")
    resample_inactive: bool = Field(True, description="done particles take part in resampling (the paper's setting); "
                                                      "false: they keep their places and only active ones are resampled")
    final_selection: Literal["argmax", "sample"] = Field(
        "argmax", description="the answer: the particle with the highest final r, or a draw ~ softmax(logit(r) / T)"
    )
    quirk_no_eos_check: bool = Field(False, description="its_hub quirk: only the final markers and max_steps end a particle")
    quirk_final_resample: bool = Field(False, description="its_hub quirk: resample once more after the last particle is "
                                                          "done, then take the argmax")
    quirk_generate_inactive: bool = Field(False, description="paper-code quirk: sample (and discard) a step for every "
                                                             "done particle each round")

    @property
    def selection_agg(self) -> str:
        """`model` stores the prefix score after each step: `last` reads the final one."""
        return "last" if self.agg_strategy == "model" else self.agg_strategy

    @property
    def drawn_answer(self) -> bool:
        """`sample`: the method's answer is a draw (its first trajectory), which the record's `naive` rule reports
        at N instead of the argmax (`app.search.record`)."""
        return self.final_selection == "sample"


# ---------------------------------------------------------------- weights and resampling


def logit(r: float) -> float:
    """The log-weight of a score in [0, 1]: logit(clip(r, 1e-7, 1 - 1e-7))."""
    r = min(max(float(r), CLIP), 1.0 - CLIP)
    return math.log(r) - math.log1p(-r)


def softmax_weights(rs: Sequence[float], temperature: float) -> list[float]:
    """softmax(logit(r) / T), shifted by the largest log-weight (stable)."""
    w = [logit(r) / temperature for r in rs]
    top = max(w)
    e = [math.exp(x - top) for x in w]
    s = sum(e)
    return [x / s for x in e]


def multinomial(rs: Sequence[float], k: int, temperature: float, rng: random.Random) -> list[int]:
    """k indices drawn with replacement ~ softmax(logit(r) / T)."""
    if k <= 0 or not rs:
        return []
    return rng.choices(range(len(rs)), weights=softmax_weights(rs, temperature), k=k)


def rng_for(cfg: ParticleFilterConfig, *parts: object) -> random.Random:
    """A resampling RNG derived from the base seed and its place in the search (unseeded when seed is None)."""
    s = derive_seed(cfg.seed, *parts)
    return random.Random(s) if s is not None else random.Random()


def r_of(node: Node, cfg: ParticleFilterConfig) -> float:
    """The score r of a particle's prefix (what its weight is made of)."""
    assert node.scores, "an unscored particle has no weight"
    return node.scores[-1] if cfg.agg_strategy == "model" else aggregate(node.scores, cfg.agg_strategy)


def at_step(node: Node, t: int) -> Node:
    """The particle cut to its first t steps (itself when it has no more)."""
    return node if node.depth <= t else node.path()[t - 1]


# ---------------------------------------------------------------- one round and the kernel


def advance(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle, cfg: ParticleFilterConfig,
    particles: list[Node], *, key: str, iteration: int, t: int,
) -> list[Node]:
    """Every active particle samples one step and the PRM scores its whole prefix; returns the new particle list.

    One request per particle (n = 1), seeded by (problem, iteration, round t, slot). Done particles stay as they
    are (with `quirk_generate_inactive` a step is sampled for them too, and discarded).
    """
    delim = cfg.step_delimiter
    todo = [i for i, p in enumerate(particles) if not p.terminal or cfg.quirk_generate_inactive]
    groups = sample(
        policy, [problem_prompt + particles[i].text for i in todo], [1] * len(todo),
        max_tokens=[max(1, cfg.step_limit(particles[i].tokens)) for i in todo],
        temperature=cfg.temperature, top_p=cfg.top_p, stop=(delim,),
        seeds=[derive_seed(cfg.seed, key, "particles", iteration, t, i) for i in todo],
    )
    out = list(particles)
    stepped: list[int] = []
    for i, [c] in zip(todo, groups):
        parent = particles[i]
        if parent.terminal:
            continue  # quirk_generate_inactive: generated, discarded
        child = parent.add_child(step_from(c))
        marker = contains_any(c.text, cfg.final_markers)
        if cfg.quirk_no_eos_check:
            child.finished = marker
            child.terminal = marker
        else:
            child.finished = (marker or c.finish_reason == "eos" or c.text == "") and c.finish_reason != "length"
            child.terminal = marker or c.finish_reason in ("eos", "length") or c.text == ""
        child.terminal = child.terminal or child.depth >= cfg.max_steps or cfg.total_spent(child.tokens)
        out[i] = child
        stepped.append(i)
    if cfg.agg_strategy == "model":
        scores = score_paths(prm, question, [[out[i].text] for i in stepped])
        for i, [r] in zip(stepped, scores):
            out[i].scores = list(particles[i].scores or []) + [r]
    else:
        scores = score_paths(prm, question, [out[i].step_texts for i in stepped])
        for i, s in zip(stepped, scores):
            out[i].scores = s
    return out


def reference_weight(ref: Node, t: int, cfg) -> float:
    """The reference particle's r when it competes at step t: its own score at step t (its final one once it has
    fewer steps). The references' quirks: its_hub its final score, the paper's code its score one step ahead."""
    if getattr(cfg, "quirk_reference_final_weight", False):
        return r_of(ref, cfg)
    if getattr(cfg, "quirk_reference_weight_ahead", False):
        return r_of(at_step(ref, t + 1), cfg)
    return r_of(at_step(ref, t), cfg)


def run_particles(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle, cfg: ParticleFilterConfig,
    n: int, *, key: str, iteration: int = 0, refs: Sequence[Node] = (),
) -> list[Node]:
    """One sweep of the (conditional) particle filter: n particles, of which len(refs) are the given reference
    particles (finished paths of an earlier sweep, particle Gibbs) and the rest start empty.

    Returns the final particles: the free ones, then the references.
    """
    refs = list(refs)
    rng = rng_for(cfg, key, "particles", iteration, "resample")
    root = Node()
    particles: list[Node] = [root] * (n - len(refs))  # copies share their path: extending one adds a child
    t = 0
    while any(not p.terminal for p in particles):
        t += 1
        particles = advance(problem_prompt, question, policy, prm, cfg, particles, key=key, iteration=iteration, t=t)
        if all(p.terminal for p in particles) and not cfg.quirk_final_resample:
            break  # nothing left to move: the final particles are kept as they are (argmax before any resampling)
        # resample: each particle's current r (done ones: their final r); a reference competes with its r at step t
        if cfg.resample_inactive:
            slots = list(range(len(particles)))
        else:
            slots = [i for i, p in enumerate(particles) if not p.terminal]
        pool = [particles[i] for i in slots] + refs
        rs = [r_of(p, cfg) for p in pool[: len(slots)]] + [reference_weight(r, t, cfg) for r in refs]
        drawn = multinomial(rs, len(slots), cfg.softmax_temperature, rng)
        # a copy of a reference is cut to t steps and made active (it stays done if it has no more than t)
        copies = [pool[j] if j < len(slots) else at_step(pool[j], t) for j in drawn]
        for i, c in zip(slots, copies):
            particles[i] = c
    return particles + refs


def choose(particles: Sequence[Node], cfg: ParticleFilterConfig, *, key: str, iteration: int) -> int:
    """The method's answer: the particle with the highest final r (ties: the first), or a draw (`sample`)."""
    rs = [r_of(p, cfg) for p in particles]
    if cfg.final_selection == "sample":
        return multinomial(rs, 1, cfg.softmax_temperature, rng_for(cfg, key, "particles", iteration, "select"))[0]
    return max(range(len(rs)), key=lambda i: (rs[i], -i))


def output(particles: Sequence[Node], best: int) -> list[Trajectory]:
    """The final particles as trajectories, the chosen one first, the others in particle order."""
    order = [best] + [i for i in range(len(particles)) if i != best]
    return [particles[i].to_trajectory(finished=particles[i].finished) for i in order]


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: ParticleFilterConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """The N final particles, the answer first. `problem_id` keys the request seeds (default: the question text)."""
    prm = require_prm(prm, "particle_filter")
    key = problem_key(question, problem_id)
    particles = run_particles(problem_prompt, question, policy, prm, cfg, cfg.n, key=key)
    return output(particles, choose(particles, cfg, key=key, iteration=0))
