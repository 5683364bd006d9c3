"""The toy world's checker: which steps of a toy solution are right, and where a wrong one slips.

It judges a trajectory against the question alone (`exact_step_labels`): the toy PRM's training labels, the
oracle verifier (`prm.format: toy-checker`), and the yardstick of `ponder toy eval`.
"""
from __future__ import annotations

import os
import re
from typing import Sequence

from app.toy.world import Terms, apply_move, evaluate, moves, render, render_bracket


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
