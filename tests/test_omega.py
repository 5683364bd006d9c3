"""OmegaPRM: the binary search finds the first MC = 0 prefix, Q + U picks the candidates, the budgets hold, labels
are "+" above 0.5 (scripted MC values); resume; end to end through the toy policy pool into `train.prm`'s input."""
from __future__ import annotations

import json
import math

import pytest

from app.toy.checker import exact_step_labels
from app.toy.world import toy_problems
from tests.test_mc_labels import ScriptedPool
from train.synthesize.omega import Node, OmegaConfig, OmegaSearch, agreement, label_records, omega_problem, run

PICKLED_WITH = ("tests.test_mc_labels",)  # its ScriptedPool runs in the Ray tasks (conftest.pickled_by_value)

ROLLOUT = [f"s{i}\n\n" for i in range(7)] + ["s7"]   # a wrong rollout; its first wrong step is s5
BAD = {"s5\n\n", "s6\n\n", "s7"}
K = 4


def scripted(mc_ok: float = 0.5, calls: list | None = None):
    """MC(prefix) = 0 once the prefix holds a bad step, else `mc_ok`: the first k * mc_ok rollouts are right (text
    "R"), the rest wrong (the rest of ROLLOUT after the prefix)."""

    def rollouts(steps):
        if calls is not None:
            calls.append(len(steps))
        ok = not BAD & set(steps)
        n_right = round(K * mc_ok) if ok else 0
        rest = "".join(ROLLOUT[len(steps):]) or "s7"
        return [("R", True)] * n_right + [(rest, False)] * (K - n_right)

    return rollouts


def split(text: str) -> list[str]:
    from app.search.tree import split_steps

    return split_steps(text)


def search(**kw) -> OmegaSearch:
    calls = kw.pop("calls", None)
    return OmegaSearch(scripted(kw.pop("mc_ok", 0.5), calls), split, lambda t: None, k=K, **kw)


def test_binary_search_finds_the_first_prefix_with_mc_zero():
    calls: list[int] = []
    s = search(calls=calls, max_searches=1)
    s.run()
    assert s.first_wrong == [5]
    # the root, then the middle of 8 steps (0..3: MC > 0 -> go right from there), 0..5 (MC 0 -> left), 0..4
    assert calls == [0, 4, 6, 5]
    assert s.nodes[tuple(ROLLOUT[:6])].mc == 0 and s.nodes[tuple(ROLLOUT[:5])].mc == 0.5
    # the tree follows the search: both later probes hang off the 4-step state they were probed from
    assert s.nodes[tuple(ROLLOUT[:6])].parent is s.nodes[tuple(ROLLOUT[:4])] is s.nodes[tuple(ROLLOUT[:5])].parent
    assert s.nodes[tuple(ROLLOUT[:4])].parent is s.nodes[()]
    assert s.rollouts == 4 * K
    for first in range(8):  # wherever the slip is, bisection finds it
        global BAD
        saved, BAD = BAD, set(ROLLOUT[first:])
        try:
            t = search(max_searches=1)
            t.run()
            assert t.first_wrong == [first], first
            assert t.rollouts <= K * (2 + math.ceil(math.log2(8)))
        finally:
            BAD = saved


def test_budgets_and_searches_are_respected():
    s = search(max_searches=3, rollout_budget=1000)
    s.run()
    assert s.searches == 3 and len(s.first_wrong) == 3
    for budget in (K, 3 * K, 5 * K + 1, 9 * K):
        t = search(max_searches=20, rollout_budget=budget)
        t.run()
        assert t.rollouts <= budget, (budget, t.rollouts)
    # a known prefix is not estimated again: later searches over the same rollout cost nothing new
    u = search(max_searches=20, rollout_budget=10_000)
    u.run()
    assert len({n.steps for n in u.nodes.values()}) == len(u.nodes)
    assert u.rollouts == K * sum(1 for n in u.nodes.values() if n.mc != 1.0 or not n.steps)


def test_q_plus_u_picks_the_candidate():
    s = OmegaSearch(lambda steps: [], split, lambda t: None, alpha=0.5, beta=0.9, length_scale=10, c_puct=0.125)
    a, b = Node(("a",), 0.75), Node(("b",), 0.25)
    s.nodes = {a.steps: a, b.steps: b}
    short, long = "x", " ".join(["w"] * 100)
    s.candidates = [(b, short), (a, long), (a, short)]

    def score(node, r):
        total = sum(n.visits for n in s.nodes.values()) or 1
        return 0.5 ** (1 - node.mc) * 0.9 ** (len(r.split()) / 10) + 0.125 * math.sqrt(total) / (1 + node.visits)

    assert score(a, short) > score(b, short) > score(a, long)  # Q: higher MC, shorter rollouts first
    assert s.pick() == (a, short)
    a.visits = 40  # a state picked often loses its exploration bonus to one never picked
    assert score(b, short) > score(a, long)
    assert s.pick() == (b, short) and s.candidates == [(a, long)]


def test_labels_are_plus_above_half_and_mc_zero_steps_end_their_path():
    problem = {"id": "p", "question": "q", "answer": "1"}
    s = search(max_searches=20, mc_ok=0.75)
    s.run()
    recs = label_records(problem, s, K)
    assert recs and all(len(r["soft"]) == len(r["steps"]) == len(r["hard"]) for r in recs)
    for r in recs:
        for p, h in zip(r["soft"], r["hard"]):
            assert (p is None and h is None) or h == int(p > 0.5)
        labelled = [p for p in r["soft"] if p is not None]
        zero = labelled.index(0) if 0 in labelled else len(labelled)
        assert all(p == 0 for p in labelled[zero:])  # no right prefix after a wrong one (the scripted world)
    found = [r for r in recs if r["soft"][-1] == 0 and r["soft"][-2] == 0.75]
    assert any(len(r["steps"]) == 6 for r in found)  # the first wrong step, located exactly (its sibling labelled)
    assert {r["searches"] for r in recs} == {s.searches} and all(r["k"] == K for r in recs)
    # right rollouts joined the tree with MC 1 (OpenR): a path ending in "R"
    assert any(r["steps"][-1] == "R" and r["soft"][-1] == 1.0 for r in recs)


def test_agreement_with_the_checker():
    recs = [{"problem_id": "p", "steps": ["a", "b", "c"], "soft": [None, 0.5, 0.0], "hard": [None, 0, 0],
             "exact": [1, 1, 0]},
            {"problem_id": "p", "steps": ["a", "x", "y"], "soft": [None, None, 0.0], "hard": [None, None, 0],
             "exact": [1, 0, 0]}]
    got = agreement(recs)
    assert got["first_wrong"] == 1 and got["first_wrong_agree"] == 1.0   # the second is not located exactly
    assert got["labelled_prefixes"] == 3 and got["hard_agree"] == pytest.approx(2 / 3)  # "ab" right but MC 0.5


def test_filter_and_resume_with_a_scripted_policy(ray_cluster, tmp_path, pickled_by_value):
    """The scripted toy policy: half its samples slip on the last computation, on-track prefixes are completed
    right 3 times in 4, slipped ones never: every question passes the filter, and the search finds the slip."""
    p = toy_problems("train", n_per_level=1, levels=[4])[0]
    problem = dict(id=p.id, question=p.question, answer=p.answer, level=4)
    cfg = OmegaConfig(k=4, filter_rollouts=4, max_searches=4, rollout_budget=40, output="unused", progress=False)
    from tests.test_mc_labels import ScriptedToyPolicy

    recs = omega_problem(ScriptedToyPolicy(), problem, cfg)
    assert recs and all(r["rollouts"] <= 40 and r["searches"] <= 4 for r in recs)
    assert agreement(recs)["first_wrong"] >= 1 and agreement(recs)["first_wrong_agree"] == 1.0
    for r in recs:
        assert r["exact"] == exact_step_labels(p.question, r["steps"])
    # every sample right: the filter drops the question
    assert omega_problem(ScriptedToyPolicy(), problem, cfg.model_copy(update={"filter_rollouts": 1})) == []

    out = tmp_path / "omega.jsonl"
    cfg = OmegaConfig(problems="toy:train", n_per_level=2, levels=[2, 4], k=4, filter_rollouts=4, max_searches=3,
                      rollout_budget=40, output=str(out), progress=False)
    stats = run(cfg, pool=ScriptedPool())
    assert stats["problems"] == 4 and stats["kept"] == 4 and stats["records"] > 0
    lines = out.read_text().splitlines()
    marks = tmp_path / "omega.jsonl.done"
    marks.write_text("\n".join(marks.read_text().splitlines()[:2]) + "\n")
    out.write_text("\n".join(lines) + "\n" + lines[0][:10])
    again = run(cfg, pool=ScriptedPool())
    assert again["problems"] == 2 and again["skipped"] == 2
    assert sorted(out.read_text().splitlines()) == sorted(lines)


# --- end to end: the toy policy pool; the output is `ponder train prm` data as it stands ----------------------------

def test_omega_through_the_toy_policy_pool_feeds_prm_training(ray_cluster, tmp_path):
    from actors.policy import start_policy_pool
    from app.pool_config import PoolConfig
    from app.toy.tokenizer import build_tokenizer
    from train.prm import PRMTask, PRMTrainConfig, check

    out = tmp_path / "omega.jsonl"
    cfg = OmegaConfig(problems="toy:train", n_per_level=3, levels=[4, 5], k=6, filter_rollouts=8, max_searches=4,
                      rollout_budget=60, max_tokens=300, output=str(out), progress=False)
    pool = start_policy_pool(PoolConfig(engine="hf", model="toy:policy", replicas=1, max_batch=64, gather_ms=20))
    try:
        stats = run(cfg, pool=pool)
    finally:
        pool.shutdown()
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert stats["problems"] == 6 and stats["kept"] >= 1 and len(recs) == stats["records"] > 0
    assert all(r["rollouts"] <= 60 and r["searches"] <= 4 for r in recs)
    assert all(p is None or 0 <= p <= 1 for r in recs for p in r["soft"])
    assert stats["labelled_steps"] == sum(p is not None for r in recs for p in r["soft"])
    check(PRMTrainConfig(data=str(out), model="toy:prm"))                       # `ponder train prm`'s own checks
    task = PRMTask(PRMTrainConfig(data=str(out), model="toy:prm", labels="hard"))
    examples, dropped = task.encode_records(recs, build_tokenizer())
    assert dropped == 0 and len(examples) == len(recs)
    batch = task.collate(examples, build_tokenizer())
    assert int((batch["step_labels"] >= 0).sum()) == stats["labelled_steps"]   # unlabelled steps carry no loss
