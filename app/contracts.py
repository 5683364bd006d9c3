"""The contracts between search and models: requests, completions, compute, and the handles search calls.

Every policy engine (HF, vLLM, a scripted test engine) speaks `Engine`; search methods call `PolicyHandle` and
`RewardHandle`, whatever stands behind them (a pool client, a scripted engine). Pure Python, in the domain, so
that `app.search` depends on it and never on the actors or on torch/vLLM.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, Sequence, runtime_checkable

FinishReason = Literal["stop", "length", "eos"]


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to sample `n` continuations of.

    `stop` strings end a continuation; the returned text ends *at and including* the stop string
    (the step delimiter "\\n\\n" stays in the step, as in the published recipes).
    """

    prompt: str | tuple[int, ...]
    n: int = 1
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.prompt, list):
            object.__setattr__(self, "prompt", tuple(self.prompt))
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        if self.n < 1:
            raise ValueError(f"GenerationRequest.n must be >= 1, got {self.n}")
        if self.max_tokens < 1:
            raise ValueError(f"GenerationRequest.max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"GenerationRequest.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"GenerationRequest.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    """One sampled continuation.

    finish_reason: "stop" (a stop string matched; `stop_reason` says which), "eos" (the model ended),
    "length" (max_tokens reached).
    cached_tokens: of the `prompt_tokens`, those the engine did not run (served from its prefix cache, or shared
        with an identical prompt of the same batch). The n completions of one request share the prompt: like
        `prompt_tokens`, it counts once per request.
    copied: a copy of the request's first completion that the engine did not generate (vLLM's greedy n > 1 runs
        one sequence): its tokens count in the nominal compute, not in the computed one.
    """

    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: FinishReason
    stop_reason: str | None = None
    cumulative_logprob: float | None = None
    token_ids: tuple[int, ...] | None = None
    cached_tokens: int = 0
    copied: bool = False

    @property
    def mean_logprob(self) -> float | None:
        if self.cumulative_logprob is None or self.generated_tokens == 0:
            return None
        return self.cumulative_logprob / self.generated_tokens


@dataclass
class Usage:
    """Compute spent, summed over calls, counted two ways (FLOPs = 2 x parameters x tokens per model).

    Nominal, the plain names (what the papers count): every prompt token (once per request: its n samples share
    it), every generated token and every token the PRM read, as if each call ran from scratch.
    Computed, the `computed_` names: the tokens the engines really ran, less those their prefix caches served
    (`Completion.cached_tokens`, `ScoreResult.cached_tokens`) and less the generations they did not run
    (`Completion.copied`).
    `num_parameters` is the matmul parameters run per token (`actors.engines.base.ParameterCount.per_token`: no
    untied input embeddings); a PRM adds `head_parameters` at each score it reads out (its classifier, or the 2
    label rows of an LM head; the computed figure leaves out the scores a cache served).
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    prm_tokens: int = 0
    policy_flops: float = 0.0
    prm_flops: float = 0.0
    policy_calls: int = 0
    prm_calls: int = 0
    computed_prompt_tokens: int = 0
    computed_generated_tokens: int = 0
    computed_prm_tokens: int = 0
    computed_policy_flops: float = 0.0
    computed_prm_flops: float = 0.0

    @property
    def flops(self) -> float:
        """Nominal FLOPs of both models."""
        return self.policy_flops + self.prm_flops

    @property
    def computed_flops(self) -> float:
        return self.computed_policy_flops + self.computed_prm_flops

    def add_generation(self, completions: Sequence[Sequence[Completion]], num_parameters: int) -> None:
        self.policy_calls += 1
        prompt = computed_prompt = generated = computed_generated = 0
        for group in completions:
            if group:
                # The prompt is processed once per request (prefix shared across the n samples).
                prompt += group[0].prompt_tokens
                computed_prompt += group[0].prompt_tokens - min(group[0].cached_tokens, group[0].prompt_tokens)
            for c in group:
                generated += c.generated_tokens
                if not c.copied:
                    computed_generated += c.generated_tokens
        self.prompt_tokens += prompt
        self.generated_tokens += generated
        self.computed_prompt_tokens += computed_prompt
        self.computed_generated_tokens += computed_generated
        self.policy_flops += 2.0 * num_parameters * (prompt + generated)
        self.computed_policy_flops += 2.0 * num_parameters * (computed_prompt + computed_generated)

    def add_scoring(self, tokens: int, num_parameters: int, cached_tokens: int = 0, scores: int = 0,
                    head_parameters: int = 0, cached_scores: int = 0) -> None:
        """One PRM call: `tokens` read, `cached_tokens` of them served by a cache; `scores` read out by a head of
        `head_parameters`, `cached_scores` of them served by the cache with their tokens."""
        computed = tokens - min(cached_tokens, tokens)
        self.prm_calls += 1
        self.prm_tokens += tokens
        self.computed_prm_tokens += computed
        self.prm_flops += 2.0 * (num_parameters * tokens + head_parameters * scores)
        self.computed_prm_flops += 2.0 * (num_parameters * computed + head_parameters * (scores - cached_scores))

    def merge(self, other: "Usage") -> "Usage":
        for f in self.__dataclass_fields__:
            setattr(self, f, getattr(self, f) + getattr(other, f))
        return self

    def as_dict(self) -> dict:
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["flops"] = self.flops
        d["computed_flops"] = self.computed_flops
        return d


@dataclass
class ScoreResult:
    """Per-trajectory, per-step scores in [0, 1] and the tokens the PRM read to produce them.

    cached_tokens: of `tokens`, those its prefix cache served (a path scored again with one more step), and
    cached_scores: the scores served with them (their head was not run again).
    head_parameters: the parameters of the head read out at each score (`Usage.add_scoring`).
    """

    scores: list[list[float]]
    tokens: int = 0
    cached_tokens: int = 0
    cached_scores: int = 0
    head_parameters: int = 0


@runtime_checkable
class Engine(Protocol):
    """A loaded policy model. `generate` returns one list of `n` completions per request, in order."""

    num_parameters: int

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]: ...


@runtime_checkable
class PolicyHandle(Protocol):
    """What search methods call: a pool client, an actor wrapper or a scripted engine in tests."""

    usage: Usage

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]: ...


@runtime_checkable
class RewardHandle(Protocol):
    """What search methods call to score steps: one score in [0, 1] per step of each trajectory."""

    usage: Usage

    def score(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[list[float]]: ...


def apply_stop(text: str, stop: Sequence[str]) -> tuple[str, str | None]:
    """Cut `text` after the stop string that *ends* earliest (ties: the one listed first): vLLM's rule.

    The one stop rule: the HF engine and the scripted test engine apply it, vLLM applies it itself, so all three
    report the same text and `stop_reason` even when two stop strings complete on the same token.
    Returns (text, matched stop or None).
    """
    best_end, which = None, None
    for s in stop:
        i = text.find(s)
        if i >= 0 and (best_end is None or i + len(s) < best_end):
            best_end, which = i + len(s), s
    return (text, None) if which is None else (text[:best_end], which)
