"""Score aggregation and answer selection (naive / weighted / maj at n = 1, 2, 4, ...)."""
from __future__ import annotations

import math

import pytest

from app.search.select import (
    OPENR_NAMES,
    aggregate,
    answer_classes,
    budgets,
    select_all,
    select_openr,
)
from app.search.tree import Trajectory, split_steps


def test_aggregate_strategies():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "min") == 0.5
    assert math.isclose(aggregate(s, "prod"), 0.9 * 0.5 * 0.8)
    assert math.isclose(aggregate(s, "mean"), (0.9 + 0.5 + 0.8) / 3)


def test_aggregate_empty_is_an_error_not_zero():
    for strategy in ("last", "min", "prod", "mean"):
        with pytest.raises(ValueError, match="empty"):
            aggregate([], strategy)
    with pytest.raises(ValueError, match="agg_strategy"):
        aggregate([0.5], "max")


def test_budgets_powers_of_two_and_groups():
    assert budgets(16) == [1, 2, 4, 8, 16]
    assert budgets(1) == [1]
    assert budgets(12) == [1, 2, 4, 8, 12]
    # DVTS with subtrees of 4: only whole subtrees
    assert budgets(16, group_size=4) == [4, 8, 16]


def test_split_steps_keeps_delimiter_and_no_empty_tail():
    assert split_steps("a\n\nb\n\nc") == ["a\n\n", "b\n\n", "c"]
    assert split_steps("a\n\nb\n\n") == ["a\n\n", "b\n\n"]
    assert split_steps("") == [""]
    assert split_steps("x|y", "|") == ["x|", "y"]


def eq_numeric(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a == b


def test_answer_classes_by_equivalence_and_exact():
    answers = ["0.5", "1/2", "0.50", None, "2", "2.0"]
    calls = []

    def eq(a, b):
        calls.append((a, b))
        return eq_numeric(a, b) or {a, b} == {"0.5", "1/2"}

    assert answer_classes(answers, eq) == [0, 0, 0, None, 1, 1]
    assert answer_classes(answers, exact=True) == [0, 1, 2, None, 3, 4]
    # identical strings never reach the equivalence function
    calls.clear()
    answer_classes(["7", "7", "7"], eq)
    assert calls == []


def test_selection_at_every_power_of_two_from_first_n():
    # completions in run order: answers and (last-step) scores
    answers = ["1", "2", "2", "3", "3", "3", "1", "1"]
    scores = [[0.9], [0.6], [0.6], [0.1], [0.2], [0.3], [0.5], [0.95]]
    sel = select_all(answers, scores, "last", equivalent=lambda a, b: a == b)
    assert set(sel) == {"naive", "weighted", "maj"}
    assert set(sel["naive"]) == {1, 2, 4, 8}
    # n=1: only the first
    assert sel["naive"][1] == sel["weighted"][1] == sel["maj"][1] == 0
    # n=2: {1:.9, 2:.6} -> naive 1, weighted 1, maj tie -> first seen (1)
    assert answers[sel["naive"][2]] == "1" and answers[sel["weighted"][2]] == "1" and answers[sel["maj"][2]] == "1"
    # n=4: 1:.9, 2:1.2, 3:.1 -> naive "1", weighted "2", maj "2"
    assert answers[sel["naive"][4]] == "1"
    assert answers[sel["weighted"][4]] == "2" and sel["weighted"][4] == 1  # the class's first member
    assert answers[sel["maj"][4]] == "2"
    # n=8: 1:{.9,.5,.95}=2.35, 2:1.2, 3:.6; counts 1:3, 2:2, 3:3 -> maj tie 1 vs 3 -> first seen "1"
    assert answers[sel["naive"][8]] == "1" and sel["naive"][8] == 7
    assert answers[sel["weighted"][8]] == "1"
    assert answers[sel["maj"][8]] == "1"


def test_weighted_and_majority_group_by_equivalence_class():
    answers = ["1/2", "0.5", "3", "0.5"]
    scores = [[0.3], [0.3], [0.7], [0.3]]
    eq = lambda a, b: eq_numeric(a, b) or {a, b} == {"0.5", "1/2"}  # noqa: E731
    sel = select_all(answers, scores, "last", equivalent=eq)
    # as one class {1/2, 0.5} has weight .9 > .7 and 3 votes
    assert answers[sel["weighted"][4]] == "1/2"
    assert answers[sel["maj"][4]] == "1/2"
    # OpenR's exact-string grouping splits them: 0.5 has .6 < .7
    sel_exact = select_all(answers, scores, "last", exact=True)
    assert answers[sel_exact["weighted"][4]] == "3"
    assert answers[sel_exact["maj"][4]] == "0.5"


def test_selection_aggregation_changes_the_choice():
    answers = ["1", "2"]
    scores = [[0.1, 0.9], [0.7, 0.7]]
    assert select_all(answers, scores, "last", exact=True)["naive"][2] == 0
    assert select_all(answers, scores, "min", exact=True)["naive"][2] == 1
    assert select_all(answers, scores, "prod", exact=True)["naive"][2] == 1
    assert select_all(answers, scores, "mean", exact=True)["naive"][2] == 1


def test_no_answer_takes_no_part_in_votes_and_no_scores_means_maj_only():
    answers = [None, None, "4"]
    sel = select_all(answers, [[0.9], [0.9], [0.1]], "last", exact=True)
    assert sel["naive"][2] == 0  # naive may pick a completion without an answer
    assert sel["maj"][2] is None and sel["weighted"][2] is None
    assert sel["maj"][3] == 2  # N=3 is reported at 1, 2 and 3
    # a run asked for N=4 that returned 3 completions: n=4 uses all 3
    assert select_all(answers, [[0.9], [0.9], [0.1]], "last", N=4, exact=True)["maj"][4] == 2
    only_maj = select_all(["4", "5"], None, "last", exact=True)
    assert set(only_maj) == {"maj"}


def test_dvts_groups_kept_whole():
    answers = ["1", "1", "1", "1", "2", "2", "2", "2"]
    sel = select_all(answers, [[0.5]] * 8, "last", group_size=4, exact=True)
    assert set(sel["maj"]) == {4, 8}


def test_openr_names():
    assert OPENR_NAMES["prm_last_max"] == ("naive", "last")
    assert OPENR_NAMES["prm_min_max"] == ("naive", "min")
    assert OPENR_NAMES["prm_last_vote"] == ("weighted", "last")
    assert OPENR_NAMES["prm_min_vote"] == ("weighted", "min")
    answers = ["1", "2", "2"]
    scores = [[0.2, 0.95], [0.6, 0.5], [0.6, 0.5]]
    assert select_openr("prm_last_max", answers, scores) == 0
    assert select_openr("prm_min_max", answers, scores) == 1
    assert select_openr("prm_last_vote", answers, scores) == 1  # 2: 1.0 > 0.95
    assert select_openr("prm_min_vote", answers, scores) == 1
    assert select_openr("majority_vote", answers, None) == 1
    with pytest.raises(ValueError):
        select_openr("prm_max_max", answers, scores)


def test_trajectory_roundtrip_and_aggregate():
    t = Trajectory(steps=["a\n\n", "b"], scores=[0.2, 0.8], tokens=3, group=1, answer="b")
    assert t.text == "a\n\nb"
    assert t.aggregate("min") == 0.2
    assert Trajectory.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError):
        Trajectory(steps=["x"]).aggregate("last")
