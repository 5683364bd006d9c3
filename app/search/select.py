"""Score aggregation and answer selection (search-and-learn's naive / weighted / majority, OpenR's names).

aggregate(scores, strategy): one number per trajectory from its per-step PRM scores, by `last`, `min`, `prod`
or `mean`. An empty score list is an error here; the references silently use -1 (OpenR) or 0 (REBASE).

Selection at every n = 1, 2, 4, ... N uses the *first n* completions of one run, in the order the method returned
them (DVTS: whole subtrees only, so n runs over the multiples of the subtree size; see `budgets`).
  naive    = the answer of the completion with the best aggregate (ties: the first one);
  weighted = the answer class with the largest sum of aggregates (ties: the class seen first);
  maj      = the largest answer class (ties: the class seen first).
Answers are grouped by equivalence class (default: app.grading.answers_equivalent, imported lazily), not by exact
string as OpenR does: pass exact=True for OpenR's grouping. Each class is represented by its first member; the
chosen answer is that member's answer and its correctness is that member's.

ponder differs from the references on purpose in: the error on empty scores (above); completions without an
extracted answer take no part in the votes (a None answer is never a class), though `naive` may still pick one
(it then answers nothing and is wrong); when N is not a power of two, N itself is reported too.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

AGG_STRATEGIES = ("last", "min", "prod", "mean")
RULES = ("naive", "weighted", "maj")

# OpenR's best-of-N names -> (ponder rule, aggregation); majority_vote needs no scores.
OPENR_NAMES: dict[str, tuple[str, str | None]] = {
    "prm_last_max": ("naive", "last"),
    "prm_min_max": ("naive", "min"),
    "prm_last_vote": ("weighted", "last"),
    "prm_min_vote": ("weighted", "min"),
    "majority_vote": ("maj", None),
}

Equivalence = Callable[[str, str], bool]


def aggregate(scores: Sequence[float], strategy: str) -> float:
    """Aggregate one trajectory's per-step scores. Empty scores are an error, never a silent 0 or -1."""
    if strategy not in AGG_STRATEGIES:
        raise ValueError(f"unknown agg_strategy {strategy!r} (one of: {', '.join(AGG_STRATEGIES)})")
    if len(scores) == 0:
        raise ValueError("cannot aggregate an empty list of step scores (the PRM returned no score for any step)")
    if strategy == "last":
        return float(scores[-1])
    if strategy == "min":
        return float(min(scores))
    if strategy == "prod":
        return float(math.prod(scores))
    return float(sum(scores) / len(scores))


def budgets(N: int, group_size: int = 1) -> list[int]:
    """The n reported for a run of N completions: 1, 2, 4, ... <= N, plus N itself when it is not a power of two.

    With subtrees of `group_size` completions (DVTS), only n that are whole multiples of the group size count.
    """
    if N < 1:
        return []
    ns, n = [], 1
    while n <= N:
        ns.append(n)
        n *= 2
    if ns[-1] != N:
        ns.append(N)
    g = max(1, group_size)
    return [n for n in ns if n % g == 0]


def default_equivalence() -> Equivalence:
    from app.grading import answers_equivalent  # lazy: grading pulls in math-verify

    return answers_equivalent


def answer_classes(
    answers: Sequence[str | None], equivalent: Equivalence | None = None, exact: bool = False
) -> list[int | None]:
    """The class id of each answer (None for no answer). Classes are numbered in order of first appearance.

    Identical strings share a class without calling `equivalent`; distinct strings are compared with each class's
    first member (its representative).
    """
    if not exact and equivalent is None:
        equivalent = default_equivalence()
    reps: list[str] = []  # representative string of each class
    by_string: dict[str, int] = {}
    out: list[int | None] = []
    for a in answers:
        if a is None:
            out.append(None)
            continue
        if a in by_string:
            out.append(by_string[a])
            continue
        cls = None
        if not exact:
            for k, rep in enumerate(reps):
                if equivalent(rep, a):  # type: ignore[misc]
                    cls = k
                    break
        if cls is None:
            cls = len(reps)
            reps.append(a)
        by_string[a] = cls
        out.append(cls)
    return out


def _first_index_of_class(classes: Sequence[int | None], n: int) -> dict[int, int]:
    first: dict[int, int] = {}
    for i in range(n):
        c = classes[i]
        if c is not None and c not in first:
            first[c] = i
    return first


def select_naive(aggs: Sequence[float], n: int) -> int | None:
    """Index of the best aggregate among the first n (ties: the first)."""
    if n <= 0:
        return None
    best = 0
    for i in range(1, n):
        if aggs[i] > aggs[best]:
            best = i
    return best


def select_weighted(classes: Sequence[int | None], aggs: Sequence[float], n: int) -> int | None:
    """Index of the first member of the class with the largest sum of aggregates among the first n."""
    first = _first_index_of_class(classes, n)
    if not first:
        return None
    totals: dict[int, float] = {c: 0.0 for c in first}
    for i in range(n):
        if classes[i] is not None:
            totals[classes[i]] += aggs[i]  # type: ignore[index]
    order = sorted(first, key=lambda c: first[c])  # first seen first
    best = order[0]
    for c in order[1:]:
        if totals[c] > totals[best]:
            best = c
    return first[best]


def select_majority(classes: Sequence[int | None], n: int) -> int | None:
    """Index of the first member of the largest class among the first n (ties: the class seen first)."""
    first = _first_index_of_class(classes, n)
    if not first:
        return None
    counts: dict[int, int] = {c: 0 for c in first}
    for i in range(n):
        if classes[i] is not None:
            counts[classes[i]] += 1  # type: ignore[index]
    order = sorted(first, key=lambda c: first[c])
    best = order[0]
    for c in order[1:]:
        if counts[c] > counts[best]:
            best = c
    return first[best]


def select_all(
    answers: Sequence[str | None],
    scores: Sequence[Sequence[float] | None] | None,
    agg_strategy: str = "last",
    N: int | None = None,
    group_size: int = 1,
    equivalent: Equivalence | None = None,
    exact: bool = False,
) -> dict[str, dict[int, int | None]]:
    """Chosen completion index for every rule and every reported n.

    Returns {rule: {n: index or None}}. `naive` and `weighted` need scores for every completion; without them
    (a method run without a PRM) they are absent. N defaults to the number of completions; an n larger than the
    number available uses them all.
    """
    total = len(answers)
    N = total if N is None else N
    classes = answer_classes(answers, equivalent, exact)
    have_scores = scores is not None and len(scores) == total and all(s is not None for s in scores)
    aggs = [aggregate(s, agg_strategy) for s in scores] if have_scores else None  # type: ignore[union-attr,arg-type]
    out: dict[str, dict[int, int | None]] = {"maj": {}}
    if aggs is not None:
        out["naive"], out["weighted"] = {}, {}
    for n in budgets(N, group_size):
        m = min(n, total)
        out["maj"][n] = select_majority(classes, m)
        if aggs is not None:
            out["naive"][n] = select_naive(aggs, m)
            out["weighted"][n] = select_weighted(classes, aggs, m)
    return {r: out[r] for r in RULES if r in out}


def select_openr(
    name: str,
    answers: Sequence[str | None],
    scores: Sequence[Sequence[float]] | None,
    equivalent: Equivalence | None = None,
    exact: bool = True,
) -> int | None:
    """OpenR's best-of-N rules by their names (exact-string grouping, as OpenR does, unless exact=False)."""
    if name not in OPENR_NAMES:
        raise ValueError(f"unknown OpenR selection {name!r} (one of: {', '.join(OPENR_NAMES)})")
    rule, agg = OPENR_NAMES[name]
    classes = answer_classes(answers, equivalent, exact)
    n = len(answers)
    if rule == "maj":
        return select_majority(classes, n)
    if scores is None:
        raise ValueError(f"{name} needs PRM scores")
    aggs = [aggregate(s, agg) for s in scores]  # type: ignore[arg-type]
    return select_naive(aggs, n) if rule == "naive" else select_weighted(classes, aggs, n)
