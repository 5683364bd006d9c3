"""`ponder toy eval`'s validation split (held-out toy:train problems for choosing hyperparameters) and its
greedy-only mode, on the shipped toy checkpoints."""
from __future__ import annotations

import json


def _cfg(*overrides: str):
    from train.toy.config import load

    return load(None, list(overrides), quick=False)


def test_val_split_is_disjoint_from_test_and_from_the_recipes_training_problems():
    from app.toy.world import toy_problems
    from train.synthesize.resumable import load_problems
    from train.toy.evaluate import eval_problems

    levels = "levels=[3,5]"
    val = eval_problems(_cfg("eval.split=val", "eval.n_per_level=50", levels))
    test = eval_problems(_cfg("eval.n_per_level=50", levels))
    assert [p.level for p in val] == [3] * 50 + [5] * 50
    assert {p.question for p in test} == {p.question for p in toy_problems("test", 50, levels=[3, 5])}
    assert all("toy:train" in p.tags for p in val)
    # pairs / MC synthesis read toy:train from `offset` on; LaTRO / PPO the first toy.n_per_level: all < 1000 per level
    used = {r["question"] for r in load_problems("toy:train", 1000, [3, 5])}
    questions = {p.question for p in val}
    assert len(questions) == 100 and not questions & used and not questions & {p.question for p in test}
    # the split is a pure function of the recipe: the same problems every time, other ones for another offset
    assert [p.id for p in eval_problems(_cfg("eval.split=val", "eval.n_per_level=50", levels))] == [p.id for p in val]
    other = eval_problems(_cfg("eval.split=val", "eval.val_offset=3000", "eval.n_per_level=50", levels))
    assert not {p.question for p in other} & questions


def test_eval_bad_split_or_offset_is_one_line(capsys):
    from jobs.toy import main

    assert main(["eval", "eval.split=dev"]) == 2
    err = capsys.readouterr().err
    assert "eval.split" in err and "Traceback" not in err
    assert main(["eval", "eval.split=val", "eval.val_offset=10"]) == 2  # inside the recipes' training problems
    err = capsys.readouterr().err
    assert "eval.val_offset" in err and "Traceback" not in err


def test_greedy_only_eval_on_the_val_split(ray_cluster, capsys):
    from jobs.toy import main
    from train.toy.evaluate import eval_problems

    rc = main(["eval", "--json", "eval.split=val", "eval.n=0", "eval.n_per_level=3", "levels=[1,4]"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {"1", "4", "all"}
    assert res["all"]["problems"] == 6 and res["all"]["split"] == "val"
    # greedy only: no sampled or PRM metrics, no step-choice pairs (no PRM pool was started)
    assert set(res["1"]) >= {"greedy", "problems"} and not any("@" in k or k.startswith("prm") for k in res["1"])
    assert res["all"]["step_choice_pairs"] == 0
    assert 0.0 <= res["4"]["greedy"] <= 1.0
    assert len(eval_problems(_cfg("eval.split=val", "eval.n_per_level=3", "levels=[1,4]"))) == 6
