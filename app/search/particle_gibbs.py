"""Particle Gibbs over steps with a PRM (Puri et al. 2025; its_hub `ParticleGibbs`; the paper's
`particle_gibbs_batch`): particle filtering repeated, each sweep conditioned on reference particles of the last.

    P = n / num_iterations particles per sweep                 # the budget n = particles x iterations
    refs: list[Node] = []
    for it in 1 .. num_iterations:
        particles = [empty] * (P - len(refs))                  # iteration 1: plain particle filtering
        for t in 1, 2, ...:                                    # as particle_filter.py, except the resampling:
            step and score every active particle
            if no free particle is active: break
            draw P - len(refs) indices ~ multinomial(softmax(logit(r) / T)) over particles + refs, where
                a reference competes with ITS OWN r at step t (its final r once it has fewer steps)
            particles = the copies; a copy of a reference is cut to t steps and made active (done if it has <= t)
        particles = particles + refs                           # the references are kept whole
        refs = num_ref_particles draws ~ softmax(logit(r_final) / T) (with replacement)
    answer = argmax of the LAST sweep's final r                # not pass@I over the sweeps

Defaults: those of particle filtering (temperature 0.8, top_p 1.0, max_tokens 2048 per step, max_steps 40, stop on
`\\boxed`, softmax_temperature 1.0, agg_strategy `model`, resample_inactive true, argmax), num_ref_particles 1 (as
its_hub), n 16 with num_iterations 4 (ponder's choice; its_hub's default of one iteration is particle filtering,
and the paper's scripts take both from the command line). n % num_iterations == 0.

Output: the last sweep's P final particles (the answer first, then the free particles, then the references), so
a record holds P trajectories while its N (`budget`) is n, the completions the search sampled whole.

ponder differs from the references on purpose (flags, off by default):
- the reference competes with its own score at step t; `quirk_reference_final_weight` gives it its final score at
  every step (its_hub), `quirk_reference_weight_ahead` its score at step t + 1 (the paper's code);
- the answer is the last sweep's argmax; the paper's notebook counts a question right when any sweep's best is
  right (pass@I), which ponder does not offer;
- ancestor sampling is in neither reference and not here;
- the particle-filtering quirks (`quirk_no_eos_check`, `quirk_final_resample`, `quirk_generate_inactive`) apply
  to every sweep. The RNG of each sweep's resampling and of the reference draw derive from the seed, the problem
  and the sweep, and sweep 1 draws exactly what `particle_filter` draws with n / num_iterations particles.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from app.contracts import PolicyHandle, RewardHandle
from app.search.particle_filter import ParticleFilterConfig, choose, multinomial, output, r_of, rng_for, run_particles
from app.search.sampling import problem_key, require_prm
from app.search.tree import Node, Trajectory


class ParticleGibbsConfig(ParticleFilterConfig):
    """max_tokens: the limit of every step call; max_total_tokens: optional whole-particle bound (`StepwiseConfig`)."""

    n: int = Field(16, ge=1, description="N: the budget, particles x num_iterations")
    num_iterations: int = Field(4, ge=1, description="I: sweeps of the particle filter (1: particle filtering)")
    num_ref_particles: int = Field(1, ge=1, description="reference particles carried into each later sweep")
    quirk_reference_final_weight: bool = Field(
        False, description="its_hub quirk: a reference competes with its final score at every step"
    )
    quirk_reference_weight_ahead: bool = Field(
        False, description="paper-code quirk: a reference competes with its score one step ahead (t + 1)"
    )

    @model_validator(mode="after")
    def _check(self):
        if self.n % self.num_iterations != 0:
            raise ValueError(f"n ({self.n}) must be a multiple of num_iterations ({self.num_iterations})")
        if self.num_iterations > 1 and self.particles <= self.num_ref_particles:
            raise ValueError(
                f"n / num_iterations = {self.particles} particles per sweep leaves no free particle beside "
                f"num_ref_particles ({self.num_ref_particles})"
            )
        if self.quirk_reference_final_weight and self.quirk_reference_weight_ahead:
            raise ValueError("quirk_reference_final_weight and quirk_reference_weight_ahead exclude each other")
        return self

    @property
    def particles(self) -> int:
        """P: particles per sweep."""
        return self.n // self.num_iterations


def solve(
    problem_prompt: str, question: str, policy: PolicyHandle, prm: RewardHandle | None, cfg: ParticleGibbsConfig,
    problem_id: str | None = None,
) -> list[Trajectory]:
    """The last sweep's final particles, the answer first. `problem_id` keys the seeds (default: the question)."""
    prm = require_prm(prm, "particle_gibbs")
    key = problem_key(question, problem_id)
    refs: list[Node] = []
    for it in range(cfg.num_iterations):
        particles = run_particles(problem_prompt, question, policy, prm, cfg, cfg.particles, key=key, iteration=it,
                                  refs=refs)
        if it < cfg.num_iterations - 1:
            rs = [r_of(p, cfg) for p in particles]
            refs = [particles[i] for i in multinomial(rs, cfg.num_ref_particles, cfg.softmax_temperature,
                                                      rng_for(cfg, key, "particles", it, "reference"))]
    return output(particles, choose(particles, cfg, key=key, iteration=cfg.num_iterations - 1))
