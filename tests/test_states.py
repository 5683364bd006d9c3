"""LPR's intermediate states: which prefixes are kept, their values, the records (scripted policy); resume and
shards; end to end through a real toy policy pool, then a tiny LPR PRM trained on the output (Ray Train, 2 workers,
ZeRO-2) whose PRM actor scores each step with P(v >= 2)."""
from __future__ import annotations

import json
import random

import pytest

from app.search.tree import split_steps
from app.toy.checker import exact_step_labels
from app.toy.world import toy_problems
from tests.test_mc_labels import ScriptedPool, ScriptedToyPolicy
from train.synthesize.states import (StatesConfig, pick_states, records_of, run, state_lengths, state_value,
                                     states_problem)

PICKLED_WITH = ("tests.test_mc_labels",)  # its ScriptedPool runs in the Ray tasks (conftest.pickled_by_value)


def test_states_start_at_a_fifth_of_the_steps_and_are_kept_with_probability_ratio():
    rng = random.Random(0)
    assert state_lengths(10, 1.0, 0.2, rng) == list(range(2, 10))   # int(0.2 * 10) .. L - 1: never the full one
    assert state_lengths(3, 1.0, 0.2, rng) == [1, 2]                 # int(0.6) = 0: the empty state is never kept
    assert state_lengths(1, 1.0, 0.2, rng) == []
    assert state_lengths(20, 1.0, 0.5, rng) == list(range(10, 20))
    kept = [k for _ in range(2000) for k in state_lengths(10, 0.4, 0.2, rng)]
    assert min(kept) == 2 and max(kept) == 9
    assert abs(len(kept) / (2000 * 8) - 0.4) < 0.02                  # each candidate kept with probability 0.4
    a, b = random.Random(7), random.Random(7)
    assert state_lengths(30, 0.3, 0.2, a) == state_lengths(30, 0.3, 0.2, b)


def test_value_counts_right_completions_and_an_empty_completion_drops_the_state():
    state = "(1 + 2) + 3 = 3 + 3.\n\n"
    right, wrong = "3 + 3 = 6.\n\nThe answer is \\boxed{6}.", "The answer is \\boxed{7}."
    assert state_value(state, [right, right, wrong], "6") == 2
    assert state_value(state, [wrong] * 3, "6") == 0
    assert state_value(state, [right, "  ", right], "6") is None


def test_distinct_states_seeded_per_sample():
    a = ["x1\n\n", "x2\n\n", "x3\n\n", "x4\n\n", "x5"]
    picked = pick_states([a, list(a), ["y1\n\n", "y2"]], ratio=1.0, start=0.2, seed=3)
    assert [(j, len(s)) for j, s in picked] == [(0, 1), (0, 2), (0, 3), (0, 4), (2, 1)]  # sample 1 repeats sample 0
    assert pick_states([a] * 4, 0.5, 0.2, seed=3) == pick_states([a] * 4, 0.5, 0.2, seed=3)
    assert pick_states([a] * 4, 0.5, 0.2, seed=3) != pick_states([a] * 4, 0.5, 0.2, seed=4)


def _problem(level=4):
    p = toy_problems("train", n_per_level=1, levels=[level])[0]
    return dict(id=p.id, question=p.question, answer=p.answer, level=level)


def test_states_problem_values_on_track_states_3_and_slipped_ones_0():
    """The scripted policy: even samples right, odd ones slip on their last computation; an on-track prefix is
    completed right by its first 3 completions, a slipped one never."""
    problem = _problem(5)
    cfg = StatesConfig(samples=4, ratio=1.0, completions=3, output="unused.jsonl", progress=False)
    recs = states_problem(ScriptedToyPolicy(), problem, cfg)
    states = [r for r in recs if r["kind"] == "state"]
    full = [r for r in recs if r["kind"] == "full"]
    assert [(r["sample"], r["value"], r["correct"]) for r in full] == [(0, 3, True), (1, 0, False)]  # distinct ones
    n = len(full[0]["steps"])
    # the right trajectory's prefixes, and the one prefix of the slipped trajectory that holds its slip (step n - 2)
    assert sorted(len(r["steps"]) for r in states) == sorted([*range(max(1, int(0.2 * n)), n), n - 1])
    for r in states:
        assert r["value"] == (3 if all(r["exact"]) else 0), r
        assert r["steps"][-1].endswith("\n\n") and r["completions"] == 3
    assert any(r["value"] == 0 for r in states)

    class EmptyCompletions(ScriptedToyPolicy):
        def generate(self, requests):
            out = super().generate(requests)
            if len(requests) > 1 or not requests[0].prompt.endswith("Answer:\n\n"):  # the completions' call
                for group in out:
                    group[1].text = ""
            return out

    recs = states_problem(EmptyCompletions(), problem, cfg)
    assert [r["kind"] for r in recs] == ["full", "full"]  # every state had an empty completion: dropped


def test_records_of_full_trajectories():
    problem = dict(id="p", question="What is 1 + 2?", answer="3")
    trajs = [(["a\n\n", "b"], True, "eos"), (["a\n\n", "b"], True, "eos"), (["c"], False, "length"), ([""], False, "eos")]
    recs = records_of(problem, trajs, [(0, ["a\n\n"])], [2], completions=3)
    assert [(r["kind"], r["value"]) for r in recs] == [("state", 2), ("full", 3), ("full", 0)]
    assert records_of(problem, trajs, [], [], completions=3, full=False) == []


def test_run_resumes_and_shards(ray_cluster, tmp_path, pickled_by_value):
    out = tmp_path / "states.jsonl"
    cfg = StatesConfig(problems="toy:train", n_per_level=2, levels=[2, 4], samples=2, ratio=1.0, output=str(out),
                       progress=False)
    stats = run(cfg, pool=ScriptedPool())
    assert stats["problems"] == 4 and stats["full"] == 8 and stats["records"] == stats["state"] + 8
    lines = out.read_text().splitlines()
    assert run(cfg, pool=ScriptedPool())["skipped"] == 4 and out.read_text().splitlines() == lines
    marks = tmp_path / "states.jsonl.done"
    marks.write_text("\n".join(marks.read_text().splitlines()[:3]) + "\n")   # killed before the last done line
    out.write_text("\n".join(lines) + "\n" + lines[0][:25])                 # ... and a torn line
    again = run(cfg, pool=ScriptedPool())
    assert again["problems"] == 1 and again["skipped"] == 3
    assert sorted(out.read_text().splitlines()) == sorted(lines)
    half = [StatesConfig(**dict(cfg.model_dump(), num_shards=2, shard=s, output=str(tmp_path / f"s{s}.jsonl")))
            for s in (0, 1)]
    got = [run(c, pool=ScriptedPool())["problems"] for c in half]
    assert got == [2, 2]
    ids = [{json.loads(x)["problem_id"] for x in (tmp_path / f"s{s}.jsonl").read_text().splitlines()} for s in (0, 1)]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 4


# --- end to end: the toy policy pool, then a tiny LPR PRM trained on what it made ----------------------------------

@pytest.fixture(scope="module")
def toy_pool(ray_cluster):
    from actors.policy import start_policy_pool
    from app.pool_config import PoolConfig

    pool = start_policy_pool(PoolConfig(engine="hf", model="toy:policy", replicas=1, max_batch=64, gather_ms=20))
    yield pool
    pool.shutdown()


@pytest.fixture(scope="module")
def states_output(toy_pool, tmp_path_factory):
    out = tmp_path_factory.mktemp("states") / "states.jsonl"
    cfg = StatesConfig(problems="toy:train", n_per_level=3, levels=[3, 4, 5], samples=6, ratio=0.6, max_tokens=300,
                       output=str(out), progress=False)
    stats = run(cfg, pool=toy_pool)
    return cfg, stats, [json.loads(x) for x in out.read_text().splitlines()]


def test_states_through_the_toy_policy_pool(states_output):
    cfg, stats, recs = states_output
    assert stats["problems"] == 9 and stats["records"] == len(recs) > 20
    states = [r for r in recs if r["kind"] == "state"]
    full = [r for r in recs if r["kind"] == "full"]
    assert states and full and {r["value"] for r in recs} <= {0, 1, 2, 3}
    for r in states:  # a state is a prefix of one of its problem's sampled trajectories, cut at a step boundary
        assert 1 <= len(r["steps"]) and r["steps"][-1].endswith("\n\n")
        assert any("".join(f["steps"]).startswith("".join(r["steps"])) for f in full
                   if f["problem_id"] == r["problem_id"])
    for r in full:
        assert r["value"] == (3 if r["correct"] else 0)
        assert r["exact"] == exact_step_labels(r["question"], r["steps"])
    # values track the truth: states whose steps are all right are worth far more than slipped ones
    good = [r["value"] for r in states if all(r["exact"])]
    bad = [r["value"] for r in states if not all(r["exact"])]
    assert good and bad and sum(good) / len(good) > sum(bad) / len(bad) + 1.0, (good, bad)


def test_a_tiny_lpr_prm_trains_on_states_and_scores_p_v_at_least_2(states_output, tmp_path):
    """`ponder train prm` with format lpr on the states output (2 workers, ZeRO-2): the loss goes down, and the PRM
    actor's step scores are P(v >= 2) of the trained 4-way head at the last token of each prefix."""
    import torch

    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel
    from actors.prm import start_prm_pool
    from app.pool_config import PRMPoolConfig
    from train.loop import TrainConfig
    from train.prm import PRMTask, PRMTrainConfig, train

    _, _, recs = states_output
    data = tmp_path / "states.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    run_cfg = TrainConfig(num_workers=2, zero_stage=2, micro_batch_size=8, lr=3e-3, warmup_steps=2, epochs=3,
                          name="lpr-test", storage_path=str(tmp_path / "ray"), keep_checkpoints=5, progress=False)
    cfg = PRMTrainConfig(format="lpr", model="new:toy-tiny", init_from="toy:policy", data=str(data),
                         output=str(tmp_path / "lpr"), train=run_cfg)
    result, path = train(cfg)
    losses = {m["epoch"]: m["loss"] for _, m in result.best_checkpoints}
    assert sorted(losses) == [0, 1, 2] and losses[2] < losses[0], losses
    model = Qwen2ForProcessRewardModel.from_pretrained(str(path), dtype=torch.float32).eval()
    assert model.config.num_labels == 4

    q = recs[0]["question"]
    steps = next(r["steps"] for r in recs if r["kind"] == "full" and r["question"] == q)
    task = PRMTask(cfg)
    fmt = task.fmt(task.build_tokenizer())
    expected = []
    with torch.no_grad():
        for k in range(1, len(steps) + 1):  # each prefix alone, its last token: P(v >= 2)
            ids = torch.tensor([fmt.encode(q, steps[:k]).input_ids])
            expected.append(model(input_ids=ids).logits[0, -1].softmax(-1)[2:].sum().item())
    # PRMFormatName (app/pool_config.py) does not list "lpr" yet: the format reaches the actor past the recipe check
    pool_cfg = PRMPoolConfig(model=str(path), replicas=1).model_copy(update={"format": "lpr"})
    pool = start_prm_pool(pool_cfg)
    try:
        (got,) = pool.client().score(q, [steps])
        assert got == pytest.approx(expected, abs=1e-4)
        assert len(got) == len(steps) and all(0 <= s <= 1 for s in got)
        (short,) = pool.client().score(q, [steps[:2]])
        assert short == pytest.approx(expected[:2], abs=1e-4)   # a prefix scores the same as inside the whole
    finally:
        pool.shutdown()


# --- the job: bad recipes fail in one line before Ray; the cluster recipes plan and fit one 8-GPU node --------------

class RayStarted(Exception):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    import jobs.synthesize

    monkeypatch.setattr(jobs.synthesize, "init_ray", lambda *a, **k: (_ for _ in ()).throw(RayStarted()))


@pytest.mark.parametrize("kind", ["states", "omega"])
def test_bad_recipes_fail_in_one_line_before_ray(kind, tmp_path, no_ray, capsys):
    import time

    from jobs.synthesize import main

    for args, needles in (
        ([f"ratio=2" if kind == "states" else "k=0"], [f"{kind}.yaml", "ratio" if kind == "states" else "k"]),
        (["shard=3", "num_shards=2"], [f"{kind}.yaml", "shard"]),
        (["no_such_key=1"], [f"{kind}.yaml", "no_such_key"]),
        (["output=<shared>/x.jsonl"], [f"{kind}.yaml", "output", "<shared>"]),
    ):
        t0 = time.perf_counter()
        assert main([kind, "--config", f"toy/{kind}", *args]) == 2
        assert time.perf_counter() - t0 < 1.0
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and all(n in err for n in needles), (args, err)
    other = "omega" if kind == "states" else "states"
    assert main([kind, "--config", f"toy/{other}"]) == 2
    assert f"'job' is '{other}'" in capsys.readouterr().err
    with pytest.raises(RayStarted):
        main([kind, "--config", f"toy/{kind}", f"output={tmp_path}/out.jsonl"])


@pytest.mark.parametrize("kind", ["states", "omega"])
def test_cluster_recipes_plan_and_fit_one_8_gpu_node_and_refuse_the_placeholder(kind, capsys):
    from actors.placement import check_fit, plan_pools
    from app.config import load_config
    from jobs.synthesize import KINDS, main

    module, name, _ = KINDS[kind]
    cfg = load_config(getattr(__import__(module, fromlist=[name]), name), f"qwen2.5-math-7b/{kind}", [])
    assert cfg.policy.engine == "vllm" and cfg.policy.dtype == "bfloat16" and cfg.output.startswith("<shared>/")
    check_fit(plan_pools({"policy": cfg.policy}, gpus=True), [{"GPU": 8.0, "CPU": 64.0}])
    assert main([kind, "--config", f"qwen2.5-math-7b/{kind}"]) == 2
    err = capsys.readouterr().err
    assert "output" in err and "<shared>" in err
