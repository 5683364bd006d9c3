"""Preference pairs on scripted data (outcome, PRM best-of, step pairs from MC labels; resume), the one-line
refusals of bad DPO / pairs recipes before Ray starts, and the training storage path on a cluster."""
from __future__ import annotations

import json
import time

import pytest

from app.contracts import Completion
from app.toy.checker import exact_step_labels
from app.toy.world import toy_problems
from tests.test_mc_labels import ScriptedPool, ScriptedToyPolicy, _slip
from train.synthesize.mc_labels import MCLabelConfig, label_problem
from train.synthesize.pairs import (PairsConfig, first_bad_step, outcome_pairs, pair_problem, prm_pairs, read_done,
                                    run, step_candidates, step_pairs)

PICKLED_WITH = ("tests.test_mc_labels",)  # its ScriptedPool runs in the Ray tasks (conftest.pickled_by_value)

PROBLEM = {"id": "p1", "question": "What is 1 + 2?", "answer": "3", "level": 1}


def test_outcome_pairs_every_right_against_every_wrong():
    trajs = [("A \\boxed{3}", True, "eos"), ("B \\boxed{4}", False, "eos"), ("A \\boxed{3}", True, "eos"),
             ("C \\boxed{3}", True, "eos"), ("D \\boxed{5}", False, "eos"), ("E cut", False, "length")]
    pairs = outcome_pairs(PROBLEM, "Q: ", trajs)
    assert [(p["chosen"][0], p["rejected"][0]) for p in pairs] == [("A", "B"), ("A", "D"), ("C", "B"), ("C", "D")]
    assert all(p["kind"] == "outcome" and p["eos"] and p["prefix"] == "" and p["prompt"] == "Q: " for p in pairs)
    assert len({p["pair_id"] for p in pairs}) == 4  # each pair its own record (LPR's merge kept one per question)
    assert len(outcome_pairs(PROBLEM, "Q: ", trajs, limit=3)) == 3


def test_prm_pairs_top_right_against_top_wrong_plus_right_vs_right_margin():
    trajs = [("R1", True, "eos"), ("R2", True, "eos"), ("R3", True, "eos"), ("W1", False, "eos"),
             ("W2", False, "eos"), ("W3", False, "eos")]
    rewards = [0.9, 0.3, 0.7, 0.2, 0.8, 0.1]
    pairs = prm_pairs(PROBLEM, "Q: ", trajs, rewards, top=2, margin=0.5)
    got = [(p["chosen"], p["rejected"]) for p in pairs]
    # chosen: R1 (0.9), R3 (0.7); rejected: the best-scored wrong ones W2 (0.8), W1 (0.2); R1 - R3 = 0.2 < 0.5
    assert got == [("R1", "W2"), ("R1", "W1"), ("R3", "W2"), ("R3", "W1")]
    pairs = prm_pairs(PROBLEM, "Q: ", trajs, rewards, top=3, margin=0.5)
    assert ("R1", "R2") in [(p["chosen"], p["rejected"]) for p in pairs]  # right vs right: 0.9 - 0.3 > 0.5
    assert ("R3", "R2") not in [(p["chosen"], p["rejected"]) for p in pairs]  # 0.4: not enough
    assert all(p["kind"] == "prm" and p["eos"] for p in pairs)
    assert {(p["chosen_reward"], p["rejected_reward"]) for p in pairs if p["chosen"] == "R3"} >= {(0.7, 0.8)}


def _mc_records(problem) -> list[dict]:
    p = dict(id=problem.id, question=problem.question, answer=problem.answer, level=problem.level)
    return label_problem(ScriptedToyPolicy(), p, MCLabelConfig(problems="toy:train", samples=2, k=4,
                                                               output="unused.jsonl", progress=False))


def test_step_pairs_from_mc_labels():
    """The scripted policy's odd samples slip in their last computation: the MC labels find that step; the right
    continuation of the prefix before it gives the chosen step; no EOS."""
    problem = toy_problems("train", n_per_level=1, levels=[4])[0]
    good, bad = _mc_records(problem)
    n = len(bad["steps"])
    assert first_bad_step(good) is None and first_bad_step(bad) == n - 2
    cands = step_candidates([good, bad, bad])
    assert len(cands) == 1  # the same bad step twice is one candidate
    prefix, step, k = cands[0]
    right = good["steps"]  # the scripted policy's right solution
    assert prefix == right[:k] and step == bad["steps"][k] and step != right[k]
    pd = dict(id=problem.id, question=problem.question, answer=problem.answer, level=4)
    conts = [["The answer is \\boxed{-1}.", "".join(right[k:])]]  # the first ends wrong, the second right
    (pair,) = step_pairs(pd, "Q: ", cands, conts)
    assert pair["chosen"] == right[k] and pair["rejected"] == step and pair["prefix"] == "".join(right[:k])
    assert pair["kind"] == "step" and pair["eos"] is False and pair["right_continuations"] == 1
    assert exact_step_labels(problem.question, prefix + [pair["chosen"]])[-1] == 1
    assert step_pairs(pd, "Q: ", cands, [["The answer is \\boxed{-1}."]]) == []  # no continuation ends right


class ScriptedPRM:
    """Step score 0.9 for a right step, 0.1 for a wrong one (the toy checker)."""

    def score(self, question, trajectories):
        return [[0.9 if y else 0.1 for y in exact_step_labels(question, steps)] for steps in trajectories]


def test_pair_problem_makes_all_three_kinds():
    problem = toy_problems("train", n_per_level=1, levels=[3])[0]
    pd = dict(id=problem.id, question=problem.question, answer=problem.answer, level=3)
    cfg = PairsConfig(kinds=["outcome", "prm", "step"], prm={"model": "toy:prm"}, mc_data="unused.jsonl",
                      samples=4, continuations=4, output="unused.jsonl")
    mc = _mc_records(problem)
    solution = "".join(mc[0]["steps"])  # the scripted policy's right solution; its odd samples slip
    pairs = pair_problem(ScriptedToyPolicy(), ScriptedPRM(), pd, mc, cfg)
    kinds = [p["kind"] for p in pairs]
    assert kinds.count("outcome") == 1 and kinds.count("prm") == 1 and kinds.count("step") == 1, kinds
    by = {p["kind"]: p for p in pairs}
    assert by["outcome"]["chosen"] == solution and by["outcome"]["rejected"] == _slip(solution)
    assert by["prm"]["chosen_reward"] > by["prm"]["rejected_reward"]
    assert solution.startswith(by["step"]["prefix"] + by["step"]["chosen"])
    assert by["step"]["rejected"] in _slip(solution) and by["step"]["rejected"] not in solution


def test_run_writes_one_record_per_pair_and_resumes(ray_cluster, tmp_path, pickled_by_value):
    out = tmp_path / "pairs.jsonl"
    cfg = PairsConfig(kinds=["outcome"], problems="toy:train", n_per_level=2, levels=[2, 4], samples=2,
                      output=str(out), progress=False)
    stats = run(cfg, pool=ScriptedPool())
    assert stats["problems"] == 4 and stats["pairs"] == 4 and stats["by_kind"] == {"outcome": 4}
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and len({json.loads(x)["pair_id"] for x in lines}) == 4
    assert run(cfg, pool=ScriptedPool())["skipped"] == 4 and out.read_text().splitlines() == lines
    # a kill between a problem's pairs and its done line, and a torn line: both dropped, the problem redone
    marks = tmp_path / "pairs.jsonl.done"
    marks.write_text("\n".join(marks.read_text().splitlines()[:3]) + "\n")
    out.write_text("\n".join(lines) + "\n" + lines[0][:30])
    assert len(read_done(out)) == 3 and len(out.read_text().splitlines()) == 3
    again = run(cfg, pool=ScriptedPool())
    assert again["problems"] == 1 and again["pairs"] == 1
    assert sorted(out.read_text().splitlines()) == sorted(lines)
    # shards split the problems between jobs
    half = [PairsConfig(**dict(cfg.model_dump(), num_shards=2, shard=s, output=str(tmp_path / f"s{s}.jsonl")))
            for s in (0, 1)]
    assert sum(run(c, pool=ScriptedPool())["problems"] for c in half) == 4


# --- bad recipes: one line naming the file and the key, before Ray, in well under a second ---------------------

class RayStarted(Exception):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    import jobs.synthesize
    import jobs.train

    boom = lambda *a, **k: (_ for _ in ()).throw(RayStarted())  # noqa: E731
    monkeypatch.setattr(jobs.train, "init_ray", boom)
    monkeypatch.setattr(jobs.synthesize, "init_ray", boom)


def _one_line(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for n in needles:
        assert n in err, (n, err)
    return err


def _pairs_file(tmp_path, records) -> str:
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(p)


GOOD = {"prompt": "Q: ", "chosen": "right", "rejected": "wrong", "kind": "outcome"}


def test_bad_dpo_recipes_fail_in_one_line_before_ray(tmp_path, no_ray, capsys):
    from jobs.train import main

    (tmp_path / "r.yaml").write_text("job: ppo-but-typo\ndata: x.jsonl\n")
    assert main(["--config", str(tmp_path / "r.yaml")]) == 2
    _one_line(capsys, "r.yaml", "'job'", "ppo-but-typo")
    assert main(["frobnicate", "--config", "toy/dpo"]) == 2
    _one_line(capsys, "unknown trainer 'frobnicate'")
    assert main(["step-dpo", "--config", "toy/dpo"]) == 2
    _one_line(capsys, "dpo.yaml", "'job' is 'dpo'", "'step-dpo'")
    data = _pairs_file(tmp_path, [GOOD])
    assert main(["dpo", "--config", "toy/dpo", f"data={data}", "train.zero_stage=4"]) == 2
    _one_line(capsys, "dpo.yaml", "train.zero_stage")
    assert main(["dpo", "--config", "toy/dpo", f"data={tmp_path / 'missing.jsonl'}"]) == 2
    _one_line(capsys, "dpo.yaml", "data:", "missing.jsonl")
    no_chosen = {k: v for k, v in GOOD.items() if k != "chosen"}
    for records, needles in (
        ([GOOD, GOOD, no_chosen], ["line 3", "'chosen'"]),
        ([GOOD, "{not json"], ["line 2", "not valid JSON"]),
        ([GOOD, dict(GOOD, chosen=["a"])], ["line 2", "'chosen' is a list, not a string"]),
        ([dict(GOOD, kind="weird")], ["line 1", "'kind'", "weird"]),
        ([dict(GOOD, kind="step")], ["no pairs of kinds ['outcome']"]),
    ):
        data = _pairs_file(tmp_path, records)
        t0 = time.perf_counter()
        assert main(["dpo", "--config", "toy/dpo", f"data={data}"]) == 2
        assert time.perf_counter() - t0 < 1.0
        _one_line(capsys, "dpo.yaml", "pairs.jsonl", *needles)
    with pytest.raises(RayStarted):  # a good file passes every check
        main(["dpo", "--config", "toy/dpo", f"data={_pairs_file(tmp_path, [GOOD])}"])
    with pytest.raises(RayStarted):
        main(["step-dpo", "--config", "toy/step_dpo", f"data={_pairs_file(tmp_path, [dict(GOOD, kind='step')])}"])


def test_bad_pairs_recipes_fail_in_one_line_before_ray(tmp_path, no_ray, capsys):
    from jobs.synthesize import main

    assert main(["pairs", "--config", "toy/pairs", "kinds=[step]"]) == 2
    _one_line(capsys, "pairs.yaml", "mc_data")
    assert main(["pairs", "--config", "toy/pairs", "kinds=[step]", f"mc_data={tmp_path / 'nope.jsonl'}"]) == 2
    _one_line(capsys, "pairs.yaml", "mc_data", "nope.jsonl")
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"problem_id": "a", "question": "q", "answer": "1", "steps": ["x"]}) + "\n")
    assert main(["pairs", "--config", "toy/pairs", "kinds=[step]", f"mc_data={mc}"]) == 2
    _one_line(capsys, "mc.jsonl", "line 1", "'hard'")
    assert main(["pairs", "--config", "toy/pairs", "kinds=[prm]", "prm=null"]) == 2
    _one_line(capsys, "pairs.yaml", "prm")
    assert main(["nonsense", "--config", "toy/pairs"]) == 2
    _one_line(capsys, "pairs")
    with pytest.raises(RayStarted):
        main(["pairs", "--config", "toy/pairs"])


# --- storage on a cluster (issue 25, item 3) ---------------------------------------------------------------------

def test_storage_path_is_refused_where_it_would_land_on_the_head_node(monkeypatch, tmp_path):
    from train.loop import TrainConfig

    assert TrainConfig().storage_path.startswith("/")  # on a laptop: resolved here
    assert TrainConfig(storage_path="s3://bucket/ponder/train").storage_path == "s3://bucket/ponder/train"
    with pytest.raises(ValueError, match="train.storage_path.*<shared> placeholder"):
        TrainConfig(storage_path="<shared>/ponder/train")
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # connected to a cluster
    with pytest.raises(ValueError, match="train.storage_path: 'runs/train' is relative"):
        TrainConfig()  # the default too: never silently a folder on the head node
    with pytest.raises(ValueError, match="train.storage_path: 'ckpts' is relative"):
        TrainConfig(storage_path="ckpts")
    assert TrainConfig(storage_path=str(tmp_path)).storage_path == str(tmp_path)
    assert TrainConfig(storage_path="gs://b/x").storage_path == "gs://b/x"


def test_relative_storage_in_a_recipe_is_one_line_on_a_cluster(monkeypatch, tmp_path, no_ray, capsys):
    from jobs.train import main

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")  # as under `ray job submit`
    data = _pairs_file(tmp_path, [GOOD])
    assert main(["dpo", "--config", "toy/dpo", f"data={data}"]) == 2
    _one_line(capsys, "dpo.yaml", "train.storage_path", "relative")
    assert main(["dpo", "--config", "toy/dpo", f"data={data}", f"train.storage_path={tmp_path}"]) == 2
    _one_line(capsys, "dpo.yaml", "output", "relative")  # the exported model too
    with pytest.raises(RayStarted):
        main(["dpo", "--config", "toy/dpo", f"data={data}", f"train.storage_path={tmp_path}", f"output={tmp_path}/m"])


def test_the_model_is_exported_from_a_uri_checkpoint(tmp_path):
    """Storage on a bucket: the exported model is read through the checkpoint's filesystem (an in-memory one
    stands in for s3), never as a local path built from checkpoint.path."""
    import fsspec
    import ray.train
    from pyarrow.fs import FSSpecHandler, PyFileSystem
    from safetensors.torch import load_file

    from app.toy import resolve_model
    from train.export import download_export, export_to, exported_model

    mem = fsspec.filesystem("memory")
    src = resolve_model("toy:policy")
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        with open(f"{src}/{f}", "rb") as a, mem.open(f"/bucket/run/step_1/hf/{f}", "wb") as b:
            b.write(a.read())
    mem.pipe("/bucket/run/step_1/ds/huge_optimizer_shard.pt", b"x" * 1000)
    ckpt = ray.train.Checkpoint("/bucket/run/step_1", filesystem=PyFileSystem(FSSpecHandler(mem)))

    class Result:
        checkpoint = ckpt

    assert str(exported_model(Result)) == "/bucket/run/step_1/hf"
    got = download_export(ckpt, tmp_path / "dl")
    assert sorted(p.name for p in got.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]  # hf/ only, not the shards
    out = export_to(ckpt, tmp_path / "policy")
    assert set(load_file(str(out / "model.safetensors"))) == set(load_file(f"{src}/model.safetensors"))
    Result.checkpoint = ray.train.Checkpoint("/bucket/run/step_2", filesystem=PyFileSystem(FSSpecHandler(mem)))
    with pytest.raises(FileNotFoundError, match="no exported model"):
        exported_model(Result)


@pytest.mark.parametrize("name", ["sft", "dpo", "step_dpo", "prm"])
def test_gpu_recipes_refuse_the_placeholder_and_train_zero3_bf16_on_gpu(name, tmp_path, capsys):
    from jobs.train import load, main

    assert main(["--config", f"qwen2.5-math-7b/{name}"]) == 2
    _one_line(capsys, f"{name}.yaml", "train.storage_path", "<shared>")
    shared = [f"train.storage_path={tmp_path}/train", f"output={tmp_path}/model"]
    assert main(["--config", f"qwen2.5-math-7b/{name}", f"train.storage_path={tmp_path}/train"]) == 2
    _one_line(capsys, f"{name}.yaml", "output", "<shared>")
    cfg = load(f"qwen2.5-math-7b/{name}", shared)
    t = cfg.train
    assert t.use_gpu and t.zero_stage == 3 and t.bf16 and t.gradient_checkpointing and t.num_workers >= 8
