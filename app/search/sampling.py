"""What the search methods share: the base config, seeding, one-step sampling and PRM scoring helpers.

The prompt for continuing a trajectory is always problem_prompt + the trajectory's text so far. A step ends when
the engine stops on the step delimiter (kept in the text). Token budgets (`max_tokens`) count the whole
trajectory's generated tokens, not only the current step's.
"""
from __future__ import annotations

import hashlib
from typing import Literal, Sequence

from pydantic import Field

from app.contracts import Completion, GenerationRequest, PolicyHandle, RewardHandle
from app.config import Config
from app.search.tree import Node, Step

AggStrategy = Literal["last", "min", "prod", "mean"]


class SearchConfig(Config):
    """Keys every method shares (names as in search-and-learn's config)."""

    temperature: float = Field(0.8, ge=0.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling")
    max_tokens: int = Field(2048, ge=1, description="generated-token budget of a whole trajectory")
    seed: int | None = Field(42, description="base seed; each request gets a seed derived from it (None: unseeded)")
    agg_strategy: AggStrategy = Field("last", description="step-score aggregation: last, min, prod, mean")
    step_delimiter: str = Field("\n\n", min_length=1, description="a step ends on this string (kept in the step)")

    @property
    def budget(self) -> int:
        """N: the number of completions the method returns (what selection reports up to)."""
        return int(getattr(self, "n", 1))

    @property
    def group_size(self) -> int:
        """Completions that selection keeps together (DVTS subtrees); 1 elsewhere."""
        return 1

    @property
    def needs_prm(self) -> bool:
        return True

    @property
    def selection_agg(self) -> str:
        """The aggregation the selection rules use (a reference quirk may pin it)."""
        return self.agg_strategy


def derive_seed(seed: int | None, *parts: object) -> int | None:
    """A per-request seed from the base seed and the request's place in the search (stable across runs)."""
    if seed is None:
        return None
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def step_from(c: Completion) -> Step:
    return Step(text=c.text, tokens=c.generated_tokens, finish_reason=c.finish_reason, mean_logprob=c.mean_logprob)


def ended(c: Completion) -> bool:
    """The trajectory cannot continue after this completion: EOS, length, or an empty step."""
    return c.finish_reason in ("eos", "length") or c.text == ""


def contains_any(text: str, markers: Sequence[str]) -> bool:
    return any(m in text for m in markers)


def sample(
    policy: PolicyHandle,
    prompts: Sequence[str],
    ns: Sequence[int],
    *,
    max_tokens: Sequence[int] | int,
    temperature: float,
    top_p: float,
    stop: Sequence[str] = (),
    seeds: Sequence[int | None] | None = None,
    logprobs: bool = False,
) -> list[list[Completion]]:
    """One batched call: prompt i gets ns[i] samples. Prompts with n == 0 get [] without a request."""
    reqs, where = [], []
    mts = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    for i, (p, n) in enumerate(zip(prompts, ns)):
        if n <= 0:
            continue
        reqs.append(
            GenerationRequest(
                prompt=p,
                n=n,
                max_tokens=max(1, int(mts[i])),
                temperature=temperature,
                top_p=top_p,
                stop=tuple(stop),
                seed=None if seeds is None else seeds[i],
                logprobs=logprobs,
            )
        )
        where.append(i)
    out: list[list[Completion]] = [[] for _ in prompts]
    if reqs:
        results = policy.generate(reqs)
        if len(results) != len(reqs):
            raise RuntimeError(f"policy returned {len(results)} groups for {len(reqs)} requests")
        for i, group in zip(where, results):
            out[i] = list(group)
    return out


def score_paths(prm: RewardHandle, question: str, paths: Sequence[Sequence[str]]) -> list[list[float]]:
    """PRM scores of each path (a list of step texts), one per step; checks the PRM kept its side of the contract."""
    if not paths:
        return []
    scores = prm.score(question, [list(p) for p in paths])
    if len(scores) != len(paths):
        raise RuntimeError(f"PRM returned scores for {len(scores)} trajectories, expected {len(paths)}")
    for p, s in zip(paths, scores):
        if len(s) != len(p):
            raise RuntimeError(f"PRM returned {len(s)} step scores for a trajectory of {len(p)} steps")
    return [list(map(float, s)) for s in scores]


def require_prm(prm: RewardHandle | None, method: str) -> RewardHandle:
    if prm is None:
        raise ValueError(f"{method} needs a PRM (give the recipe a `prm` pool section)")
    return prm


def prompt_of(problem_prompt: str, node: Node) -> str:
    return problem_prompt + node.text


class Candidate:
    """A sampled next step and the greedy lookahead steps rolled out after it (scored, not kept)."""

    __slots__ = ("step", "lookahead")

    def __init__(self, step: Step, lookahead: list[Step] | None = None):
        self.step = step
        self.lookahead = lookahead or []

    @property
    def ended(self) -> bool:
        """The trajectory ends with this step: EOS, length, or an empty step."""
        return self.step.finish_reason in ("eos", "length") or self.step.text == ""


def sample_next_steps(
    policy: PolicyHandle,
    problem_prompt: str,
    parents: Sequence[Node],
    counts: Sequence[int],
    cfg: SearchConfig,
    *,
    last: bool,
    lookahead: int,
    tag: object,
    keys: Sequence[object] | None = None,
) -> list[list[Candidate]]:
    """counts[i] candidate next steps for parents[i], in one batched call, plus `lookahead` greedy steps each.

    A step stops on the delimiter, except on the last iteration (`last`), which runs to EOS. Each request's
    max_tokens is what is left of the trajectory's budget. Lookahead rollouts run at temperature 0 with the
    delimiter as stop, and stop early on EOS, length or an empty step. Request seeds derive from the base seed,
    `tag` and each parent's key (`keys`, default its index), so results do not depend on how parents are batched.
    """
    keys = list(range(len(parents))) if keys is None else list(keys)
    stop = () if last else (cfg.step_delimiter,)
    prompts = [problem_prompt + p.text for p in parents]
    left = [cfg.max_tokens - p.tokens for p in parents]
    groups = sample(
        policy, prompts, [c if l > 0 else 0 for c, l in zip(counts, left)], max_tokens=left,
        temperature=cfg.temperature, top_p=cfg.top_p, stop=stop,
        seeds=[derive_seed(cfg.seed, tag, k) for k in keys],
    )
    cands = [[Candidate(step_from(c)) for c in g] for g in groups]
    for k in range(lookahead):
        todo = []
        for i, group in enumerate(cands):
            for j, cand in enumerate(group):
                tail = cand.lookahead[-1] if cand.lookahead else cand.step
                used = parents[i].tokens + cand.step.tokens + sum(s.tokens for s in cand.lookahead)
                if tail.finish_reason in ("eos", "length") or tail.text == "" or used >= cfg.max_tokens:
                    continue
                todo.append((i, cand, used, j))
        if not todo:
            break
        res = sample(
            policy,
            [prompts[i] + cand.step.text + "".join(s.text for s in cand.lookahead) for i, cand, _, _ in todo],
            [1] * len(todo), max_tokens=[cfg.max_tokens - used for _, _, used, _ in todo],
            temperature=0.0, top_p=1.0, stop=(cfg.step_delimiter,),
            seeds=[derive_seed(cfg.seed, tag, "lookahead", k, keys[i], j) for i, _, _, j in todo],
        )
        for (_, cand, _, _), [c] in zip(todo, res):
            cand.lookahead.append(step_from(c))
    return cands
