"""The PRM's scores decide what beam search keeps: constructed cases against the scripted policy and PRM, where a
search that ignored the scores, the aggregation or the lookahead would keep other beams (no models, no Ray)."""
from __future__ import annotations

import pytest

from app.search import beam_search
from app.search.beam_search import BeamSearchConfig
from app.search.record import solve_problem
from tests.scripted import ScriptedPolicy, ScriptedPRM, simple_extract, simple_grade

P = "Problem: 2+3?\n"
Q = "2+3?"


class Prob:
    def __init__(self, id, answer, question=Q, level=1):
        self.id, self.answer, self.question, self.level = id, answer, question, level


def run(method, cfg, policy, prm):
    return solve_problem(Prob("p", "5"), method, cfg, policy, prm, prompt=P, extract_fn=simple_extract,
                         grade_fn=simple_grade, equivalent=lambda a, b: a == b)


def expanded(policy: ScriptedPolicy) -> list[str]:
    """The states the policy was asked to continue by sampling (lookahead rollouts run at temperature 0)."""
    return [state for state, _, _, temperature in policy.log if temperature > 0]


# ---------------------------------------------------------------- a PRM that prefers the wrong branch wins

BRANCHES = {
    "": ["R\n\n", "W\n\n"],          # the root's two copies: the right and the wrong branch
    "R\n\n": ["so \\boxed{5}"],      # the right branch ends right, the wrong one wrong
    "W\n\n": ["so \\boxed{6}"],
}


@pytest.mark.parametrize("prefers, answer, correct", [("R", "5", True), ("W", "6", False)])
def test_beam_search_follows_the_prm(prefers, answer, correct):
    """n = 2, beam_width 2: one beam survives the first step, the one the PRM scores higher, and both output beams
    continue it. The same policy gives the right or the wrong answer depending only on the PRM."""
    scores = {"R": 0.9, "W": 0.1} if prefers == "R" else {"R": 0.1, "W": 0.9}
    policy, prm = ScriptedPolicy(BRANCHES, prefix=P), ScriptedPRM(scores)
    rec = run("beam_search", {"n": 2, "beam_width": 2, "num_iterations": 2}, policy, prm)
    assert expanded(policy) == ["", f"{prefers}\n\n"]
    assert [t["steps"] for t in rec["trajectories"]] == [[f"{prefers}\n\n", f"so \\boxed{{{answer}}}"]] * 2
    for rule in ("naive", "weighted", "maj"):
        assert rec["selection"][rule]["2"]["answer"] == answer and rec["selection"][rule]["2"]["correct"] is correct


# ---------------------------------------------------------------- the aggregation decides which beams survive

# The root's four copies give A, B, C, D; A and B survive (n = 4, beam_width 2: two survivors). Each survivor's two
# copies add one step; the four beams then compete on their whole paths:
#   A, A1: scores (0.9, 0.5): min 0.5, prod 0.45, last 0.5, mean 0.7
#   B, B1: scores (0.6, 0.6): min 0.6, prod 0.36, last 0.6, mean 0.6
# min and last keep the two B beams, prod and mean the two A beams. The last step shows which survived.
AGG_SCRIPT = {
    "": ["A\n\n", "B\n\n", "C\n\n", "D\n\n"],
    "A\n\n": ["A1\n\n"],
    "B\n\n": ["B1\n\n"],
    "A\n\nA1\n\n": ["so \\boxed{5}"],
    "B\n\nB1\n\n": ["so \\boxed{6}"],
}
AGG_SCORES = {"A": 0.9, "B": 0.6, "C": 0.1, "D": 0.2, "A1": 0.5, "B1": 0.6}


@pytest.mark.parametrize("agg, branch", [("min", "B"), ("prod", "A"), ("last", "B"), ("mean", "A")])
def test_aggregation_changes_the_surviving_beams(agg, branch):
    policy, prm = ScriptedPolicy(AGG_SCRIPT, prefix=P), ScriptedPRM(AGG_SCORES)
    cfg = BeamSearchConfig(n=4, beam_width=2, num_iterations=3, agg_strategy=agg)
    out = beam_search.solve(P, Q, policy, prm, cfg)
    # iteration 2 expands A and B; iteration 3 expands the two survivors, both copies of one branch
    assert expanded(policy) == ["", "A\n\n", "B\n\n", f"{branch}\n\n{branch}1\n\n", f"{branch}\n\n{branch}1\n\n"]
    answer = "5" if branch == "A" else "6"
    assert [t.text for t in out] == [f"{branch}\n\n{branch}1\n\nso \\boxed{{{answer}}}"] * 4
    assert out[0].scores[:2] == ([0.9, 0.5] if branch == "A" else [0.6, 0.6])


def test_min_and_prod_choose_different_answers_end_to_end():
    """The same policy and PRM: `min` keeps B (answer 6, wrong), `prod` keeps A (answer 5, right)."""
    recs = {}
    for agg in ("min", "prod"):
        policy, prm = ScriptedPolicy(AGG_SCRIPT, prefix=P), ScriptedPRM(AGG_SCORES)
        recs[agg] = run("beam_search", {"n": 4, "beam_width": 2, "num_iterations": 3, "agg_strategy": agg},
                        policy, prm)
    assert recs["min"]["selection"]["naive"]["4"] == {"index": 0, "answer": "6", "correct": False}
    assert recs["prod"]["selection"]["naive"]["4"] == {"index": 0, "answer": "5", "correct": True}


# ---------------------------------------------------------------- lookahead decides which beams survive

# n = 2, beam_width 2: one survivor. Alone, A (0.6) beats B (0.5); one greedy step ahead, A leads to a step the PRM
# scores 0.1 and B to one it scores 0.9, so with lookahead 1 (scored, `last` aggregation) B survives instead.
LOOK_SCRIPT = {
    "": ["A\n\n", "B\n\n"],
    "A\n\n": ["At\n\n"],
    "B\n\n": ["Bg\n\n"],
    "A\n\nAt\n\n": ["so \\boxed{6}"],
    "B\n\nBg\n\n": ["so \\boxed{5}"],
}
LOOK_SCORES = {"A": 0.6, "B": 0.5, "At": 0.1, "Bg": 0.9}


@pytest.mark.parametrize("lookahead, quirk, branch", [(0, False, "A"), (1, False, "B"), (1, True, "A")])
def test_lookahead_changes_the_surviving_beam(lookahead, quirk, branch):
    policy, prm = ScriptedPolicy(LOOK_SCRIPT, prefix=P), ScriptedPRM(LOOK_SCORES)
    cfg = BeamSearchConfig(n=2, beam_width=2, num_iterations=3, lookahead=lookahead, quirk_unscored_lookahead=quirk)
    out = beam_search.solve(P, Q, policy, prm, cfg)
    assert expanded(policy)[:2] == ["", f"{branch}\n\n"]
    answer = "6" if branch == "A" else "5"
    step = "At" if branch == "A" else "Bg"
    assert {t.text for t in out} == {f"{branch}\n\n{step}\n\nso \\boxed{{{answer}}}"}
    if lookahead:  # the rollouts ran (greedy, one step) whether or not they were scored
        assert ("A\n\n", 1, ("\n\n",), 0.0) in policy.log and ("B\n\n", 1, ("\n\n",), 0.0) in policy.log
        first = prm.calls[0]
        assert first == ([["A\n\n"], ["B\n\n"]] if quirk else [["A\n\n", "At\n\n"], ["B\n\n", "Bg\n\n"]])
