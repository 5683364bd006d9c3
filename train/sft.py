"""Supervised fine-tuning of a causal LM on prompt/completion pairs, on Ray Train + DeepSpeed (`train.loop`).

Data: JSONL records `{"prompt": ..., "completion": ...}` (TRL's prompt-completion layout), or `toy:train`, the
toy world's generated solutions (`app.toy.world.sft_examples`). Each example is prompt + completion + EOS;
the loss is on the completion tokens and EOS only (the prompt is masked with -100), as TRL's
`completion_only_loss`. Examples longer than `max_length` are dropped (cutting them would teach the model to
stop mid-solution).

Model: a Hub name or path, `toy:policy` (the shipped toy policy, to continue training), or `new:toy-SIZE`
(a freshly initialised toy Qwen2 causal LM of `app.toy.models.SIZES`, with the toy character tokenizer).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.config import Config
from train.loop import TrainConfig, TrainTask, fit_and_export
from train.records import check_records, read_jsonl  # noqa: F401 (train.prm and train.synthesize read them here)

FIELDS = {"prompt": str, "completion": str}  # what every SFT record needs


class ToyData(Config):
    """How `data: toy:train` is generated."""

    n_per_level: int = Field(8000, ge=1, description="distinct training problems per level")
    levels: list[int] = [1, 2, 3, 4, 5]
    orders_per_problem: int = Field(1, ge=1, description="solutions per problem, each in a random order")
    level_weights: dict[int, float] = Field(default_factory=dict, description="scale n_per_level per level")
    seed: int = 0


class SFTConfig(Config):
    job: Literal["sft"] = "sft"
    model: str = Field("new:toy-tiny", description="Hub name, path, toy:policy, or new:toy-SIZE (fresh toy model)")
    data: str = Field("toy:train", description="JSONL of prompt/completion records, or toy:train")
    toy: ToyData = Field(default_factory=ToyData)
    max_length: int = Field(512, ge=8)
    eval_toy_per_level: int = Field(0, ge=0, description="greedy accuracy on this many toy test problems per level, each epoch")
    output: str | None = Field(None, description="also write the final model here (save_dtype weights, float32 config)")
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="sft", lr=3e-3, micro_batch_size=32))


def load_tokenizer_for(model: str):
    """The tokenizer of a model spec (see module doc)."""
    if model.startswith("new:toy-"):
        from app.toy.tokenizer import build_tokenizer

        return build_tokenizer()
    from actors.engines.base import load_tokenizer
    from app.toy import resolve_model

    return load_tokenizer(resolve_model(model))


class SFTTask(TrainTask):
    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg

    def build_tokenizer(self):
        return load_tokenizer_for(self.cfg.model)

    def build_model(self):
        import torch
        from transformers import AutoModelForCausalLM

        model = self.cfg.model
        if model.startswith("new:toy-"):
            from app.toy.models import policy_config

            return AutoModelForCausalLM.from_config(policy_config(self.build_tokenizer(), model[len("new:toy-"):]))
        from app.toy import resolve_model

        return AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch.float32)

    def records(self) -> list[dict]:
        if self.cfg.data == "toy:train":
            from app.toy.world import sft_examples

            t = self.cfg.toy
            return sft_examples(t.n_per_level, levels=t.levels, seed=t.seed, orders_per_problem=t.orders_per_problem,
                                weights=t.level_weights or None)
        return read_jsonl(self.cfg.data, FIELDS, key="data")

    def source(self) -> str | None:
        return None if self.cfg.data == "toy:train" else self.cfg.data

    def record_spec(self) -> dict:
        return {"required": FIELDS}

    def load_examples(self, tokenizer) -> list[dict]:
        return self.examples_of(self.records(), tokenizer)

    def examples_of(self, recs, tokenizer) -> list[dict]:
        prompts = tokenizer([r["prompt"] for r in recs], add_special_tokens=True)["input_ids"]
        comps = tokenizer([r["completion"] for r in recs], add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        out = []
        for p, c in zip(prompts, comps):
            ids = list(p) + list(c) + [eos]
            if len(ids) > self.cfg.max_length:
                continue
            out.append({"input_ids": ids, "n_prompt": len(p)})
        return out

    def collate(self, examples, tokenizer):
        import torch

        T = max(len(e["input_ids"]) for e in examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(examples), T), pad, dtype=torch.long)
        labels = torch.full((len(examples), T), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        for r, e in enumerate(examples):
            x = torch.tensor(e["input_ids"], dtype=torch.long)
            ids[r, : len(x)] = x
            mask[r, : len(x)] = 1
            labels[r, e["n_prompt"]: len(x)] = x[e["n_prompt"]:]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model, batch):
        return model(**batch, use_cache=False).loss

    def evaluate(self, model, tokenizer) -> dict:
        n = self.cfg.eval_toy_per_level
        if not n or self.cfg.train.zero_stage == 3:
            return {}
        return toy_greedy_accuracy(model, tokenizer, n)


def toy_greedy_accuracy(model, tokenizer, n_per_level: int, levels=(1, 2, 3, 4, 5), max_new_tokens: int = 320) -> dict:
    """Greedy accuracy per level on the first `n_per_level` toy test problems (a quick in-training check)."""
    import torch

    from app.grading import extract_answer
    from app.toy.world import toy_problems, toy_prompt

    probs = toy_problems("test", n_per_level, levels=levels)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer([toy_prompt(p) for p in probs], return_tensors="pt", padding=True, add_special_tokens=True)
        enc = {k: v.to(next(model.parameters()).device) for k, v in enc.items()}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    res: dict = {}
    for p, t in zip(probs, texts):
        res.setdefault(p.level, []).append(extract_answer(t) == p.answer)
    return {f"greedy_L{k}": sum(v) / len(v) for k, v in res.items()}


def check(cfg: SFTConfig) -> None:
    """What can be checked without Ray: the data file (every record has a prompt and a completion) and the model
    exist."""
    if cfg.data != "toy:train":
        from train.ingest import check_data

        check_data(cfg.data, {"required": FIELDS}, cfg.train.ingest)
    if not cfg.model.startswith("new:toy-"):
        from actors.replicas import check_model

        check_model(cfg.model)


def train(cfg: SFTConfig):
    """Run SFT; returns (Ray Train result, path of the exported model: `output` if given, else the checkpoint's)."""
    check(cfg)
    return fit_and_export(SFTTask(cfg), cfg.train, "sft", cfg.output, cfg.save_dtype)
