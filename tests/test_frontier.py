"""The frontier's arithmetic (`tune.frontier`) on hand-made sweep records, no Ray: accuracy at n expected over
n-subsets, best-of-N's lower envelope as the baseline, the held-out (cross-validated) compute-optimal choice and the
compute_saving curve. A sweep of best-of-N alone saves exactly 1.0x; a strategy as accurate for a quarter of the
compute saves exactly 4.0x; the old in-sample definition gave best-of-N 2.78x over itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.search.select import select_all
from tune import frontier

# per problem: which of the 4 samples are right (a mix, so best-of-N's curve rises with n)
PATTERNS = [(1, 1, 1, 1), (1, 0, 1, 0), (0, 1, 0, 0), (0, 0, 0, 1), (1, 1, 0, 1), (0, 0, 0, 0), (0, 1, 1, 0),
            (1, 0, 0, 0), (0, 0, 1, 1), (1, 1, 1, 0), (0, 0, 0, 0), (0, 1, 0, 1)]
SCORES = (0.2, 0.7, 0.4, 0.9)


def fake_record(pid: str, level: int, method: str, correct, scores, flops_per_sample: float, tokens: int = 10) -> dict:
    """A record with one completion per entry of `correct` (right: answer "1"; wrong: its own answer) and its
    selections at every n as `ponder search` writes them."""
    N = len(correct)
    answers = ["1" if c else f"w{i}" for i, c in enumerate(correct)]
    chosen = select_all(answers, [[s] for s in scores], "last", exact=True)
    per = flops_per_sample
    return {
        "id": pid, "level": level, "method": method, "N": N, "agg_strategy": "last", "grouping": "exact",
        "trajectories": [{"tokens": tokens, "answer": a, "correct": bool(c), "scores": [s]}
                         for a, c, s in zip(answers, correct, scores)],
        "selection": {rule: {str(n): {"index": i, "answer": answers[i], "correct": bool(correct[i])}
                             for n, i in by_n.items()} for rule, by_n in chosen.items()},
        "compute": {"prompt_tokens": 0, "generated_tokens": tokens * N, "prm_tokens": tokens * N,
                    "policy_flops": per * N / 2, "prm_flops": per * N / 2, "flops": per * N,
                    "computed_prompt_tokens": 0, "computed_generated_tokens": tokens * N,
                    "computed_prm_tokens": tokens * N, "computed_policy_flops": per * N / 4,
                    "computed_prm_flops": per * N / 4, "computed_flops": per * N / 2, "seconds": 1.0},
    }


def fake_trial(root: Path, name: str, strategy: str, method: str, N: int, budgets, records, subsampled: bool):
    d = root / "trials" / name
    d.mkdir(parents=True)
    (d / "trial.json").write_text(json.dumps({"name": name, "strategy": strategy, "method": method, "N": N,
                                              "budgets": budgets, "subsampled": subsampled}))
    (d / "problems.json").write_text(json.dumps({"count": len(records),
                                                 "problems": [{"id": r["id"], "level": r["level"]} for r in records]}))
    with open(d / "shard-x.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def bon_records(flops: float) -> list[dict]:
    return [fake_record(f"p{i}", 1 + i % 2, "best_of_n", c, SCORES, flops) for i, c in enumerate(PATTERNS)]


def savings(data: dict) -> list[float]:
    """Every saving the frontier reports: the summaries and the curves' medians and spreads, every bin and kind."""
    out = []
    for k in data["kinds"].values():
        for e in k["bins"].values():
            out += [e["compute_saving"], *e["compute_saving_spread"]]
            for c in e["curve"] + e.get("curve_single", []):
                out += [c["saving"][q] for q in ("median", "q10", "q90") if c["saving"]["median"] is not None]
    return out


def test_expected_accuracy_over_subsets():
    rec = fake_record("p", 1, "best_of_n", (0, 1, 1, 0), (0.9, 0.1, 0.5, 0.3), 1.0)
    # n = 1: every rule is one sample, pass@1 (the first sample alone would say 0 for every rule)
    for rule in ("naive", "weighted", "maj"):
        assert frontier.expected_correct(rec, rule, 1) == pytest.approx(0.5)
    # naive at n = 2 over the 6 pairs: right on {1,2} and {2,3} only
    assert frontier.expected_correct(rec, "naive", 2) == pytest.approx(2 / 6)
    # n = N: the run's own choice (sample 0, score 0.9, wrong)
    assert frontier.expected_correct(rec, "naive", 4) == 0.0
    # compute at n < N: n/N of the run's
    assert frontier.compute_at(rec, 1)["flops"] == pytest.approx(1.0)


def test_best_of_n_alone_saves_exactly_1x(tmp_path):
    fake_trial(tmp_path, "best_of_n-N4", "best_of_n", "best_of_n", 4, [1, 2, 4], bon_records(100.0), True)
    data, text, pngs = frontier.write(tmp_path)
    assert data["baseline"] == "best_of_n weighted"
    got = savings(data)
    assert got and all(s == pytest.approx(1.0) for s in got)  # the old definition: 2.78x of best-of-N over itself
    curve = data["kinds"]["nominal"]["bins"]["all"]["curve"]
    assert [c["N"] for c in curve] == [1, 2, 4] and curve[0]["accuracy"] < curve[-1]["accuracy"]
    assert data["kinds"]["nominal"]["bins"]["all"]["reached"] == 1.0
    assert "compute_saving" in text and (tmp_path / "frontier.md").read_text() == text
    assert json.loads((tmp_path / "frontier.json").read_text())["cv"]["folds"] == 100
    assert {p.name for p in pngs} == {"frontier_nominal.png", "frontier_computed.png"}


def test_a_strategy_as_accurate_for_a_quarter_of_the_compute_saves_4x(tmp_path):
    fake_trial(tmp_path, "best_of_n-N4", "best_of_n", "best_of_n", 4, [1, 2, 4], bon_records(100.0), True)
    fake_trial(tmp_path, "best_of_n-t05-N4", "best_of_n(temperature=0.5)", "best_of_n", 4, [1, 2, 4],
               bon_records(25.0), True)
    # a dearer, worse one-run method at N=2 and 4: never chosen
    worse = [fake_record(f"p{i}", 1 + i % 2, "beam_search", (0,) * n, (0.5,) * n, 1000.0)
             for n in (2, 4) for i in range(len(PATTERNS))]
    fake_trial(tmp_path, "beam_search-N2", "beam_search", "beam_search", 2, [2], worse[:len(PATTERNS)], False)
    fake_trial(tmp_path, "beam_search-N4", "beam_search", "beam_search", 4, [4], worse[len(PATTERNS):], False)
    data = frontier.build(tmp_path, cv_repeats=10)
    assert data["baseline"] == "best_of_n weighted"
    got = savings(data)
    assert got and all(s == pytest.approx(4.0) for s in got)
    for k in data["kinds"].values():
        for b in ("level 1", "level 2"):
            assert all(set(h["choice"]) == {"best_of_n(temperature=0.5) weighted"} for h in k["bins"][b]["held_out"])
    # oracle bins: quantiles of pass@1 from best-of-N's samples
    oracle = frontier.build(tmp_path, bins="oracle", oracle_bins=2, cv_repeats=2)
    assert oracle["bin_names"] == ["all", "oracle 1", "oracle 2"] and oracle["sizes"]["oracle 1"] == 6
