"""What the search methods share: the base config, seeding, one-step sampling and PRM scoring helpers.

The prompt for continuing a trajectory is always problem_prompt + the trajectory's text so far. A step ends when
the engine stops on the step delimiter (kept in the text). A completion sampled without a stop string (best-of-N,
the last iteration of beam search and DVTS) is split into steps on the delimiter before it is scored or stored
(`steps_from`, `tree.split_steps`), as search-and-learn re-splits such texts: one PRM score per real step.

Token limits. `max_tokens` is the limit of one policy call, as in search-and-learn:
- best-of-N, majority, greedy: one call per completion, so it bounds the whole completion;
- beam search, DVTS (`StepwiseConfig`): every step call gets the full `max_tokens` (the depth is bounded by
  `num_iterations`); the optional `max_total_tokens` (ponder's, off by default) bounds a whole trajectory's
  generated tokens, each step call then getting at most what is left of it;
- REBASE and MCTS keep their references' keys: a per-step key (`max_step_tokens` / `max_new_tokens`) and
  `max_tokens` for the whole trajectory (see their modules).

Seeds. Every request's seed derives from the base seed, the problem's key (its id; without one, its question
text: `problem_key`) and the request's place in the search, so different problems draw different numbers and the
same problem draws the same ones on every run, however problems and subtrees are batched or split into tasks.
"""
from __future__ import annotations

import hashlib
from typing import Literal, Sequence

from pydantic import Field

from app.contracts import Completion, GenerationRequest, PolicyHandle, RewardHandle
from app.config import Config
from app.search.tree import Node, Step, split_steps

AggStrategy = Literal["last", "min", "prod", "mean"]


class SearchConfig(Config):
    """Keys every method shares (names as in search-and-learn's config)."""

    temperature: float = Field(0.8, ge=0.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling")
    max_tokens: int = Field(
        2048, ge=1,
        description="generated-token limit of one policy call (best-of-N, majority, greedy: the whole completion; "
        "the other methods' configs say what it bounds there)",
    )
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


class StepwiseConfig(SearchConfig):
    """The token keys of the methods that sample one step per policy call (beam search, DVTS).

    max_tokens: the limit of EVERY step call, as in search-and-learn (the depth is bounded by num_iterations; the
        last iteration, which runs to EOS without a stop string, gets it too).
    max_total_tokens: optional (ponder's; None = no bound, search-and-learn's behaviour): a bound on a whole
        trajectory's generated tokens; each step call gets min(max_tokens, what is left), and a trajectory whose
        bound is spent ends there, unfinished.
    """

    max_tokens: int = Field(
        2048, ge=1, description="generated-token limit of each step call (search-and-learn's meaning)"
    )
    max_total_tokens: int | None = Field(
        None, ge=1,
        description="optional bound on a whole trajectory's generated tokens (each step call gets at most what is "
        "left; None: no bound, as search-and-learn)",
    )

    def step_limit(self, used: int) -> int:
        """max_tokens of the next step call of a trajectory that has generated `used` tokens (<= 0: spent)."""
        if self.max_total_tokens is None:
            return self.max_tokens
        return min(self.max_tokens, self.max_total_tokens - used)

    def total_spent(self, used: int) -> bool:
        """The trajectory's max_total_tokens bound is spent (never, without one)."""
        return self.max_total_tokens is not None and used >= self.max_total_tokens


def problem_key(question: str, problem_id: str | None = None) -> str:
    """What tells one problem's seeds from another's: its id, or, without one, its question text."""
    return str(problem_id) if problem_id is not None else question


def derive_seed(seed: int | None, *parts: object) -> int | None:
    """A per-request seed from the base seed and the request's place in the search (stable across runs).

    Pass the problem's key (`problem_key`) among the parts, so that problems draw different numbers.
    """
    if seed is None:
        return None
    h = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=4).digest()
    return int.from_bytes(h, "little") & 0x7FFFFFFF


def step_from(c: Completion) -> Step:
    """A completion that is one step (it was sampled with the delimiter as stop string)."""
    return Step(text=c.text, tokens=c.generated_tokens, finish_reason=c.finish_reason, mean_logprob=c.mean_logprob)


def steps_from(c: Completion, delimiter: str) -> list[Step]:
    """A completion as the steps it holds, split on the delimiter (`tree.split_steps`): one step for a completion
    sampled with the delimiter as stop string, several for one that ran to EOS without it.

    Every step but the last ended on the delimiter ("stop"); the last keeps the completion's finish reason. The
    engine does not say how the tokens fall between the steps, so the last step carries the completion's token
    count (a trajectory's total stays exact); each step keeps the completion's mean log-probability.
    """
    *head, last = split_steps(c.text, delimiter)
    lp = c.mean_logprob
    return [Step(text=t, tokens=0, finish_reason="stop", mean_logprob=lp) for t in head] + [
        Step(text=last, tokens=c.generated_tokens, finish_reason=c.finish_reason, mean_logprob=lp)
    ]


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
    """A sampled continuation (its steps: one, or several when it ran to EOS without a stop string) and the greedy
    lookahead steps rolled out after it (scored, not kept)."""

    __slots__ = ("steps", "lookahead")

    def __init__(self, steps: list[Step], lookahead: list[Step] | None = None):
        self.steps = steps
        self.lookahead = lookahead or []

    @property
    def step(self) -> Step:
        """The last step: how the continuation ended."""
        return self.steps[-1]

    @property
    def texts(self) -> list[str]:
        return [s.text for s in self.steps]

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.steps)

    @property
    def ended(self) -> bool:
        """The trajectory ends with this continuation: EOS, length, or an empty step."""
        return self.step.finish_reason in ("eos", "length") or self.step.text == ""


def sample_next_steps(
    policy: PolicyHandle,
    problem_prompt: str,
    parents: Sequence[Node],
    counts: Sequence[int],
    cfg: StepwiseConfig,
    *,
    last: bool,
    lookahead: int,
    tag: object,
    problem: str,
    keys: Sequence[object] | None = None,
) -> list[list[Candidate]]:
    """counts[i] candidate next steps for parents[i], in one batched call, plus `lookahead` greedy steps each.

    A step stops on the delimiter, except on the last iteration (`last`), which runs to EOS; such a continuation
    is split into the steps it holds (`steps_from`). Each request's max_tokens is `cfg.max_tokens` (per call),
    or less when `cfg.max_total_tokens` leaves less of the trajectory's bound (a parent with none left gets no
    request). Lookahead rollouts run at temperature 0 with the delimiter as stop, and stop early on EOS, length or
    an empty step. Request seeds derive from the base seed, the `problem` key, `tag` and each parent's key
    (`keys`, default its index), so results do not depend on how parents are batched.
    """
    keys = list(range(len(parents))) if keys is None else list(keys)
    delim = cfg.step_delimiter
    stop = () if last else (delim,)
    prompts = [problem_prompt + p.text for p in parents]
    limits = [cfg.step_limit(p.tokens) for p in parents]
    groups = sample(
        policy, prompts, [c if l > 0 else 0 for c, l in zip(counts, limits)], max_tokens=limits,
        temperature=cfg.temperature, top_p=cfg.top_p, stop=stop,
        seeds=[derive_seed(cfg.seed, problem, tag, k) for k in keys],
    )
    cands = [[Candidate(steps_from(c, delim)) for c in g] for g in groups]
    for k in range(lookahead):
        todo = []
        for i, group in enumerate(cands):
            for j, cand in enumerate(group):
                tail = cand.lookahead[-1] if cand.lookahead else cand.step
                limit = cfg.step_limit(parents[i].tokens + cand.tokens + sum(s.tokens for s in cand.lookahead))
                if tail.finish_reason in ("eos", "length") or tail.text == "" or limit <= 0:
                    continue
                todo.append((i, cand, limit, j))
        if not todo:
            break
        res = sample(
            policy,
            [prompts[i] + "".join(cand.texts) + "".join(s.text for s in cand.lookahead) for i, cand, _, _ in todo],
            [1] * len(todo), max_tokens=[limit for _, _, limit, _ in todo],
            temperature=0.0, top_p=1.0, stop=(delim,),
            seeds=[derive_seed(cfg.seed, problem, tag, "lookahead", k, keys[i], j) for i, _, _, j in todo],
        )
        for (_, cand, _, _), [c] in zip(todo, res):
            cand.lookahead.extend(steps_from(c, delim))
    return cands
