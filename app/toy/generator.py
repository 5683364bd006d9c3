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
from the seed. Sources `toy:train` / `toy:test` (`load_toy`, `toy_problems`) give `app.problems.Problem` records.
"""
from __future__ import annotations

import hashlib
import os
import re
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

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


def toy_prompt(problem: Any) -> str:
    """The toy policy's prompt for a problem (anything with `.question`, or the question text itself)."""
    question = problem if isinstance(problem, str) else problem.question
    return f"Question: {question}{STEP_SEP}Answer:{STEP_SEP}"


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
    return _make_problem(**fields)


def _make_problem(**fields):
    try:
        from app.problems import Problem
    except ImportError:  # app/problems.py is written beside this module; same fields
        return _FallbackProblem(**fields)
    return _build(Problem, fields)


def _build(cls, fields: dict):
    import dataclasses
    import inspect

    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set(inspect.signature(cls).parameters)
    kw = {k: v for k, v in fields.items() if k in names}
    if "tags" in kw:
        ann = str(next((f.type for f in dataclasses.fields(cls) if f.name == "tags"), "")) if dataclasses.is_dataclass(cls) else ""
        if ann.startswith("list"):
            kw["tags"] = list(kw["tags"])
    return cls(**kw)


@dataclass(frozen=True)
class _FallbackProblem:
    id: str
    question: str
    answer: str
    solution: str
    level: int
    tags: tuple[str, ...] = ()


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
    """`toy:train` / `toy:test` -> problems (the hook for app.problems.load_problems)."""
    if source not in SOURCES:
        raise ValueError(f"unknown toy source {source!r}; one of {', '.join(SOURCES)}")
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


_BRACKET = re.compile(r"^\s*([0-9+\- ()]*\([0-9+\- ]+\)[0-9+\- ()]*) = ([0-9+\- ]+)\.\s*$", re.S)
_STEP = re.compile(r"^\s*(\d+) ([+-]) (\d+) = (-?\d+)\.(?: Left: (.*)\.)?\s*$", re.S)


def parse_expression(text: str) -> Terms | None:
    """`"47 + 18 - 23"` -> [(1, 47), (1, 18), (-1, 23)]; None when it is not such an expression."""
    toks = text.strip().split(" ")
    if len(toks) % 2 == 0 or not all(t.isdigit() for t in toks[::2]) or not all(t in "+-" and t for t in toks[1::2]):
        return None
    terms = [(1, int(toks[0]))]
    for op, v in zip(toks[1::2], toks[2::2]):
        terms.append((1 if op == "+" else -1, int(v)))
    return terms


def question_terms(question: str) -> Terms:
    """The terms of a toy question (`question_of`'s inverse); ValueError for anything else."""
    m = re.fullmatch(r"What is (.*)\?", question.strip())
    terms = parse_expression(m.group(1)) if m else None
    if terms is None:
        raise ValueError(f"not a toy question: {question!r}")
    return terms


def exact_step_labels(question: str, steps: Sequence[str]) -> list[int]:
    """The true correctness of each step prefix of a toy solution (1 while every step so far is right).

    A computation step is right when its arithmetic is true, the expression left has one term fewer and still
    equals the answer (or, on the last computation, its result is the answer); the answer step when the boxed
    number is the answer. Once a step is wrong, every later prefix is wrong. The toy PRM's training labels
    (`mc_labels` with k=0: the limit of Monte-Carlo hard labels, since a slip is never undone), and the truth its
    step AUC is reported against.
    """
    terms = question_terms(question)
    gold = evaluate(terms)
    n_terms = len(terms)
    ok, out = True, []
    for step in steps:
        s = step.strip()
        if ok:
            box = re.fullmatch(r"The answer is \\boxed\{(-?\d+)\}\.?", s)
            st = _STEP.match(s)
            br = _BRACKET.match(s)
            if box:
                ok = int(box.group(1)) == gold and n_terms == 1
            elif st:
                a, op, b, c = int(st.group(1)), st.group(2), int(st.group(3)), int(st.group(4))
                ok = (a + b if op == "+" else a - b) == c
                if st.group(5) is not None:
                    left = parse_expression(st.group(5))
                    ok = ok and left is not None and len(left) == n_terms - 1 and evaluate(left) == gold
                    n_terms = len(left) if left else n_terms - 1
                else:
                    ok = ok and n_terms == 2 and c == gold
                    n_terms = 1
            elif br:
                before = parse_expression(br.group(1).replace("(", "").replace(")", ""))
                left = parse_expression(br.group(2))
                ok = (before is not None and left is not None and len(before) == n_terms
                      and evaluate(before) == gold and len(left) == n_terms - 1 and evaluate(left) == gold)
                n_terms = len(left) if left else n_terms - 1
            else:
                ok = False
        out.append(int(ok))
    return out


def right_steps(terms: Sequence[tuple[int, int]]) -> list[str]:
    """Every right next step from `terms`, as the training solutions write it (the answer step when one is left)."""
    terms = list(terms)
    if len(terms) == 1:
        return [f"The answer is \\boxed{{{terms[0][1]}}}."]
    out = []
    for i, j in moves(terms):
        text, new = apply_move(terms, i, j)
        out.append(f"{text}." if len(new) == 1 else f"{render_bracket(terms, i)} = {render(new)}.")
    return out


def first_wrong_chars(question: str, steps: Sequence[str]) -> list[int | None]:
    """Where each step stops being right, for the PRM's per-token labels: None for a right step; for the first
    wrong step the index of its first character that no right step continues (the slip: a miscopied term, a
    wrong sum); 0 for every step after it. Right and wrong are `exact_step_labels`' verdicts, so a step that is
    right in value but laid out differently from `right_steps` stays right.
    """
    exact = exact_step_labels(question, steps)
    terms = question_terms(question)
    gold = evaluate(terms)
    out: list[int | None] = []
    for step, ok in zip(steps, exact):
        s = step.strip()
        if out and out[-1] is not None:
            out.append(0)
        elif ok:
            out.append(None)
            br, st = _BRACKET.match(s), _STEP.match(s)
            left = br.group(2) if br else st.group(5) if st else None
            terms = parse_expression(left) if left else [(1, gold)]
        else:
            lead = len(step) - len(step.lstrip())
            out.append(lead + max(len(os.path.commonprefix([s, r])) for r in right_steps(terms)))
    return out
