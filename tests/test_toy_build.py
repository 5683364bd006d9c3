"""`ponder toy build --quick` end to end: SFT on Ray Train + DeepSpeed, MC labels through a policy pool, PRM."""
from __future__ import annotations

import json

import pytest

from app.toy import CHECKPOINTS


@pytest.mark.slow
def test_build_quick_end_to_end(ray_cluster, tmp_path, capsys):
    from jobs.toy import main

    out = tmp_path / "ckpt"
    before = {p: p.stat().st_mtime for p in CHECKPOINTS.rglob("*") if p.is_file()}
    rc = main(["build", "--quick", "--out", str(out), f"work_dir={tmp_path / 'work'}",
               "sft.n_per_level=60", "mc.n_per_level=2", "mc.heldout_per_level=1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "toy world built into" in text
    for name, weights in (("policy", "model.safetensors"), ("prm", "model.safetensors")):
        folder = out / name
        for f in ("config.json", weights, "tokenizer.json", "tokenizer_config.json"):
            assert (folder / f).is_file(), (name, f)
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["dtype"] == "float32"
        assert (folder / weights).stat().st_size < 8 * 2**20
    assert json.loads((out / "prm" / "config.json").read_text())["architectures"] == ["Qwen2ForProcessRewardModel"]
    held = [json.loads(x) for x in (out / "heldout_mc.jsonl").read_text().splitlines()]
    assert held and all(len(r["soft"]) == len(r["steps"]) for r in held)
    summary = json.loads((out / "build.json").read_text())
    assert summary["seconds"]["total"] > 0
    # the shipped checkpoints were not touched
    assert before == {p: p.stat().st_mtime for p in CHECKPOINTS.rglob("*") if p.is_file()}

    # the built models load through the same code as the shipped ones, in float32
    import torch
    from transformers import AutoModelForCausalLM

    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel

    assert AutoModelForCausalLM.from_pretrained(out / "policy").dtype == torch.float32
    assert Qwen2ForProcessRewardModel.from_pretrained(out / "prm").dtype == torch.float32

    # eval --json on the built world: one JSON object, keys per level and "all", as the last line
    capsys.readouterr()
    rc = main(["eval", "--models", str(out), "--json", "eval.n_per_level=2", "eval.n=2", "levels=[1,3]"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {"1", "3", "all"}
    for key in ("greedy", "majority@2", "prm_best_of_2", "step_auc", "step_choice_prm", "step_choice_policy"):
        assert key in res["1"]
    assert res["all"]["problems"] == 4
    for key in ("step_choice_prm", "step_choice_policy"):
        v = res["all"][key]
        assert (v is None) == (res["all"]["step_choice_pairs"] == 0) and (v is None or 0.0 <= v <= 1.0)


def test_choice_accuracy_counts_right_over_wrong_pairs_within_a_prefix_only():
    from train.toy.evaluate import choice_accuracy

    # group 1: the right step (0.9) beats both wrong ones; group 2: one wrong step outranks the right one, one ties
    groups = [[(0.9, 1), (0.2, 0), (0.5, 0)], [(0.4, 1), (0.7, 0), (0.4, 0)], [(0.1, 1), (0.3, 1)]]
    acc, pairs = choice_accuracy(groups)
    assert pairs == 4 and acc == (1 + 1 + 0 + 0.5) / 4
    # pairs never cross groups: a wrong step scored low in another group does not help
    assert choice_accuracy([[(0.5, 1)], [(0.1, 0)]]) == (None, 0)


def test_quick_refuses_to_overwrite_shipped(capsys):
    from jobs.toy import main

    assert main(["build", "--quick", "--out", str(CHECKPOINTS)]) == 2
    assert "shipped" in capsys.readouterr().err


def test_prm_body_of_its_own_is_a_validated_recipe_option():
    from app.config import ConfigError
    from train.toy.config import load

    cfg = load(None, ["prm.init_from_policy=false", "prm.size=small", "prm.extra_layers=0"], quick=False)
    assert (cfg.prm.size, cfg.prm.init_from_policy) == ("small", False)
    for overrides, needle in (
        (["prm.init_from_policy=false", "prm.size=huge", "prm.extra_layers=0"], "prm.size: unknown toy model size 'huge'"),
        (["prm.size=small"], "prm.init_from_policy: false"),  # a body of its own, but the recipe starts it from the policy's
        (["prm.init_from_policy=false", "prm.size=small"], "prm.extra_layers"),  # the shipped recipe's 2 extra layers
        (["sft.size=huge"], "sft.size: unknown toy model size"),
    ):
        with pytest.raises(ConfigError) as e:
            load(None, overrides, quick=False)
        assert needle in str(e.value) and "\n" not in str(e.value), (overrides, str(e.value))
