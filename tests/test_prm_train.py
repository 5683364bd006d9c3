"""PRM training pieces without Ray: the input layout is the PRM actor's, labels sit at the tags, the
Math-Shepherd loss reads the '+'/'-' logits AT the tag position, and the AUC."""
from __future__ import annotations

import math

import pytest
import torch

from train.prm import PRMTask, PRMTrainConfig, auc, math_shepherd_loss

RECORD = {"question": "What is 1 + 2 + 3?", "steps": ["(1 + 2) + 3 = 3 + 3.\n\n", "3 + 3 = 6.\n\n", "The answer is \\boxed{6}."],
          "soft": [0.75, 0.5, 1.0], "hard": [1, 1, 1]}


def test_auc():
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert math.isnan(auc([0.1, 0.2], [1, 1]))


def test_qwen_layout_matches_the_prm_actor():
    from actors.prm_formats import QwenPRMFormat
    from app.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    task = PRMTask(PRMTrainConfig(data="unused.jsonl"))
    (ex,), dropped = task.encode_records([RECORD], tok)
    assert dropped == 0
    enc = QwenPRMFormat(tok).encode(RECORD["question"], RECORD["steps"])
    assert ex["input_ids"] == list(enc.input_ids) and ex["positions"] == list(enc.positions)
    text = tok.decode(ex["input_ids"])
    assert text == "What is 1 + 2 + 3?\n\n(1 + 2) + 3 = 3 + 3.<extra_0>3 + 3 = 6.<extra_0>The answer is \\boxed{6}.<extra_0>"
    batch = task.collate([ex], tok)
    labels = batch["step_labels"][0]
    assert labels[ex["positions"]].tolist() == RECORD["soft"]
    assert (labels >= 0).sum() == 3
    hard = PRMTask(PRMTrainConfig(data="unused.jsonl", labels="hard")).encode_records([RECORD], tok)[0][0]
    assert hard["labels"] == [1.0, 1.0, 1.0]


def test_token_labels_mark_the_slip_and_everything_after_it():
    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel
    from app.toy.models import prm_config
    from app.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    slip = dict(RECORD, steps=["(1 + 2) + 3 = 3 + 4.\n\n", "3 + 4 = 7.\n\n", "The answer is \\boxed{7}."], hard=[0, 0, 0])
    task = PRMTask(PRMTrainConfig(data="unused.jsonl", labels="hard", token_labels=0.5))
    (right, wrong), _ = task.encode_records([RECORD, slip], tok)
    assert right["token_labels"] == [1.0] * len(right["token_positions"])
    text = "".join(tok.decode([wrong["input_ids"][p]]) + ("" if y else "*")
                   for p, y in zip(wrong["token_positions"], wrong["token_labels"]))
    assert text == "(1 + 2) + 3 = 3 + 4*.*" + "".join(c + "*" for c in "3 + 4 = 7.The answer is \\boxed{7}.")
    assert not set(wrong["token_positions"]) & set(wrong["positions"])  # tags keep their step label
    batch = task.collate([right, wrong], tok)
    assert (batch["token_labels"] >= 0).sum() == len(right["token_positions"]) + len(wrong["token_positions"])
    torch.manual_seed(0)
    model = Qwen2ForProcessRewardModel(prm_config(tok, "tiny"))
    tags_only = model(**{k: v for k, v in batch.items() if k != "token_labels"}).loss
    assert task.loss(model, dict(batch)) > tags_only  # the token term is added, with its weight
    with pytest.raises(Exception, match="token_labels"):
        task.encode_records([dict(RECORD, question="Compute 1 + 2 + 3.")], tok)


def test_token_labels_bad_input_fails_before_ray(tmp_path):
    import json

    from app.config import ConfigError
    from train.prm import check

    with pytest.raises(ValueError, match="token_labels: only format qwen"):
        PRMTrainConfig(data="unused.jsonl", format="math-shepherd", model="x", token_labels=1.0)
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps(dict(RECORD, question="Natalia sold clips to 48 of her friends...")) + "\n")
    with pytest.raises(ConfigError, match="not toy data"):
        check(PRMTrainConfig(data=str(data), model="toy:prm", token_labels=1.0))
    data.write_text(json.dumps(RECORD) + "\n")
    check(PRMTrainConfig(data=str(data), model="toy:prm", token_labels=1.0))


def test_math_shepherd_loss_reads_the_tag_position():
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.prm_formats import MathShepherdFormat
    from app.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    tok.add_tokens(["ки"])
    fmt = MathShepherdFormat(tok)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=1,
                                         num_attention_heads=1, num_key_value_heads=1, head_dim=64,
                                         intermediate_size=64))
    task = PRMTask(PRMTrainConfig(data="unused.jsonl", format="math-shepherd", model="unused"))
    task._ids = fmt.label_ids
    (ex,), _ = task.encode_records([RECORD], tok)
    assert [ex["input_ids"][p] for p in ex["positions"]] == [fmt.step_tag_id] * 3
    batch = task.collate([ex], tok)
    loss = math_shepherd_loss(model, batch, fmt.label_ids)
    logits = model(input_ids=batch["input_ids"]).logits[0]
    good, bad = fmt.label_ids
    manual = 0.0
    for pos, p in zip(ex["positions"], RECORD["soft"]):
        logp = logits[pos, [good, bad]].log_softmax(-1)
        manual += -(p * logp[0] + (1 - p) * logp[1])
    assert loss.item() == pytest.approx(manual.item() / 3, rel=1e-5)
    # not one position off (OpenR's training script reads the logits before the tag)
    shifted = sum(-(p * logits[pos - 1, [good, bad]].log_softmax(-1)[0]
                    + (1 - p) * logits[pos - 1, [good, bad]].log_softmax(-1)[1])
                  for pos, p in zip(ex["positions"], RECORD["soft"])) / 3
    assert abs(loss.item() - shifted.item()) > 1e-4


def test_train_recipe_paths_become_absolute(tmp_path, monkeypatch):
    """Ray Train workers do not run in the driver's directory: relative data paths must reach them absolute."""
    from jobs.train import load

    (tmp_path / "labels.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load("toy/prm", ["data=labels.jsonl", "eval_data=null", "output=out/prm"])
    assert cfg.data == str(tmp_path / "labels.jsonl")
    assert cfg.output == str(tmp_path / "out" / "prm")
    assert cfg.init_from == "toy:policy" and cfg.model == "new:toy-tiny"  # names, not paths: untouched


def test_prm_from_policy_with_extra_layers_starts_as_the_policy_body():
    """The identity-initialised layers on top leave the policy's function unchanged at the start."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.toy import resolve_model
    from actors.engines.base import load_tokenizer
    from train.prm import prm_from_causal_lm

    path = resolve_model("toy:policy")
    tok = load_tokenizer(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prm = prm_from_causal_lm(path, tok, extra_layers=2).eval()
    assert prm.config.num_hidden_layers == policy.config.num_hidden_layers + 2
    ids = torch.tensor([tok("Question: What is 3 + 4?\n\nAnswer:\n\n(3 + 4) = 7.")["input_ids"]])
    with torch.no_grad():
        a = policy.model(input_ids=ids).last_hidden_state
        b = prm.model(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)


class RayStarted(Exception):
    pass


@pytest.fixture
def no_ray(monkeypatch):
    """jobs.train with Ray's start replaced by an exception: whatever gets that far passed the checks."""
    import jobs.train

    monkeypatch.setattr(jobs.train, "init_ray", lambda *a, **k: (_ for _ in ()).throw(RayStarted()))


def test_a_record_without_the_label_field_fails_before_ray(tmp_path, no_ray, capsys):
    """A record without `soft` (the recipe's labels) was a KeyError inside a Ray Train worker: now the job exits 2
    with one line naming the file, the line and the field, before Ray starts."""
    import json

    from jobs.train import main

    hard_only = {k: v for k, v in RECORD.items() if k != "soft"}
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in (RECORD, RECORD, hard_only, RECORD)))
    args = ["--config", "toy/prm", f"data={data}", "eval_data=null", f"output={tmp_path / 'out'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert str(data) in err and "line 3" in err and "'soft'" in err, err
    # labels: hard reads a field every record has: the checks pass (and the job goes on to start Ray)
    with pytest.raises(RayStarted):
        main(args + ["labels=hard"])
    # the held-out file is checked the same way
    data.write_text(json.dumps(RECORD) + "\n")
    held = tmp_path / "held.jsonl"
    held.write_text(json.dumps(RECORD) + "\n\n" + json.dumps({"question": "q", "soft": [1.0]}) + "\n")
    assert main(args[:-2] + [f"eval_data={held}", f"output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(held) in err and "line 3" in err and "'steps'" in err, err
    # a label field that is not a list of labels
    data.write_text(json.dumps(dict(RECORD, soft=0.5)) + "\n")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 1" in err and "'soft' is a float, not a list" in err, err


def test_sft_records_are_checked_before_ray(tmp_path, no_ray, capsys):
    import json

    from jobs.train import main

    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n" + json.dumps({"prompt": "2+2="}) + "\n")
    assert main(["--config", "toy/sft", f"data={data}", f"output={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(data) in err and "line 2" in err and "'completion'" in err, err


# --- LPR's value model (format lpr): layout, loss, score ------------------------------------------------------------

STATE = {"question": "What is 1 + 2 + 3?", "steps": ["(1 + 2) + 3 = 3 + 3.\n\n", "3 + 3 = 6.\n\n"], "value": 2}


def test_lpr_layout_reads_each_prefix_at_its_last_token():
    """A state's tokens are the first tokens of any trajectory that extends it, and the score position of step k
    is the last token of step k: one causal forward scores every prefix as that prefix alone would be."""
    from actors.prm_formats import LPRFormat, PRMInputError
    from app.toy.tokenizer import build_tokenizer

    tok = build_tokenizer()
    fmt = LPRFormat(tok)
    full = fmt.encode(RECORD["question"], RECORD["steps"])
    assert len(full.positions) == 3 and full.positions[-1] == len(full.input_ids) - 1
    for k in (1, 2):
        part = fmt.encode(RECORD["question"], RECORD["steps"][:k])
        assert full.input_ids[: len(part.input_ids)] == part.input_ids
        assert full.positions[k - 1] == len(part.input_ids) - 1
    assert tok.decode(list(full.input_ids)).endswith("What is 1 + 2 + 3?\n\n(1 + 2) + 3 = 3 + 3.\n\n3 + 3 = 6.\n\n"
                                                    "The answer is \\boxed{6}.")
    with pytest.raises(PRMInputError, match="trajectory 4"):
        fmt.encode("q", ["a\n\n", ""], index=4)  # an empty step has no token to read


def test_lpr_training_is_cross_entropy_on_the_value_at_the_last_token():
    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel
    from actors.prm_formats import fold_value_head
    from app.toy.models import prm_config
    from app.toy.tokenizer import build_tokenizer
    from train.prm import value_loss

    tok = build_tokenizer()
    task = PRMTask(PRMTrainConfig(data="unused.jsonl", format="lpr"))
    bad = [dict(STATE, value=4), dict(STATE, value=None), {k: v for k, v in STATE.items() if k != "value"}]
    examples, dropped = task.encode_records([STATE, dict(STATE, steps=RECORD["steps"], value=0)] + bad, tok)
    assert dropped == 3 and len(examples) == 2
    ex = examples[0]
    assert ex["positions"] == [len(ex["input_ids"]) - 1] and ex["labels"] == [2.0] and ex["hard"] == [1]
    batch = task.collate(examples, tok)
    conf = prm_config(tok, "tiny")
    conf.num_labels = 4
    torch.manual_seed(0)
    model = Qwen2ForProcessRewardModel(conf).eval()
    loss = task.loss(model, dict(batch))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual = sum(-logits[r, e["positions"][0]].log_softmax(-1)[int(e["labels"][0])] for r, e in enumerate(examples)) / 2
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5) == value_loss(model, batch).item()
    (p_state,), (p_full,) = task.scores(model, tok, examples)
    probs = logits[0, ex["positions"][0]].softmax(-1)
    assert p_state == pytest.approx(probs[2:].sum().item(), rel=1e-5)           # P(v >= 2)
    # the actor's engine reads P(good) from two columns: the folded head gives exactly P(v >= 2)
    fold_value_head(model, (2, 3))
    hidden = model.model(input_ids=batch["input_ids"][:1]).last_hidden_state[0, ex["positions"][0]]
    assert model.score(hidden).softmax(-1)[1].item() == pytest.approx(p_state, rel=1e-5)


def test_lpr_data_is_checked_before_ray(tmp_path, no_ray, capsys):
    import json

    from jobs.train import main

    data = tmp_path / "states.jsonl"
    data.write_text(json.dumps(STATE) + "\n" + json.dumps(dict(STATE, value=5)) + "\n")
    args = ["--config", "toy/prm", "format=lpr", f"data={data}", "eval_data=null", f"output={tmp_path / 'out'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(data) in err and "line 2" in err and "'value'" in err, err
    data.write_text(json.dumps(STATE) + "\n")
    with pytest.raises(RayStarted):
        main(args)
