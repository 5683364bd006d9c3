"""The search methods' logic, against the scripted policy and PRM (no models, no Ray)."""
from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from app.config import ConfigError
from app.search import beam_search, dvts, mcts, rebase
from app.search.beam_search import BeamSearchConfig
from app.search.best_of_n import BestOfNConfig
from app.search.dvts import DVTSConfig
from app.search.mcts import MCTSConfig
from app.search.registry import METHODS, get_method, method_config
from app.search.rebase import RebaseConfig, allocate
from app.search.results import (
    ResultsWriter,
    finished_ids,
    format_report,
    read_records,
    summarize,
    write_run_config,
)
from app.search.record import solve_part, solve_problem
from app.search.tree import Node, Step, split_steps
from tests.scripted import ScriptedPolicy, ScriptedPRM, simple_extract, simple_grade

P = "Problem: 1+1?\n"
Q = "1+1?"


class Prob:
    def __init__(self, id, answer, question=Q, level=1):
        self.id, self.answer, self.question, self.level = id, answer, question, level


def run(problem, method, cfg, policy, prm=None, **kw):
    return solve_problem(
        problem, method, cfg, policy, prm, prompt=P, extract_fn=simple_extract, grade_fn=simple_grade,
        equivalent=lambda a, b: a == b, **kw,
    )


# ---------------------------------------------------------------- configs


def test_config_defaults_match_the_references():
    b = BeamSearchConfig()
    assert (b.n, b.beam_width, b.num_iterations, b.lookahead, b.filter_duplicates, b.sort_completed) == (4, 4, 40, 0, False, False)
    assert (b.temperature, b.top_p, b.max_tokens, b.agg_strategy, b.seed, b.step_delimiter) == (0.8, 1.0, 2048, "last", 42, "\n\n")
    r = RebaseConfig()
    assert (r.width, r.softmax_temperature, r.temperature, r.max_step_tokens, r.max_tokens, r.max_depth) == (16, 0.2, 1.0, 256, 1024, 25)
    m = MCTSConfig()
    assert (m.tree_max_width, m.tree_max_depth, m.temperature, m.top_p, m.max_new_tokens, m.pb_c_base, m.pb_c_init, m.num_sequence) == (
        4, 50, 0.7, 1.0, 2048, 19652, 1.25, 1)
    bo = BestOfNConfig()
    assert (bo.n, bo.temperature, bo.agg_strategy, bo.quirk_always_last) == (4, 0.8, "last", False)


def test_config_validation_errors_are_clear():
    with pytest.raises(ValidationError, match="multiple of beam_width"):
        BeamSearchConfig(n=6, beam_width=4)
    with pytest.raises(ValidationError, match="multiple of beam_width"):
        DVTSConfig(n=8, beam_width=3)
    with pytest.raises(ConfigError, match=r"search \(beam_search\).*multiple of beam_width"):
        method_config("beam_search", {"n": 6})
    with pytest.raises(ConfigError, match="unknown key 'nn'"):
        method_config("best_of_n", {"nn": 3})
    with pytest.raises(ConfigError, match="agg_strategy"):
        method_config("best_of_n", {"agg_strategy": "max"})
    with pytest.raises(ConfigError, match="unknown search method 'bogus'"):
        get_method("bogus")
    with pytest.raises(ConfigError, match="softmax_temperature"):
        method_config("rebase", {"softmax_temperature": 0})
    assert set(METHODS) == {"greedy", "majority", "best_of_n", "beam_search", "dvts", "rebase", "mcts", "particle_filter",
                            "particle_gibbs"}


# ---------------------------------------------------------------- best-of-N, greedy, majority


def bon_setup():
    policy = ScriptedPolicy({"": ["s1\n\nThe answer is \\boxed{1}", "s2\n\nThe answer is \\boxed{2}"]}, prefix=P)
    prm = ScriptedPRM({"s1": 0.1, "The answer is \\boxed{1}": 0.9, "s2": 0.8, "The answer is \\boxed{2}": 0.7})
    return policy, prm


def test_best_of_n_applies_agg_strategy():
    policy, prm = bon_setup()
    rec = run(Prob("p", "2"), "best_of_n", {"n": 2, "agg_strategy": "last"}, policy, prm)
    assert rec["selection"]["naive"]["2"]["answer"] == "1" and rec["selection"]["naive"]["2"]["correct"] is False
    policy, prm = bon_setup()
    rec = run(Prob("p", "2"), "best_of_n", {"n": 2, "agg_strategy": "min"}, policy, prm)
    assert rec["selection"]["naive"]["2"]["answer"] == "2" and rec["selection"]["naive"]["2"]["correct"] is True
    assert rec["agg_strategy"] == "min"
    # the reference's quirk (always `last`) only behind its flag
    policy, prm = bon_setup()
    rec = run(Prob("p", "2"), "best_of_n", {"n": 2, "agg_strategy": "min", "quirk_always_last": True}, policy, prm)
    assert rec["selection"]["naive"]["2"]["answer"] == "1"


def test_best_of_n_record_and_compute():
    policy, prm = bon_setup()
    rec = run(Prob("p", "2"), "best_of_n", {"n": 2}, policy, prm)
    json.dumps(rec)  # a JSONL line
    assert rec["id"] == "p" and rec["method"] == "best_of_n" and rec["N"] == 2 and rec["config"]["n"] == 2
    assert [t["answer"] for t in rec["trajectories"]] == ["1", "2"]
    assert [t["correct"] for t in rec["trajectories"]] == [False, True]
    assert rec["trajectories"][0]["steps"] == ["s1\n\n", "The answer is \\boxed{1}"]
    assert rec["trajectories"][0]["scores"] == [0.1, 0.9]
    assert set(rec["selection"]) == {"naive", "weighted", "maj"} and set(rec["selection"]["maj"]) == {"1", "2"}
    # one request, n=2, no stop string; one PRM call with both
    assert policy.log == [("", 2, (), 0.8)] and len(prm.calls) == 1 and len(prm.calls[0]) == 2
    c = rec["compute"]
    assert c["generated_tokens"] == policy.usage.generated_tokens == 10
    assert c["prompt_tokens"] == policy.usage.prompt_tokens
    assert c["prm_tokens"] == prm.usage.prm_tokens > 0
    assert c["flops"] == pytest.approx(policy.usage.policy_flops + prm.usage.prm_flops)
    assert c["seconds"] >= 0


def test_best_of_n_needs_a_prm():
    policy, _ = bon_setup()
    with pytest.raises(ValueError, match="needs a PRM"):
        run(Prob("p", "2"), "best_of_n", {"n": 2}, policy, None)


def test_greedy_and_majority():
    policy = ScriptedPolicy({"": ["The answer is \\boxed{7}"]}, prefix=P)
    rec = run(Prob("g", "7"), "greedy", {}, policy)
    assert policy.log == [("", 1, (), 0.0)]
    assert set(rec["selection"]) == {"maj"} and rec["selection"]["maj"]["1"] == {"index": 0, "answer": "7", "correct": True}
    answers = ["\\boxed{1}", "\\boxed{2}", "\\boxed{2}", "\\boxed{3}"]
    policy = ScriptedPolicy({"": answers}, prefix=P)
    rec = run(Prob("m", "2"), "majority", {"n": 4}, policy)
    assert rec["selection"]["maj"]["4"]["answer"] == "2" and rec["selection"]["maj"]["4"]["correct"]
    assert rec["selection"]["maj"]["1"]["answer"] == "1"
    assert rec["trajectories"][0]["scores"] is None


# ---------------------------------------------------------------- beam search


BEAM_SCRIPT = {
    "": ["A\n\n", "B\n\n", "C\n\n", "D\n\n"],
    "A\n\n": ["A1\n\n", "Afin \\boxed{1}"],
    "C\n\n": ["C1\n\n", "C2\n\n"],
    "A\n\nA1\n\n": ["A1end \\boxed{1}"],
    "C\n\nC1\n\n": ["C1end \\boxed{2}"],
}
BEAM_SCORES = {"A": 0.9, "B": 0.1, "C": 0.8, "D": 0.2, "A1": 0.5, "Afin \\boxed{1}": 0.95, "C1": 0.6, "C2": 0.4,
               "A1end \\boxed{1}": 0.7, "C1end \\boxed{2}": 0.3}


def test_beam_search_survivors_expansion_and_completed_use_no_width():
    policy, prm = ScriptedPolicy(BEAM_SCRIPT, prefix=P), ScriptedPRM(BEAM_SCORES)
    cfg = BeamSearchConfig(n=4, beam_width=2, num_iterations=3)
    out = beam_search.solve(P, Q, policy, prm, cfg)
    # iteration 1: the root tiled to 4 copies -> one request n=4 (stop on the delimiter)
    # iteration 2: top n/M = 2 survive (A .9, C .8), each expanded M = 2 times
    # iteration 3 (last, no stop): Afin completed, yet the 2 survivors (A1 .5 < C1 .6, C2 .4 pruned) refill all 4
    assert policy.log == [
        ("", 4, ("\n\n",), 0.8),
        ("A\n\n", 2, ("\n\n",), 0.8), ("C\n\n", 2, ("\n\n",), 0.8),
        ("A\n\nA1\n\n", 2, (), 0.8), ("C\n\nC1\n\n", 2, (), 0.8),
    ]
    assert [sum(r.n for r in call) for call in policy.calls] == [4, 4, 4]
    # output: the first n completed, in completion order (tiled order within an iteration)
    assert [t.text for t in out] == ["A\n\nAfin \\boxed{1}", "A\n\nA1\n\nA1end \\boxed{1}", "C\n\nC1\n\nC1end \\boxed{2}",
                                     "A\n\nA1\n\nA1end \\boxed{1}"]
    assert out[0].scores == [0.9, 0.95] and out[1].scores == [0.9, 0.5, 0.7]
    assert all(t.finished for t in out) and out[0].tokens == 3
    # sort_completed: the n best by aggregate
    policy, prm = ScriptedPolicy(BEAM_SCRIPT, prefix=P), ScriptedPRM(BEAM_SCORES)
    out = beam_search.solve(P, Q, policy, prm, cfg.model_copy(update={"sort_completed": True}))
    assert [t.scores[-1] for t in out] == [0.95, 0.7, 0.7, 0.3]


def test_beam_search_filter_duplicates():
    script = {"": ["A\n\n", "A\n\n", "B\n\n", "C\n\n"], "A\n\n": ["fa \\boxed{1}"], "C\n\n": ["fc \\boxed{2}"]}
    scores = {"A": 0.9, "B": 0.1, "C": 0.5}
    cfg = BeamSearchConfig(n=4, beam_width=2, num_iterations=2)
    policy = ScriptedPolicy(script, prefix=P)
    beam_search.solve(P, Q, policy, ScriptedPRM(scores), cfg)
    assert [(s, n) for s, n, _, _ in policy.log[1:]] == [("A\n\n", 2), ("A\n\n", 2)]  # both copies of A survive
    policy = ScriptedPolicy(script, prefix=P)
    beam_search.solve(P, Q, policy, ScriptedPRM(scores), cfg.model_copy(update={"filter_duplicates": True}))
    assert [(s, n) for s, n, _, _ in policy.log[1:]] == [("A\n\n", 2), ("C\n\n", 2)]


def test_beam_search_lookahead_is_scored_unless_quirk():
    script = {"": ["A\n\n", "B\n\n"], "A\n\n": ["la\n\n"], "B\n\n": ["lb\n\n"]}
    cfg = BeamSearchConfig(n=2, beam_width=1, num_iterations=2, lookahead=1)
    policy, prm = ScriptedPolicy(script, prefix=P), ScriptedPRM()
    beam_search.solve(P, Q, policy, prm, cfg)
    assert ("A\n\n", 1, ("\n\n",), 0.0) in policy.log  # greedy lookahead rollout
    assert prm.calls[0] == [["A\n\n", "la\n\n"], ["B\n\n", "lb\n\n"]]
    policy, prm = ScriptedPolicy(script, prefix=P), ScriptedPRM()
    beam_search.solve(P, Q, policy, prm, cfg.model_copy(update={"quirk_unscored_lookahead": True}))
    assert prm.calls[0] == [["A\n\n"], ["B\n\n"]]


def test_beam_search_token_budget_is_the_whole_trajectory():
    # max_total_tokens (ponder's optional whole-trajectory bound; max_tokens is per step call)
    script = {"": ["w w\n\n"], "w w\n\n": ["x x\n\n"]}
    cfg = BeamSearchConfig(n=1, beam_width=1, num_iterations=10, max_total_tokens=3)
    policy = ScriptedPolicy(script, prefix=P)
    out = beam_search.solve(P, Q, policy, ScriptedPRM(), cfg)
    assert [r.max_tokens for call in policy.calls for r in call] == [3, 1]
    assert out[0].tokens == 3 and out[0].finish_reason == "length" and not out[0].finished


STEPS_SCRIPT = {"": ["w w\n\n"], "w w\n\n": ["x x\n\n"], "w w\n\nx x\n\n": ["so \\boxed{4}"]}


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
def test_max_tokens_is_the_limit_of_each_step_call(method):
    """search-and-learn gives every step call the full max_tokens (depth: num_iterations); max_total_tokens is
    ponder's optional whole-trajectory bound."""
    cfg = method_config(method, {"n": 1, "beam_width": 1, "num_iterations": 10, "max_tokens": 3})
    assert cfg.max_total_tokens is None
    policy = ScriptedPolicy(STEPS_SCRIPT, prefix=P)
    [out] = get_method(method).solve(P, Q, policy, ScriptedPRM(), cfg)
    assert [r.max_tokens for call in policy.calls for r in call] == [3, 3, 3]
    assert out.text == "w w\n\nx x\n\nso \\boxed{4}" and out.finished and out.tokens == 6 > cfg.max_tokens
    # a binding max_total_tokens: each call gets at most what is left, and the path is cut before the answer
    policy = ScriptedPolicy(STEPS_SCRIPT, prefix=P)
    [out] = get_method(method).solve(P, Q, policy, ScriptedPRM(), cfg.model_copy(update={"max_total_tokens": 5}))
    assert [r.max_tokens for call in policy.calls for r in call] == [3, 3, 1]
    assert out.text == "w w\n\nx x\n\nso" and out.tokens == 5 and out.finish_reason == "length" and not out.finished


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
def test_eos_at_the_token_limit_is_finished(method):
    solve = get_method(method).solve
    # EOS on exactly the step call's max_tokens-th token: finished (the engines check EOS before length)
    policy = ScriptedPolicy({"": ["a b"]}, prefix=P)
    [out] = solve(P, Q, policy, ScriptedPRM(), method_config(method, {"n": 1, "beam_width": 1, "max_tokens": 2}))
    assert (out.finish_reason, out.tokens, out.finished) == ("eos", 2, True)
    # EOS on exactly the token that spends max_total_tokens: finished
    policy = ScriptedPolicy({"": ["w w\n\n"], "w w\n\n": ["end"]}, prefix=P)
    [out] = solve(P, Q, policy, ScriptedPRM(), method_config(method, {"n": 1, "beam_width": 1, "max_total_tokens": 3}))
    assert [r.max_tokens for call in policy.calls for r in call] == [3, 1]
    assert (out.finish_reason, out.tokens, out.finished) == ("eos", 3, True)
    # cut by the limit: unfinished
    policy = ScriptedPolicy({"": ["a b c"]}, prefix=P)
    [out] = solve(P, Q, policy, ScriptedPRM(), method_config(method, {"n": 1, "beam_width": 1, "max_tokens": 2}))
    assert (out.finish_reason, out.tokens, out.finished) == ("length", 2, False)


LAST_SCRIPT = {"": ["a\n\n"], "a\n\n": ["b\n\n"], "a\n\nb\n\n": ["c\n\n"], "a\n\nb\n\nc\n\n": ["end \\boxed{1}"]}
LAST_SCORES = {"a": 0.1, "b": 0.2, "c": 0.3, "end \\boxed{1}": 0.9}


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
def test_last_iteration_is_split_into_steps_before_it_is_scored(method):
    """The last iteration runs to EOS without a stop string: its text holds several steps, each scored."""
    policy, prm = ScriptedPolicy(LAST_SCRIPT, prefix=P), ScriptedPRM(LAST_SCORES)
    cfg = {"n": 2, "beam_width": 2, "num_iterations": 2, "agg_strategy": "min"}
    rec = run(Prob("l", "1"), method, cfg, policy, prm)
    assert policy.log[-1][2] == ()  # the last iteration: no stop string
    steps = ["a\n\n", "b\n\n", "c\n\n", "end \\boxed{1}"]
    assert prm.calls[-1] == [steps, steps]  # scored step by step, as search-and-learn re-splits the text
    for t in rec["trajectories"]:
        assert t["steps"] == steps == split_steps("".join(steps))
        assert t["scores"] == [0.1, 0.2, 0.3, 0.9] and t["finished"] and t["tokens"] == 5 and t["answer"] == "1"
    assert rec["selection"]["naive"]["2"]["correct"]


# ---------------------------------------------------------------- DVTS


DVTS_SCRIPT = {
    "": ["a\n\n", "b\n\n", "c\n\n", "d\n\n"],
    "b\n\n": ["b1 \\boxed{1}", "b2 \\boxed{2}", "so \\boxed{3}\n\n", "b4\n\n"],
}
DVTS_SCORES = {"a": 0.1, "b": 0.9, "c": 0.3, "d": 0.2, "b1 \\boxed{1}": 0.4, "b2 \\boxed{2}": 0.8, "so \\boxed{3}": 0.95, "b4": 0.1}


def test_dvts_subtrees_in_contiguous_groups_of_m():
    cfg = DVTSConfig(n=8, beam_width=4, num_iterations=10)
    policy, prm = ScriptedPolicy(DVTS_SCRIPT, prefix=P, mode="seed"), ScriptedPRM(DVTS_SCORES)
    out = dvts.solve(P, Q, policy, prm, cfg)
    assert len(out) == 8 and [t.group for t in out] == [0] * 4 + [1] * 4
    # each subtree picked b (.9), then the best candidate "so \boxed{3}" (stopped on the delimiter, but boxed: stop)
    assert len(policy.calls) == 2 and [r.n for call in policy.calls for r in call] == [4, 4, 4, 4]
    for g in (0, 1):
        group = out[4 * g: 4 * g + 4]
        assert all(t.steps[0] == "b\n\n" and len(t.steps) == 2 for t in group)  # the M final siblings
        assert sorted(t.steps[1] for t in group) == sorted(DVTS_SCRIPT["b\n\n"])
        for t in group:  # each scored by its own scores
            assert t.scores == [0.9, DVTS_SCORES[t.steps[1].strip()]]
    # one subtree run alone (as a Ray task) gives the same as within the batch
    policy = ScriptedPolicy(DVTS_SCRIPT, prefix=P, mode="seed")
    alone = dvts.solve_subtree(P, Q, policy, ScriptedPRM(DVTS_SCORES), cfg, 1)
    assert [t.text for t in alone] == [t.text for t in out[4:]] and all(t.group == 1 for t in alone)
    with pytest.raises(ValueError, match="out of range"):
        dvts.solve_subtree(P, Q, policy, ScriptedPRM(DVTS_SCORES), cfg, 2)
    # the same through solve_part with a problem id: the part (a Ray task) draws the numbers it draws in the whole
    whole = solve_part(P, Q, "dvts", cfg, ScriptedPolicy(DVTS_SCRIPT, prefix=P, mode="seed"), ScriptedPRM(DVTS_SCORES),
                       None, problem_id="x")
    part = solve_part(P, Q, "dvts", cfg, ScriptedPolicy(DVTS_SCRIPT, prefix=P, mode="seed"), ScriptedPRM(DVTS_SCORES),
                      1, problem_id="x")
    assert part["trajectories"] == whole["trajectories"][4:]


def test_dvts_record_reports_whole_subtrees_only():
    cfg = {"n": 8, "beam_width": 4, "num_iterations": 10}
    rec = run(Prob("d", "3"), "dvts", cfg, ScriptedPolicy(DVTS_SCRIPT, prefix=P, mode="seed"), ScriptedPRM(DVTS_SCORES))
    assert set(rec["selection"]["naive"]) == {"4", "8"}
    assert rec["selection"]["naive"]["4"]["answer"] == "3" and rec["selection"]["naive"]["4"]["correct"]


# ---------------------------------------------------------------- REBASE


def test_rebase_width_split_is_exact():
    # w = exp(r / .2): 90.02, 12.18, 1.65; S = 103.85: ceil(16 * .8668) = 14; R = 2: ceil(2 * .881) = 2; R = 0: 0
    assert allocate([0.9, 0.5, 0.1], 16, 0.2) == [14, 2, 0]
    assert allocate([0.1, 0.9, 0.5], 16, 0.2) == [0, 14, 2]  # counts follow the candidates, sorted by reward inside
    assert allocate([0.5, 0.5, 0.5], 4, 0.2) == [2, 1, 1]  # ceil(4/3)=2, ceil(2/2)=1, ceil(1/1)=1
    for rewards, width in (([0.3, 0.31, 0.9, 0.0, 0.5], 7), ([0.2] * 6, 5), ([0.99, 0.01], 3), ([0.4], 9)):
        for T in (0.05, 0.2, 1.0, 10.0):
            c = allocate(rewards, width, T)
            assert sum(c) == width and all(x >= 0 for x in c)


def test_rebase_finished_nodes_use_up_width():
    script = {"": ["x\n\n", "y\n\n", "fin1 \\boxed{1}", "fin2 \\boxed{2}"], "x\n\n": ["x1 \\boxed{3}", "x2 \\boxed{3}"]}
    scores = {"x": 0.9, "y": 0.5, "fin1 \\boxed{1}": 0.7, "fin2 \\boxed{2}": 0.6}
    policy = ScriptedPolicy(script, prefix=P)
    out = rebase.solve(P, Q, policy, ScriptedPRM(scores), RebaseConfig(width=4))
    # depth 0: the root gets all 4; depth 1: two finished take 2 units, x (.9) gets ceil(2 * 1 / 1.135) = 2, y none
    assert [(s, n) for s, n, _, _ in policy.log] == [("", 4), ("x\n\n", 2)]
    assert all(stop == ("\n\n",) for _, _, stop, _ in policy.log)
    assert [r.max_tokens for call in policy.calls for r in call] == [256, 256]
    assert sorted(t.text for t in out) == sorted(["fin1 \\boxed{1}", "fin2 \\boxed{2}", "x\n\nx1 \\boxed{3}", "x\n\nx2 \\boxed{3}"])
    assert all(t.finished for t in out) and len(out) == 4


def test_rebase_token_budget_counts_the_whole_trajectory():
    script = {"": ["x x\n\n"], "x x\n\n": ["y\n\n"]}
    policy = ScriptedPolicy(script, prefix=P)
    out = rebase.solve(P, Q, policy, ScriptedPRM(), RebaseConfig(width=2, max_tokens=2))
    # both children are over budget: each takes a unit of width, nothing more is sampled; they come back unfinished
    assert len(policy.calls) == 1 and len(out) == 2 and not any(t.finished for t in out)
    # the reference's guard counts only the current step: the run goes on
    policy = ScriptedPolicy(script, prefix=P)
    rebase.solve(P, Q, policy, ScriptedPRM(), RebaseConfig(width=2, max_tokens=2, max_depth=3, quirk_step_token_guard=True))
    assert len(policy.calls) == 1  # 2 tokens in the first step already hit the step guard
    policy = ScriptedPolicy(script, prefix=P)
    rebase.solve(P, Q, policy, ScriptedPRM(), RebaseConfig(width=2, max_tokens=3, max_depth=3, quirk_step_token_guard=True))
    assert len(policy.calls) == 3  # whole trajectory 2 + 1 + 1 tokens > 3, yet it runs to the depth cap


# ---------------------------------------------------------------- MCTS


def test_puct_formula():
    cfg = MCTSConfig()
    parent = Node(visits=3)
    child = Node(prior=0.4, visits=1, value_sum=0.5)
    c = math.log((3 + 19652 + 1) / 19652) + 1.25
    assert mcts.puct(parent, child, cfg) == pytest.approx(0.5 + 0.4 * math.sqrt(3) / 2 * c)
    unvisited = Node(prior=0.9, initial_value=0.3)
    assert mcts.puct(Node(visits=0), unvisited, cfg) == pytest.approx(0.3)  # N_parent = 0: the value alone


def test_mcts_selection_expansion_and_backup():
    script = {
        "": [("A\n\n", 0.0), ("B\n\n", math.log(0.25))],
        "B\n\n": [("B1 \\boxed{1}", -1.0), ("B2 \\boxed{2}", -1.0)],
        "A\n\n": [("A1 \\boxed{3}", -0.5), ("A1 \\boxed{3}", -0.5)],
    }
    scores = {"A": 0.3, "B": 0.6, "B1 \\boxed{1}": 0.2, "B2 \\boxed{2}": 0.9, "A1 \\boxed{3}": 0.5}
    policy, prm = ScriptedPolicy(script, prefix=P), ScriptedPRM(scores)
    cfg = MCTSConfig(num_sequence=2, tree_max_width=2)
    root, out = mcts.search(P, Q, policy, prm, cfg)
    A, B = root.children
    assert (A.prior, B.prior) == (pytest.approx(0.8), pytest.approx(0.2))  # exp(mean logprob), renormalised
    assert (A.initial_value, B.initial_value) == (0.3, 0.6)
    # path 1: root unvisited -> by value: B (.6); expand B; B2 (.9, EOS) is terminal; back up .9
    # path 2: PUCT(A) = .3 + .8 * 1/1 * c  >  PUCT(B) = .9 + .2 * 1/2 * c  -> A; A's duplicate children collapse to one
    assert [t.text for t in out] == ["B\n\nB2 \\boxed{2}", "A\n\nA1 \\boxed{3}"]
    B1, B2 = B.children
    assert len(A.children) == 1 and A.children[0].prior == pytest.approx(1.0)
    assert (B2.visits, B2.value_sum, B1.visits) == (1, pytest.approx(0.9), 0)
    assert (B.visits, B.value_sum) == (1, pytest.approx(0.9))
    assert (A.visits, A.value_sum) == (1, pytest.approx(0.5))
    assert (root.visits, root.value_sum) == (2, pytest.approx(1.4))
    assert all(t.finished for t in out) and out[0].scores == [0.6, 0.9]
    # each expansion: one request of tree_max_width samples with logprobs, stopping on the delimiter
    assert [(s, n) for s, n, _, _ in policy.log] == [("", 2), ("B\n\n", 2), ("A\n\n", 2)]
    assert all(r.logprobs and r.stop == ("\n\n",) for call in policy.calls for r in call)


def test_mcts_depth_cap_and_dead_end():
    script = {"": ["s\n\n"], "s\n\n": ["t\n\n"], "s\n\nt\n\n": [""]}
    root, out = mcts.search(P, Q, ScriptedPolicy(script, prefix=P), ScriptedPRM(), MCTSConfig(tree_max_depth=1, tree_max_width=1))
    assert [t.text for t in out] == ["s\n\n"] and not out[0].finished
    root, out = mcts.search(P, Q, ScriptedPolicy(script, prefix=P), ScriptedPRM(), MCTSConfig(tree_max_width=1))
    assert [t.text for t in out] == ["s\n\nt\n\n"] and not out[0].finished  # the empty step is no child


# ---------------------------------------------------------------- every method end to end on a scripted world


def world(state: str):
    depth = state.count("\n\n")
    if depth < 2:
        return [f"step{depth}-{k}\n\n" for k in range(3)]
    return [f"The answer is \\boxed{{{k}}}" for k in range(3)]


def world_prm(steps):
    return 0.2 + 0.2 * (sum(map(ord, "".join(steps))) % 4)


EVERY_METHOD = [
    ("greedy", {}),
    ("majority", {"n": 4}),
    ("best_of_n", {"n": 4}),
    ("beam_search", {"n": 4, "beam_width": 2}),
    ("dvts", {"n": 4, "beam_width": 2}),
    ("rebase", {"width": 4}),
    ("mcts", {"num_sequence": 4, "tree_max_width": 2}),
    ("particle_filter", {"n": 4}),
    ("particle_gibbs", {"n": 4, "num_iterations": 2}),
]


@pytest.mark.parametrize("method,cfg", EVERY_METHOD)
def test_every_method_gives_a_record(method, cfg):
    policy, prm = ScriptedPolicy(world, prefix=P), ScriptedPRM(world_prm)
    rec = run(Prob(f"w-{method}", "1", level=2), method, cfg, policy, prm)
    json.dumps(rec)
    N = rec["N"]
    assert N == cfg.get("n", cfg.get("width", cfg.get("num_sequence", 1)))
    assert rec["trajectories"] and all(t["answer"] in {"0", "1", "2"} for t in rec["trajectories"] if t["finished"])
    assert rec["selection"]["maj"]
    assert str(N) in rec["selection"]["maj"]
    assert rec["compute"]["generated_tokens"] == policy.usage.generated_tokens > 0


@pytest.mark.parametrize("method,cfg", EVERY_METHOD)
def test_request_seeds_depend_on_the_problem(method, cfg):
    def seeds(problem_id, question=Q, part=None):
        policy = ScriptedPolicy(world, prefix=P)  # cycle mode: the same search whatever the seeds
        solve_part(P, question, method, cfg, policy, ScriptedPRM(world_prm), part, problem_id=problem_id)
        return [r.seed for call in policy.calls for r in call]

    a, b = seeds("p1"), seeds("p2")
    assert a and None not in a and len(a) == len(b)
    assert seeds("p1") == a  # the same problem draws the same numbers
    assert set(a).isdisjoint(b)  # another problem, other numbers
    # without an id the question text keys them
    assert seeds(None) == seeds(None) and set(seeds(None)).isdisjoint(seeds(None, "2+2?"))
    # solve_problem passes the problem's id
    policy = ScriptedPolicy(world, prefix=P)
    run(Prob("p1", "1"), method, cfg, policy, ScriptedPRM(world_prm))
    assert [r.seed for call in policy.calls for r in call] == a
    if method == "dvts":  # a subtree run as its own part draws what it draws within the whole problem
        assert set(seeds("p1", part=1)) <= set(a) and set(seeds("p1", part=1)).isdisjoint(seeds("p2", part=1))


# ---------------------------------------------------------------- results I/O and resume


def fake_record(i, correct=True):
    return {"id": f"p{i}", "method": "best_of_n", "N": 2, "level": i % 2,
            "selection": {"naive": {"1": {"correct": correct}, "2": {"correct": True}}, "maj": {"1": {"correct": False}, "2": {"correct": True}}},
            "compute": {"prompt_tokens": 10, "generated_tokens": 100, "prm_tokens": 50, "flops": 2e6, "seconds": 1.0}}


def test_results_resume_after_a_kill(tmp_path):
    ids = [f"p{i}" for i in range(10)]
    w = ResultsWriter(tmp_path)
    for i in range(4):
        w.write(fake_record(i))
    # the kill: a line cut short, the file never closed
    w._f.write('{"id": "p4", "selection": {"na')
    w._f.flush()
    assert finished_ids(tmp_path) == {"p0", "p1", "p2", "p3"}
    # the restarted job: a new writer (its own shard), skips the finished ids
    todo = [i for i in ids if i not in finished_ids(tmp_path)]
    assert todo == ids[4:]
    with ResultsWriter(tmp_path) as w2:
        assert w2.path != w.path
        for pid in todo:
            w2.write(fake_record(int(pid[1:])))
    recs = read_records(tmp_path)
    assert sorted(r["id"] for r in recs) == sorted(ids) and len(recs) == 10
    assert finished_ids(tmp_path) == set(ids)
    # a record written twice (two writers racing) is read once
    with ResultsWriter(tmp_path, shard="shard-zzz") as w3:
        w3.write(fake_record(0, correct=False))
    assert len(read_records(tmp_path)) == 10


def test_summary_table(tmp_path):
    recs = [fake_record(i, correct=(i % 2 == 0)) for i in range(4)]
    s = summarize(recs)
    assert s["accuracy"]["naive"] == {1: 0.5, 2: 1.0} and s["accuracy"]["maj"] == {1: 0.0, 2: 1.0}
    assert s["compute"]["generated_tokens"] == 100 and s["problems"] == 4
    text = format_report(recs, by_level=True)
    assert "n=1" in text and "naive" in text and "weighted" not in text and "level 0" in text and "100 generated tokens" in text


def test_run_config_must_match_to_resume(tmp_path):
    write_run_config(tmp_path, {"method": "best_of_n", "search": {"n": 4}}, ["method", "search"])
    write_run_config(tmp_path, {"method": "best_of_n", "search": {"n": 4}, "max_in_flight": 3}, ["method", "search"])
    with pytest.raises(ConfigError, match="'search' differs"):
        write_run_config(tmp_path, {"method": "best_of_n", "search": {"n": 8}}, ["method", "search"])
