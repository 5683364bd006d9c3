"""The toy world's problems: sums and differences of small integers, solved one operation per step.

A problem is an expression such as `What is 7 + 12 - 5 + 9?`. Each step puts brackets around two neighbouring
terms and rewrites the expression with their value, so a tiny model never has to remember what it has used::

    7 + (12 - 5) + 9 = 7 + 7 + 9.

    7 + (7 + 9) = 7 + 16.

    7 + 16 = 23.

    The answer is \\boxed{23}.

Steps are separated by "\\n\\n"; the last computation is a plain `a + b = c.` and the last step is always
`The answer is \\boxed{N}` (N an integer >= 0).

Why this shape (it is what makes test-time compute matter in the toy world):

- Difficulty is graded by the number of terms (steps) and the size of the numbers (`LEVELS`): level 1 is three
  numbers up to 12, level 5 seven numbers up to 15. A tiny character model trained for minutes on 2 CPU cores
  solves level 1 mostly and level 5 rarely: each step is a chance to slip (a copied term, a carry), and one slip
  anywhere propagates to the answer.
- A step may combine any two neighbouring terms whose first is added (`a + b`, or `a - b` when that is not
  negative), and the training solutions pick among them at random. So the policy learns a distribution over
  solution paths: samples take different paths whose slips are nearly independent, which is where majority
  voting (self-consistency) beats greedy decoding and where a PRM can pick the good path.
- Every step is a local edit of the line before it: copy the expression with brackets inserted, then copy it
  again with the bracket replaced by its value. A 2-layer model learns such copies far sooner than tracking
  which terms are left (measured: the bracketed layout roughly doubles accuracy on levels 2-4 at equal compute
  over `a + b = c. Left: ...`, which `STYLE = "left"` still produces).
- No answer or intermediate value is negative, and no order of valid steps gets stuck (`solvable`).

The policy's prompt is plain text (the toy tokenizer has no chat template): `toy_prompt(problem)` =
`"Question: {question}\\n\\nAnswer:\\n\\n"`; the model then writes the steps, each ending in "\\n\\n", and EOS.

Splits: a problem belongs to `test` when a hash of its question text falls in the test bucket (1 in 8), else to
`train`, so the two splits never share a problem whatever the seed, level or count. Everything is deterministic
from the seed. Sources `toy:train` / `toy:test` (`load_toy`, `toy_problems`) give `app.problems.Problem` records. The checker of steps is `app.toy.checker`.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from app.problems import Problem, toy_prompt  # noqa: F401  (toy_prompt: the toy world's prompt, re-exported)

STEP_SEP = "\n\n"
SOURCES = ("toy:train", "toy:test")
TEST_BUCKETS = 8  # 1 in TEST_BUCKETS problems (by question hash) is held out


@dataclass(frozen=True)
class Level:
    terms: int  # number of numbers in the expression (steps = terms - 1, plus the answer step)
    low: int  # smallest number
    high: int  # largest number
    p_minus: float  # chance that each term after the first is subtracted


LEVELS: dict[int, Level] = {
    1: Level(terms=3, low=1, high=12, p_minus=0.25),
    2: Level(terms=4, low=1, high=9, p_minus=0.25),
    3: Level(terms=5, low=1, high=9, p_minus=0.25),
    4: Level(terms=6, low=1, high=12, p_minus=0.25),
    5: Level(terms=7, low=1, high=15, p_minus=0.25),
}


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big")


def split_of(question: str) -> str:
    """`test` or `train`, from the question text alone (so the splits are disjoint by construction)."""
    return "test" if _hash(question) % TEST_BUCKETS == 0 else "train"


# An expression is a list of signed terms: (+1, 47), (-1, 23), ... The first term is always positive.
Terms = list[tuple[int, int]]


def render(terms: Sequence[tuple[int, int]]) -> str:
    out = str(terms[0][1])
    for sign, value in terms[1:]:
        out += f" {'+' if sign > 0 else '-'} {value}"
    return out


def render_bracket(terms: Sequence[tuple[int, int]], i: int) -> str:
    """The expression with terms i and i + 1 in brackets: `4 + (7 + 3) + 3`."""
    parts = [str(terms[0][1])] + [f"{'+' if s > 0 else '-'} {v}" for s, v in terms[1:]]
    first = parts[i].split(" ")
    parts[i] = f"({first[0]}" if i == 0 else f"{first[0]} ({first[1]}"
    parts[i + 1] = parts[i + 1] + ")"
    return " ".join(parts)


STYLE = "bracket"  # "left": `a + b = c. Left: rest.` (an older layout, harder for a 2-layer model)


def evaluate(terms: Sequence[tuple[int, int]]) -> int:
    return sum(sign * value for sign, value in terms)


def sample_terms(rng: random.Random, level: int) -> Terms:
    spec = LEVELS[level]
    while True:
        terms = [(1, rng.randint(spec.low, spec.high))]
        for _ in range(spec.terms - 1):
            terms.append((-1 if rng.random() < spec.p_minus else 1, rng.randint(spec.low, spec.high)))
        if evaluate(terms) >= 0 and solvable(terms):
            return terms


def moves(terms: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Valid steps: adjacent terms (i, i + 1) where term i is added and the result is not negative."""
    out = []
    for i in range(len(terms) - 1):
        (si, a), (sj, b) = terms[i], terms[i + 1]
        if si > 0 and (sj > 0 or a >= b):
            out.append((i, i + 1))
    return out


def solvable(terms: Sequence[tuple[int, int]], _memo: dict | None = None) -> bool:
    """No order of valid steps gets stuck (a state of several terms with no valid step)."""
    memo = {} if _memo is None else _memo
    key = tuple(terms)
    if key in memo:
        return memo[key]
    if len(terms) == 1:
        return True
    options = moves(terms)
    ok = bool(options) and all(solvable(apply_move(terms, i, j)[1], memo) for i, j in options)
    memo[key] = ok
    return ok


def apply_move(terms: Sequence[tuple[int, int]], i: int, j: int) -> tuple[str, Terms]:
    """Combine terms i (positive) and j; the result takes i's place. Returns (the computation, the new terms)."""
    (_, a), (sj, b) = terms[i], terms[j]
    c = a + b if sj > 0 else a - b
    text = f"{a} {'+' if sj > 0 else '-'} {b} = {c}"
    new = [t for k, t in enumerate(terms) if k != j]
    new[i if i < j else i - 1] = (1, c)
    return text, new


def solve(terms: Sequence[tuple[int, int]], rng: random.Random | None = None) -> list[str]:
    """A step-by-step solution; with `rng` the order of operations is random, else always the first valid move.

    Problems are generated `solvable`, so every order of valid steps reaches the answer.
    """
    terms = list(terms)
    steps = []
    while len(terms) > 1:
        options = moves(terms)
        i, j = rng.choice(options) if rng is not None else options[0]
        before = terms
        text, terms = apply_move(terms, i, j)
        if STYLE == "bracket":
            steps.append(f"{text}." if len(terms) == 1 else f"{render_bracket(before, i)} = {render(terms)}.")
        else:
            steps.append(f"{text}." if len(terms) == 1 else f"{text}. Left: {render(terms)}.")
    steps.append(f"The answer is \\boxed{{{terms[0][1]}}}.")
    return steps


def question_of(terms: Sequence[tuple[int, int]]) -> str:
    return f"What is {render(terms)}?"


def _problem(terms: Terms, level: int, split: str, seed: int):
    question = question_of(terms)
    steps = solve(terms, random.Random(f"{seed}:{question}"))
    fields = dict(
        id=f"toy-L{level}-{_hash(question) % 16**10:010x}",
        question=question,
        answer=str(evaluate(terms)),
        solution=STEP_SEP.join(steps),
        level=level,
        tags=("toy", f"toy:{split}", f"level:{level}"),
    )
    return Problem(**dict(fields, tags=list(fields["tags"])))


def iter_terms(split: str, level: int, seed: int) -> Iterator[Terms]:
    """Distinct expressions of one split and level, in a fixed order for the seed."""
    if split not in ("train", "test"):
        raise ValueError(f"toy split must be 'train' or 'test', got {split!r}")
    if level not in LEVELS:
        raise ValueError(f"toy level must be one of {sorted(LEVELS)}, got {level!r}")
    rng = random.Random(f"toy:{seed}:{split}:{level}")
    seen: set[str] = set()
    misses = 0
    while misses < 100_000:
        terms = sample_terms(rng, level)
        q = question_of(terms)
        if q in seen or split_of(q) != split:
            misses += q in seen
            continue
        seen.add(q)
        yield terms
    raise ValueError(f"toy level {level} has no more distinct {split} problems (asked for more than {len(seen)})")


def toy_problems(split: str = "test", n_per_level: int = 200, levels: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0) -> list:
    """`n_per_level` problems of each level in `levels`, from `split` ('train' or 'test'); deterministic.

    This is what `load_problems("toy:train" | "toy:test")` returns.
    """
    split = split.removeprefix("toy:")
    out = []
    for level in levels:
        gen = iter_terms(split, int(level), seed)
        for _ in range(n_per_level):
            out.append(_problem(next(gen), int(level), split, seed))
    return out


def load_toy(source: str, n_per_level: int = 200, levels: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0) -> list:
    """`toy:train` / `toy:test` -> problems (the hook for app.datasets.load_problems)."""
    if source not in SOURCES:
        from app.config import ConfigError

        raise ConfigError(f"unknown toy data source {source!r}; use one of {', '.join(SOURCES)}")
    return toy_problems(source, n_per_level=n_per_level, levels=levels, seed=seed)


def _cycle_terms(split: str, level: int, seed: int) -> Iterator[Terms]:
    """iter_terms, started over (same order) when the level has no more distinct problems."""
    while True:
        try:
            yield from iter_terms(split, level, seed)
        except ValueError:
            pass


def sft_examples(n_per_level: int, levels: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0,
                 orders_per_problem: int = 1, weights: dict[int, float] | None = None) -> list[dict]:
    """Training pairs {prompt, completion, level, answer} from the train split; each problem gets
    `orders_per_problem` solutions with independently random orders of operations. `weights` scale the
    count per level (e.g. more of the long problems)."""
    rng = random.Random(f"toy-sft:{seed}")
    out = []
    for level in levels:
        n = int(round(n_per_level * (weights or {}).get(level, 1.0)))
        gen = _cycle_terms("train", int(level), seed + 1_000_003)
        for _ in range(n):
            terms = next(gen)
            q = question_of(terms)
            for _ in range(orders_per_problem):
                steps = solve(terms, rng)
                out.append(dict(prompt=toy_prompt(q), completion=STEP_SEP.join(steps), level=int(level),
                                answer=str(evaluate(terms)), question=q))
    rng.shuffle(out)
    return out
