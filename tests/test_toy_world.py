"""The toy world's problems: deterministic, disjoint splits, correct answers, well-formed steps."""
from __future__ import annotations

import random
import re

import pytest

from app.search.tree import split_steps
from app.toy.checker import exact_step_labels, first_wrong_chars, parse_expression, right_steps
from app.toy.world import (LEVELS, STEP_SEP, apply_move, evaluate, moves, sample_terms, sft_examples, solve, split_of,
                           toy_problems, toy_prompt)

LAST = re.compile(r"^(\d+) ([+-]) (\d+) = (\d+)\.$")
BRACKET = re.compile(r"^(.*)\((\d+) ([+-]) (\d+)\)(.*) = (.*)\.$")


@pytest.fixture(scope="module")
def test_set():
    return toy_problems("test", n_per_level=200, seed=0)


def test_deterministic(test_set):
    again = toy_problems("test", n_per_level=200, seed=0)
    assert [(p.id, p.question, p.answer, p.solution) for p in again] == [
        (p.id, p.question, p.answer, p.solution) for p in test_set]
    other = toy_problems("test", n_per_level=200, seed=1)
    assert [p.question for p in other] != [p.question for p in test_set]


def test_levels_and_counts(test_set):
    for level in LEVELS:
        mine = [p for p in test_set if p.level == level]
        assert len(mine) == 200
        assert len({p.question for p in mine}) == 200  # distinct within a split
        assert all(len(parse_expression(p.question[len("What is "):-1])) == LEVELS[level].terms for p in mine)


def test_splits_disjoint(test_set):
    train = toy_problems("train", n_per_level=1000, seed=0)
    assert not {p.question for p in train} & {p.question for p in test_set}
    assert all(split_of(p.question) == "test" for p in test_set)
    assert all(split_of(p.question) == "train" for p in train)
    sft = sft_examples(300, seed=0)
    assert not {e["question"] for e in sft} & {p.question for p in test_set}


def test_answers_are_the_value_of_the_expression(test_set):
    for p in test_set:
        expr = p.question[len("What is "):-1]
        assert int(p.answer) == eval(expr)  # noqa: S307 - our own digits and +/-
        assert int(p.answer) >= 0
        assert p.solution.endswith(f"The answer is \\boxed{{{p.answer}}}.")


def test_steps_are_well_formed_and_true(test_set):
    for p in test_set:
        steps = p.solution.split(STEP_SEP)
        terms = parse_expression(p.question[len("What is "):-1])
        assert len(steps) == len(terms)  # one step per operation, then the answer
        for s in steps[:-2]:
            m = BRACKET.match(s)
            assert m, s
            pre, a, op, b, post, after = m.groups()
            assert parse_expression(f"{pre}{a} {op} {b}{post}") == terms  # a faithful copy, brackets added
            value = int(a) + int(b) if op == "+" else int(a) - int(b)
            assert value >= 0
            assert after == f"{pre}{value}{post}"  # the bracket replaced by its value
            terms = parse_expression(after)
            assert eval(after) == int(p.answer)  # noqa: S307 - our own digits and +/-
        m = LAST.match(steps[-2])
        assert m, steps[-2]
        a, op, b, c = m.groups()
        assert (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(c) == int(p.answer)
        assert exact_step_labels(p.question, split_steps(p.solution)) == [1] * len(steps)


def test_exact_labels_catch_a_slip():
    p = toy_problems("test", n_per_level=1, levels=[4])[0]
    steps = split_steps(p.solution)
    head, tail = steps[1].rsplit(" = ", 1)
    first = tail.split(" ")[0]
    steps[1] = f"{head} = {tail.replace(first, str(int(first) + 1), 1)}"
    assert exact_step_labels(p.question, steps) == [1] + [0] * (len(steps) - 1)
    assert exact_step_labels(p.question, steps[:1]) == [1]


def test_first_wrong_chars_points_at_the_slip():
    q = "What is 7 + 12 - 5 + 9?"
    right = ["7 + (12 - 5) + 9 = 7 + 7 + 9.\n\n", "7 + (7 + 9) = 7 + 16.\n\n", "7 + 16 = 23.\n\n",
             "The answer is \\boxed{23}."]
    assert first_wrong_chars(q, right) == [None] * 4
    # a wrong difference: right up to the digit, and every later step is wrong from its first character
    slip = "7 + (12 - 5) + 9 = 7 + 8 + 9.\n\n"
    assert first_wrong_chars(q, [slip, "7 + (8 + 9) = 7 + 17.\n\n"]) == [slip.index("8"), 0]
    # a miscopied term in the bracket; the last computation and the answer step are checked too
    assert first_wrong_chars(q, ["7 + (13 - 5) + 9 = 7 + 8 + 9.\n\n"]) == [6]
    assert first_wrong_chars(q, right[:2] + ["7 + 16 = 24.\n\n", "The answer is \\boxed{24}."]) == [None, None, 10, 0]
    answer = "The answer is \\boxed{32}."
    assert first_wrong_chars(q, right[:3] + [answer]) == [None, None, None, answer.index("32")]
    # a step the checker calls right stays right even when laid out unlike the training solutions
    assert exact_step_labels(q, ["7 + 12 - (5 + 9) = 7 + 12 - 14.\n\n"]) == [0]


def test_right_steps_are_the_training_solutions_steps():
    rng = random.Random(1)
    terms = sample_terms(rng, 4)
    first_steps = {solve(terms, random.Random(i))[0] for i in range(60)}
    assert first_steps == set(right_steps(terms))
    assert right_steps([(1, 5)]) == ["The answer is \\boxed{5}."]


def test_random_orders_cover_several_paths():
    rng = random.Random(0)
    terms = sample_terms(rng, 4)
    paths = {tuple(solve(terms, random.Random(i))) for i in range(40)}
    assert len(paths) > 3
    for path in paths:
        assert path[-1] == f"The answer is \\boxed{{{evaluate(terms)}}}."
    i, j = moves(terms)[0]
    _, new = apply_move(terms, i, j)
    assert evaluate(new) == evaluate(terms) and len(new) == len(terms) - 1


def test_prompt_and_problem_fields(test_set):
    p = test_set[0]
    assert toy_prompt(p) == f"Question: {p.question}\n\nAnswer:\n\n"
    assert p.id.startswith(f"toy-L{p.level}-")
    assert "toy:test" in p.tags
    assert len({q.id for q in test_set}) == len(test_set)
