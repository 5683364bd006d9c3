"""Particle filtering and particle Gibbs: resampling and reference logic against the scripted policy and PRM, the
configs' validation, and both methods end to end through real Ray actors on the toy models."""
from __future__ import annotations

import io
import math
import random

import pytest
from pydantic import ValidationError

from app.config import ConfigError
from app.search import particle_filter as pf
from app.search import particle_gibbs as pg
from app.search.particle_filter import ParticleFilterConfig
from app.search.particle_gibbs import ParticleGibbsConfig
from app.search.registry import method_config
from app.search.tree import Node, Step, split_steps
from tests.scripted import ScriptedPolicy, ScriptedPRM, simple_extract

P = "Problem: 1+1?\n"
Q = "1+1?"


def prm_of(scores: dict[str, float], default: float = 0.5) -> ScriptedPRM:
    """Scores by the last step's text, whether the PRM is given the steps or the whole prefix as one step (`model`)."""
    return ScriptedPRM(lambda steps: scores.get(split_steps("".join(steps))[-1].strip(), default))


def answers(trajs) -> list[str | None]:
    return [simple_extract(t.text) for t in trajs]


# ---------------------------------------------------------------- configs


def test_defaults_are_the_papers():
    c = ParticleFilterConfig()
    assert (c.n, c.max_steps, c.temperature, c.top_p, c.max_tokens, c.softmax_temperature, c.seed) == (
        4, 40, 0.8, 1.0, 2048, 1.0, 42)
    assert (c.agg_strategy, c.final_selection, c.resample_inactive, c.final_markers, c.step_delimiter) == (
        "model", "argmax", True, ["\\boxed"], "\n\n")
    assert not (c.quirk_no_eos_check or c.quirk_final_resample or c.quirk_generate_inactive)
    assert c.selection_agg == "last" and ParticleFilterConfig(agg_strategy="min").selection_agg == "min"
    g = ParticleGibbsConfig()
    assert (g.n, g.num_iterations, g.particles, g.num_ref_particles, g.budget) == (16, 4, 4, 1, 16)
    assert not (g.quirk_reference_final_weight or g.quirk_reference_weight_ahead)


def test_config_validation_errors():
    with pytest.raises(ValidationError, match="softmax_temperature"):
        ParticleFilterConfig(softmax_temperature=0)
    with pytest.raises(ConfigError, match="agg_strategy"):
        method_config("particle_filter", {"agg_strategy": "max"})
    with pytest.raises(ConfigError, match="final_selection"):
        method_config("particle_filter", {"final_selection": "best"})
    with pytest.raises(ConfigError, match="unknown key 'num_iterations'"):
        method_config("particle_filter", {"num_iterations": 2})
    with pytest.raises(ConfigError, match=r"search \(particle_gibbs\).*multiple of num_iterations"):
        method_config("particle_gibbs", {"n": 10, "num_iterations": 4})
    with pytest.raises(ValidationError, match="leaves no free particle"):
        ParticleGibbsConfig(n=4, num_iterations=2, num_ref_particles=2)
    with pytest.raises(ValidationError, match="exclude each other"):
        ParticleGibbsConfig(quirk_reference_final_weight=True, quirk_reference_weight_ahead=True)
    with pytest.raises(ValidationError, match="max_steps"):
        ParticleFilterConfig(max_steps=0)
    ParticleGibbsConfig(n=3, num_iterations=1, num_ref_particles=5)  # one sweep: no reference is ever drawn


# ---------------------------------------------------------------- weights


def test_logit_weights_and_multinomial():
    assert pf.logit(0.5) == 0.0 and pf.logit(0.9) == pytest.approx(math.log(9))
    assert pf.logit(1.0) == pytest.approx(math.log((1 - 1e-7) / 1e-7)) == -pf.logit(0.0)  # clipped, finite
    w = pf.softmax_weights([0.9, 0.5, 0.1], 1.0)
    assert w == pytest.approx([9 / (9 + 1 + 1 / 9), 1 / (9 + 1 + 1 / 9), (1 / 9) / (9 + 1 + 1 / 9)])
    assert pf.softmax_weights([0.9, 0.1], 2.0) == pytest.approx([0.9, 0.1])  # 81 : 1 at T = 1, its square root at T = 2
    rng = random.Random(0)
    assert pf.multinomial([1.0, 0.0, 1.0], 1000, 1.0, rng).count(1) == 0
    draws = pf.multinomial([0.9, 0.5], 20000, 1.0, random.Random(1))
    assert draws.count(0) / len(draws) == pytest.approx(0.9, abs=0.01)  # 9 : 1


def test_r_of_names_the_aggregation():
    root = Node()
    a = root.add_child(Step("a\n\n"))
    a.scores = [0.2]
    b = a.add_child(Step("b"))
    b.scores = [0.9, 0.6]
    assert pf.r_of(b, ParticleFilterConfig(agg_strategy="model")) == 0.6
    assert pf.r_of(b, ParticleFilterConfig(agg_strategy="last")) == 0.6
    assert pf.r_of(b, ParticleFilterConfig(agg_strategy="min")) == 0.6
    assert pf.r_of(b, ParticleFilterConfig(agg_strategy="prod")) == pytest.approx(0.54)
    assert pf.at_step(b, 1) is a and pf.at_step(b, 2) is b and pf.at_step(b, 5) is b


# ---------------------------------------------------------------- particle filtering


BRANCH_SCRIPT = {"": ["A\n\n", "B\n\n"], "A\n\n": ["A2 \\boxed{1}"], "B\n\n": ["B2 \\boxed{2}"]}


@pytest.mark.parametrize("good, answer", [("A", "1"), ("B", "2")])
def test_resampling_concentrates_on_the_branch_the_prm_prefers(good, answer):
    scores = {"A": 0.0, "B": 0.0, good: 1.0}
    policy = ScriptedPolicy(BRANCH_SCRIPT, prefix=P)
    out = pf.solve(P, Q, policy, prm_of(scores), ParticleFilterConfig(n=8))
    # round 1: one request per particle (n = 1, stop on the delimiter), half on each branch (cycle)
    assert policy.log[:8] == [("", 1, ("\n\n",), 0.8)] * 8
    # round 2: every particle is a copy of the preferred branch (the other's weight is logit(1e-7))
    assert [s for s, _, _, _ in policy.log[8:]] == [f"{good}\n\n"] * 8
    assert len(out) == 8 and answers(out) == [answer] * 8 and all(t.finished for t in out)
    # `model`: the PRM reads each whole prefix as one step; the stored scores are the prefix's after each step
    assert out[0].scores == [1.0, 0.5] and out[0].steps == [f"{good}\n\n", f"{good}2 \\boxed{{{answer}}}"]


def test_model_aggregation_scores_the_prefix_as_one_step_and_last_step_by_step():
    whole = {"A\n\nA2 \\boxed{1}", "B\n\nB2 \\boxed{2}"}
    policy, prm = ScriptedPolicy(BRANCH_SCRIPT, prefix=P), prm_of({"A": 0.9, "B": 0.9})
    pf.solve(P, Q, policy, prm, ParticleFilterConfig(n=2))
    assert sorted(prm.calls[0]) == [["A\n\n"], ["B\n\n"]]
    assert len(prm.calls[1]) == 2 and all(len(path) == 1 and path[0] in whole for path in prm.calls[1])
    policy, prm = ScriptedPolicy(BRANCH_SCRIPT, prefix=P), prm_of({"A": 0.9, "B": 0.9})
    out = pf.solve(P, Q, policy, prm, ParticleFilterConfig(n=2, agg_strategy="last"))
    assert len(prm.calls[1]) == 2 and all(len(path) == 2 and "".join(path) in whole for path in prm.calls[1])
    assert all(t.scores == [0.9, 0.5] for t in out)  # per-step scores


FIN_SCRIPT = {"": ["fin \\boxed{7}", "go\n\n"], "go\n\n": ["end \\boxed{8}"]}


def test_finished_particles_take_part_in_resampling():
    # round 1: slots 0, 2 finish (EOS, boxed), slots 1, 3 stay active; the finished ones have the better weight
    policy = ScriptedPolicy(FIN_SCRIPT, prefix=P)
    out = pf.solve(P, Q, policy, prm_of({"fin \\boxed{7}": 1.0, "go": 0.0}), ParticleFilterConfig(n=4))
    assert len(policy.calls) == 1  # every slot became a copy of a finished particle, and copies stay finished
    assert answers(out) == ["7"] * 4 and all(t.finished for t in out)
    # the other way round, the finished particles are resampled away
    policy = ScriptedPolicy(FIN_SCRIPT, prefix=P)
    out = pf.solve(P, Q, policy, prm_of({"fin \\boxed{7}": 0.0, "go": 1.0}), ParticleFilterConfig(n=4))
    assert [s for s, _, _, _ in policy.log[4:]] == ["go\n\n"] * 4 and answers(out) == ["8"] * 4
    # resample_inactive false: the finished keep their places, only the active ones are resampled
    policy = ScriptedPolicy(FIN_SCRIPT, prefix=P)
    out = pf.solve(P, Q, policy, prm_of({"fin \\boxed{7}": 1.0, "go": 0.0}),
                   ParticleFilterConfig(n=4, resample_inactive=False))
    assert [s for s, _, _, _ in policy.log[4:]] == ["go\n\n"] * 2
    assert sorted(answers(out)) == ["7", "7", "8", "8"]


FINAL_SCRIPT = {"": [f"{c} \\boxed{{{i}}}" for i, c in enumerate("abcdefgh")]}
FINAL_SCORES = {f"{c} \\boxed{{{i}}}": s for i, (c, s) in enumerate(zip("abcdefgh", [.5, .5, .5, .7, .5, .5, .5, .5]))}


def test_the_answer_is_the_argmax_before_any_final_resampling():
    policy = ScriptedPolicy(FINAL_SCRIPT, prefix=P)
    out = pf.solve(P, Q, policy, prm_of(FINAL_SCORES), ParticleFilterConfig(n=8))
    assert len(policy.calls) == 1  # all finished in round 1: no resampling at all
    assert answers(out) == ["3", "0", "1", "2", "4", "5", "6", "7"]  # the argmax first, then particle order
    # its_hub's quirk resamples once more, then takes the argmax of the copies: it can lose the best particle
    lost = 0
    for seed in range(20):
        cfg = ParticleFilterConfig(n=8, seed=seed)
        assert answers(pf.solve(P, Q, ScriptedPolicy(FINAL_SCRIPT, prefix=P), prm_of(FINAL_SCORES), cfg))[0] == "3"
        out = pf.solve(P, Q, ScriptedPolicy(FINAL_SCRIPT, prefix=P), prm_of(FINAL_SCORES),
                       cfg.model_copy(update={"quirk_final_resample": True}))
        lost += "3" not in answers(out)
        assert out[0].scores[-1] == max(t.scores[-1] for t in out)  # still the argmax of what is left
    assert lost >= 1


def test_sample_selection_draws_the_answer():
    chosen = set()
    for seed in range(10):
        cfg = ParticleFilterConfig(n=8, seed=seed, final_selection="sample", softmax_temperature=100.0)
        out = pf.solve(P, Q, ScriptedPolicy(FINAL_SCRIPT, prefix=P), prm_of(FINAL_SCORES), cfg)
        chosen.add(answers(out)[0])
        assert sorted(answers(out)) == [str(i) for i in range(8)]
    assert len(chosen) > 1  # not always the argmax


def test_the_record_and_report_give_the_drawn_answer_and_mark_subsets():
    """`final_selection: sample`: the record's `naive` at N is the drawn particle, not the argmax, and the report
    says so; its n < N columns are marked as subsets of the one run."""
    from app.search.record import solve_problem
    from app.search.results import format_summary, summarize

    recs, differs = [], 0
    for seed in range(10):
        cfg = ParticleFilterConfig(n=8, seed=seed, final_selection="sample", softmax_temperature=100.0)
        rec = solve_problem({"id": f"p{seed}", "question": Q, "answer": "3"}, "particle_filter", cfg,
                            ScriptedPolicy(FINAL_SCRIPT, prefix=P), prm_of(FINAL_SCORES), prompt=P,
                            extract_fn=simple_extract, grade_fn=lambda text, gold: simple_extract(text) == gold)
        drawn = rec["trajectories"][0]["answer"]
        assert rec["selection"]["naive"]["8"]["answer"] == drawn  # the draw, output first
        assert rec["selection"]["naive"]["1"]["answer"] == drawn  # n = 1: the first trajectory alone
        differs += drawn != "3"  # the argmax (score 0.7) is "3"
        recs.append(rec)
    assert differs >= 1
    s = summarize(recs)
    assert s["drawn"] and s["subsets"] == [1, 2, 4]
    assert s["accuracy"]["naive"][8] == pytest.approx(1 - differs / 10)
    text = format_summary(recs)
    assert "naive (drawn)" in text and "n=4*" in text and "n=8*" not in text and "ONE run at N" in text
    # best-of-N's n < N are runs at budget n in distribution: not marked
    bon = [{**r, "method": "best_of_n", "config": {}} for r in recs]
    assert summarize(bon)["subsets"] == [] and "*" not in format_summary(bon) and "drawn" not in format_summary(bon)


def test_eos_ends_a_particle_unless_the_its_hub_quirk():
    script = {"": ["no answer"], "no answer": [""]}  # EOS without \boxed, then empty steps
    policy = ScriptedPolicy(script, prefix=P)
    [out] = pf.solve(P, Q, policy, ScriptedPRM(), ParticleFilterConfig(n=1, max_steps=5))
    assert len(policy.calls) == 1 and out.finished and out.steps == ["no answer"]
    policy = ScriptedPolicy(script, prefix=P)
    [out] = pf.solve(P, Q, policy, ScriptedPRM(), ParticleFilterConfig(n=1, max_steps=5, quirk_no_eos_check=True))
    assert len(policy.calls) == 5 and out.steps == ["no answer", "", "", "", ""] and not out.finished


def test_depth_cap_and_token_limits():
    script = {"": ["w w\n\n"], "w w\n\n": ["x x\n\n"], "w w\n\nx x\n\n": ["y y\n\n"]}
    policy = ScriptedPolicy(script, prefix=P)
    [out] = pf.solve(P, Q, policy, ScriptedPRM(), ParticleFilterConfig(n=1, max_steps=2))
    assert out.steps == ["w w\n\n", "x x\n\n"] and not out.finished
    assert [r.max_tokens for call in policy.calls for r in call] == [2048, 2048]  # max_tokens: per step call
    policy = ScriptedPolicy(script, prefix=P)
    [out] = pf.solve(P, Q, policy, ScriptedPRM(), ParticleFilterConfig(n=1, max_total_tokens=3))
    assert [r.max_tokens for call in policy.calls for r in call] == [3, 1]
    assert out.tokens == 3 and out.finish_reason == "length" and not out.finished


def test_generate_inactive_quirk_costs_compute_only():
    def go(quirk):
        policy = ScriptedPolicy(FIN_SCRIPT, prefix=P)
        cfg = ParticleFilterConfig(n=2, resample_inactive=False, quirk_generate_inactive=quirk)
        return policy, pf.solve(P, Q, policy, prm_of({}), cfg)

    p0, out0 = go(False)
    p1, out1 = go(True)
    assert [t.text for t in out0] == [t.text for t in out1]
    assert [len(c) for c in p0.calls] == [2, 1] and [len(c) for c in p1.calls] == [2, 2]
    assert p1.usage.generated_tokens > p0.usage.generated_tokens


def test_requests_are_seeded_per_problem_and_particle():
    policy = ScriptedPolicy(BRANCH_SCRIPT, prefix=P)
    pf.solve(P, Q, policy, prm_of({}), ParticleFilterConfig(n=4), problem_id="p1")
    seeds = [r.seed for call in policy.calls for r in call]
    assert len(set(seeds)) == len(seeds) == 8
    policy = ScriptedPolicy(BRANCH_SCRIPT, prefix=P)
    pf.solve(P, Q, policy, prm_of({}), ParticleFilterConfig(n=4), problem_id="p2")
    assert set(seeds).isdisjoint(r.seed for call in policy.calls for r in call)


# ---------------------------------------------------------------- particle Gibbs


def test_gibbs_with_one_sweep_is_particle_filtering():
    world = {"": ["a\n\n", "b\n\n", "c \\boxed{3}"], "a\n\n": ["a1 \\boxed{1}", "a2\n\n"], "b\n\n": ["b1 \\boxed{2}"],
             "a\n\na2\n\n": ["a3 \\boxed{1}"]}
    scores = {"a": 0.6, "b": 0.4, "c \\boxed{3}": 0.3, "a1 \\boxed{1}": 0.8, "a2": 0.5, "b1 \\boxed{2}": 0.7}
    for seed in range(5):
        p1, p2 = ScriptedPolicy(world, prefix=P, mode="seed"), ScriptedPolicy(world, prefix=P, mode="seed")
        a = pf.solve(P, Q, p1, prm_of(scores), ParticleFilterConfig(n=6, seed=seed), problem_id="x")
        b = pg.solve(P, Q, p2, prm_of(scores), ParticleGibbsConfig(n=6, num_iterations=1, seed=seed), problem_id="x")
        assert [t.to_dict() for t in a] == [t.to_dict() for t in b]
        assert [r.seed for c in p1.calls for r in c] == [r.seed for c in p2.calls for r in c]


def test_gibbs_keeps_the_reference_whole_and_answers_from_the_last_sweep():
    script = {"": ["r1 \\boxed{1}", "r2 \\boxed{2}", "r3 \\boxed{3}", "r4 \\boxed{4}"]}
    scores = {"r1 \\boxed{1}": 0.999, "r2 \\boxed{2}": 0.001, "r3 \\boxed{3}": 0.2, "r4 \\boxed{4}": 0.3}
    policy = ScriptedPolicy(script, prefix=P)
    out = pg.solve(P, Q, policy, prm_of(scores), ParticleGibbsConfig(n=4, num_iterations=2))
    # sweep 1: r1, r2 (done at once); the reference drawn ~ softmax(logit r) is r1; sweep 2: one fresh particle (r3)
    assert [len(c) for c in policy.calls] == [2, 1]
    assert answers(out) == ["1", "3"]  # the last sweep only: argmax (the reference r1) first, then r3
    assert out[0].scores == [0.999]


def ref_world(ref_scores):
    """Sweep 1: both particles take A, A2 (, A3): the reference. Sweep 2's fresh particle starts with B."""
    steps = ["A\n\n", "A2 \\boxed{1}"] if len(ref_scores) == 2 else ["A\n\n", "A2\n\n", "A3 \\boxed{1}"]
    script = {"": ["A\n\n", "A\n\n", "B\n\n"], "B\n\n": ["B2 \\boxed{2}"]}
    for k in range(1, len(steps)):
        script["".join(steps[:k])] = [steps[k]]  # a cut copy of the reference continues as the reference did
    scores = {s.strip(): r for s, r in zip(steps, ref_scores)}
    scores.update({"B": 0.5, "B2 \\boxed{2}": 0.6})
    return script, scores, steps


@pytest.mark.parametrize("ref_scores, quirk, follows", [
    ((0.001, 0.999), None, "B"),                                      # own score at step 1: .001 < B's .5
    ((0.001, 0.999), "quirk_reference_final_weight", "A"),            # its_hub: the final .999
    ((0.001, 0.999, 0.001), None, "B"),
    ((0.001, 0.999, 0.001), "quirk_reference_final_weight", "B"),     # final .001
    ((0.001, 0.999, 0.001), "quirk_reference_weight_ahead", "A"),     # the paper's code: step 2's .999
])
def test_the_reference_competes_with_its_own_weight_at_the_same_step(ref_scores, quirk, follows):
    script, scores, ref_steps = ref_world(ref_scores)
    cfg = ParticleGibbsConfig(n=4, num_iterations=2, **({quirk: True} if quirk else {}))
    policy = ScriptedPolicy(script, prefix=P)
    out = pg.solve(P, Q, policy, prm_of(scores), cfg)
    sweep1 = 2 * len(ref_steps)  # two particles, one request each per step
    # sweep 2, round 1: the fresh particle takes B; then it is resampled against the reference at step 1
    assert policy.log[sweep1][0] == ""
    assert policy.log[sweep1 + 1][0] == ("B\n\n" if follows == "B" else "A\n\n")  # a copy of the reference, cut to
    #                                                                             1 step and made active
    # the reference itself is kept whole, the last particle of the last sweep
    assert [t.steps for t in out if t.steps == ref_steps]
    assert len(out) == 2


def test_gibbs_draws_the_reference_by_final_weight():
    script = {"": ["r1 \\boxed{1}", "r2 \\boxed{2}"] * 4}
    refs = []
    for seed in range(30):
        cfg = ParticleGibbsConfig(n=4, num_iterations=2, seed=seed)
        out = pg.solve(P, Q, ScriptedPolicy(script, prefix=P), prm_of({"r1 \\boxed{1}": 0.6, "r2 \\boxed{2}": 0.4}), cfg)
        refs.append(answers(out)[-1])  # the reference is the last particle
    assert refs.count("1") > refs.count("2") >= 1  # 9 : 4 odds per draw, yet a draw


# ---------------------------------------------------------------- end to end: real Ray actors, toy models


E2E = {
    "particle_filter": ["search.n=4"],
    "particle_gibbs": ["search.n=4", "search.num_iterations=2"],
}


@pytest.mark.parametrize("method", list(E2E))
def test_particle_methods_end_to_end_on_toy_models(method, ray_cluster, tmp_path):
    import jobs.search as job
    from app.config import load_config
    from app.search.results import read_records
    from tests.test_search_e2e import check_compute

    out_dir = tmp_path / method
    overrides = [f"output_dir={out_dir}", "data.limit=4", "data.shuffle_seed=3", "progress=false", "max_in_flight=4",
                 *E2E[method]]
    cfg = load_config(job.Config, f"toy/{method}", overrides)
    buf = io.StringIO()
    rc = job.run(cfg, out=buf)
    report, records = buf.getvalue(), read_records(out_dir)
    assert rc == 0, report
    assert len(records) == 4 and len({r["id"] for r in records}) == 4
    for rec in records:
        assert rec["method"] == method and rec["N"] == 4 and rec["agg_strategy"] == "last"
        particles = 4 if method == "particle_filter" else 2
        assert len(rec["trajectories"]) == particles
        for t in rec["trajectories"]:
            assert t["steps"] and len(t["scores"]) == len(t["steps"]) and all(0.0 <= s <= 1.0 for s in t["scores"])
        # the method's answer (first) is the argmax of the final scores, which naive at N reports
        finals = [t["scores"][-1] for t in rec["trajectories"]]
        assert finals[0] == max(finals) and rec["selection"]["naive"]["4"]["index"] == 0
    from actors.engines.base import load_tokenizer
    from actors.prm_formats import make_format
    from app.toy import resolve_model

    policy_tok = load_tokenizer(resolve_model("toy:policy"))
    fmt = make_format("qwen", load_tokenizer(resolve_model("toy:prm")))
    tokens = (lambda text: len(policy_tok(text)["input_ids"]),
              lambda question, steps: len(fmt.encode(question, list(steps)).input_ids))
    check_compute(method, records, tokens, scored=True)
    assert any(sel["correct"] for rec in records for sel in rec["selection"]["naive"].values())
    assert "naive" in report
