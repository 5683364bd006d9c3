"""DPO and step-DPO on Ray Train + DeepSpeed (`train.loop`), from preference pairs (`train.synthesize.pairs`).

Loss (Rafailov et al.; LPR and Step-DPO use it as is): for a pair (x, y_w, y_l) with response log-probs summed over
the response tokens, under the policy pi and a frozen reference pi_ref (the starting model),

    loss = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))

(TRL's `sigmoid` loss type, without label smoothing), plus `sft_weight` x the chosen response's mean token NLL
(TRL's `rpo_alpha`; 0 by default, as the papers). Reported per step: the loss, `reward_margin` (the mean of
beta x the difference above), `reward_accuracy` (the share of pairs whose margin is positive), `chosen_reward`
and `rejected_reward`.

- `dpo`: pairs of whole responses (kinds `outcome` and `prm`): the response ends with EOS, as TRL's DPOTrainer
  appends it.
- `step-dpo`: pairs of single steps (kind `step`): x = the question's prompt + the shared `prefix` (the right
  steps before the first bad one), y_w / y_l = one step each, and NO EOS after either (TRL's DPOTrainer would append
  one, teaching the model to stop after a step; that is why ponder does not run it). A record's own `eos` field
  (true/false) overrides the kind.

Tokenization follows TRL's for plain text: the context and context + response are tokenized whole and the response
starts where the two diverge (`trl.data_utils.common_prefix_length`, the shorter of the chosen's and the
rejected's), so a tokenizer that merges across the boundary is handled. Pairs longer than `max_length` (context
+ the longer response) are dropped, with a count.

The reference: its log-probs are computed once, before the first step, by the DeepSpeed engine that still holds
the starting weights (`TrainTask.prepare`: the examples split over the workers, gathered with one all-reduce),
as TRL's `precompute_ref_logps`: no second model in memory, exact under every ZeRO stage, and the same dtype as
the policy (bf16 on GPU). A resumed run recomputes them before it loads its checkpoint. Dropout is turned off in
the policy (TRL's `disable_dropout`), so the policy and its reference agree at step 0 (the loss starts at log 2).

Data: JSONL, one pair per line: `prompt`, `chosen`, `rejected` (strings), optional `prefix` (string), `kind`
(`outcome`, `prm`, `step`), `eos` (bool). `kinds` picks which kinds to train on.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from app.config import Config, ConfigError
from train.loop import TrainConfig, TrainTask, fit_and_export
from train.records import iter_jsonl, read_jsonl
from train.sft import load_tokenizer_for

PAIR_KINDS = ("outcome", "prm", "step")
# what every pair needs, and the types of the keys it may have (train.records checks them)
PAIR_FIELDS = {"prompt": str, "chosen": str, "rejected": str}
PAIR_OPTIONAL = {"prefix": str, "eos": bool, "kind": str}


class DPOConfig(Config):
    """A `job: dpo` or `job: step-dpo` recipe. Defaults: LPR's DPO (beta 0.1, lr 2e-6, reference = the SFT policy);
    Step-DPO's are beta 0.05-0.5, lr 5e-7, cosine, 2 epochs (configs/qwen2.5-math-7b/step_dpo.yaml)."""

    job: Literal["dpo", "step-dpo"] = "dpo"
    model: str = Field("toy:policy", description="the policy to improve, also the frozen reference: a Hub name, a "
                       "path or toy:policy (LPR and Step-DPO start from the SFT model)")
    data: str = Field(..., description="pairs JSONL (train.synthesize.pairs): prompt, chosen, rejected[, prefix, "
                      "kind, eos]")
    kinds: list[Literal["outcome", "prm", "step"]] | None = Field(
        None, description="train on pairs of these kinds (records without `kind` always count); default: outcome "
        "and prm for dpo, step for step-dpo")
    beta: float = Field(0.1, gt=0, description="DPO temperature (LPR 0.1; Step-DPO 0.05-0.5)")
    sft_weight: float = Field(0.0, ge=0, description="weight of the chosen response's mean token NLL added to the "
                              "loss (TRL's rpo_alpha; 0 = plain DPO, as LPR and Step-DPO)")
    max_length: int = Field(1024, ge=8, description="drop pairs whose context + longer response is longer (tokens)")
    eval_toy_per_level: int = Field(0, ge=0, description="greedy accuracy on this many toy test problems per "
                                    "level after each epoch (rank 0; not under ZeRO-3)")
    output: str | None = Field(None, description="also write the final model here (save_dtype weights, float32 "
                               "config)")
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="dpo", lr=2e-6, micro_batch_size=8,
                                                                   warmup_steps=10))

    @model_validator(mode="after")
    def _default_kinds(self):
        if self.kinds is None:
            self.__dict__["kinds"] = ["step"] if self.job == "step-dpo" else ["outcome", "prm"]
        if self.job == "step-dpo" and set(self.kinds) - {"step"}:
            raise ValueError(f"kinds: step-dpo trains on step pairs only, not {sorted(set(self.kinds) - {'step'})}; "
                             "use job: dpo for whole responses")
        return self


# --- the loss (pure functions: tested against a hand computation) ---------------------------------------------

def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta: float):
    """Per-pair sigmoid DPO loss and the implicit rewards beta * (log pi - log pi_ref) of each side."""
    import torch.nn.functional as F

    chosen_rewards = beta * (chosen_logps - ref_chosen_logps)
    rejected_rewards = beta * (rejected_logps - ref_rejected_logps)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
    return losses, chosen_rewards, rejected_rewards


def response_logps(logits, input_ids, response_mask):
    """Sum over response tokens of log p(token | everything before it): (batch,) from (batch, T, V) logits.

    The token at position t is predicted by the logits at t - 1; `response_mask[:, t]` says whether token t is a
    response token. Uses TRL's `selective_log_softmax` (log-softmax and gather without the full (B, T, V) copy)."""
    from trl.trainer.utils import selective_log_softmax

    per_token = selective_log_softmax(logits[:, :-1].float(), input_ids[:, 1:])
    mask = response_mask[:, 1:].to(per_token.dtype)
    return (per_token * mask).sum(-1), mask.sum(-1)


def disable_dropout(model) -> None:
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


# --- data -----------------------------------------------------------------------------------------------------

def wants_eos(rec: dict) -> bool:
    """EOS after the response: whole responses yes, steps (and partial states) no; a record's `eos` wins."""
    if "eos" in rec:
        return bool(rec["eos"])
    return rec.get("kind") != "step"


def encode_pair(rec: dict, tokenizer) -> dict:
    """Token ids of one pair: `chosen_ids` / `rejected_ids` (context + response [+ EOS]) and `n_prompt`, the
    context's length (shared by both)."""
    from trl.data_utils import common_prefix_length

    context = rec["prompt"] + rec.get("prefix", "")
    ctx = tokenizer(context, add_special_tokens=True)["input_ids"]
    ids = {side: list(tokenizer(context + rec[side], add_special_tokens=True)["input_ids"])
           for side in ("chosen", "rejected")}
    n_prompt = min(common_prefix_length(ctx, ids["chosen"]), common_prefix_length(ctx, ids["rejected"]))
    if wants_eos(rec):
        for side in ids:
            ids[side].append(tokenizer.eos_token_id)
    return {"chosen_ids": ids["chosen"], "rejected_ids": ids["rejected"], "n_prompt": n_prompt}


def read_pairs(path: str | Path, kinds) -> list[dict]:
    return [r for r in read_jsonl(path, key="data") if r.get("kind") is None or r["kind"] in kinds]


class DPOTask(TrainTask):
    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg

    def build_tokenizer(self):
        return load_tokenizer_for(self.cfg.model)

    def build_model(self):
        import torch
        from transformers import AutoModelForCausalLM

        from app.toy import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(self.cfg.model), dtype=torch.float32)
        disable_dropout(model)
        return model

    def encode(self, records: list[dict], tokenizer) -> tuple[list[dict], int]:
        out, dropped = [], 0
        for r in records:
            ex = encode_pair(r, tokenizer)
            length = max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
            if length > self.cfg.max_length or ex["n_prompt"] >= min(len(ex["chosen_ids"]), len(ex["rejected_ids"])):
                dropped += 1
                continue
            ex["input_ids"] = ex["chosen_ids"]
            ex["length"] = length
            out.append(ex)
        return out, dropped

    def load_examples(self, tokenizer) -> list[dict]:
        examples, dropped = self.encode(read_pairs(self.cfg.data, self.cfg.kinds), tokenizer)
        if dropped:
            print(f"{self.cfg.job}: dropped {dropped} pairs longer than max_length={self.cfg.max_length} or empty")
        return examples

    def source(self) -> str | None:
        return self.cfg.data

    def record_spec(self) -> dict:
        return {"required": PAIR_FIELDS, "optional": PAIR_OPTIONAL, "choices": {"kind": PAIR_KINDS},
                "why": " (every pair needs one)"}

    def examples_of(self, records, tokenizer) -> list[dict]:
        kinds = self.cfg.kinds
        return self.encode([r for r in records if r.get("kind") is None or r["kind"] in kinds], tokenizer)[0]

    def collate(self, examples, tokenizer):
        """Rows 0..B-1 are the chosen responses, B..2B-1 the rejected ones (one forward for both, as TRL)."""
        import torch

        rows = [e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
        starts = [e["n_prompt"] for e in examples] * 2
        T = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        resp = torch.zeros((len(rows), T), dtype=torch.long)
        for i, (r, s) in enumerate(zip(rows, starts)):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
            resp[i, s: len(r)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "response_mask": resp}
        if all("ref" in e for e in examples):
            batch["ref"] = torch.tensor([e["ref"] for e in examples], dtype=torch.float32)
        return batch

    def sequence_logps(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        logps, n_tokens = response_logps(logits, batch["input_ids"], batch["response_mask"])
        return logps, n_tokens

    def loss(self, model, batch):
        logps, n_tokens = self.sequence_logps(model, batch)
        chosen, rejected = logps.chunk(2)
        ref = batch["ref"].to(logps.dtype)
        losses, cr, rr = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], self.cfg.beta)
        loss = losses.mean()
        if self.cfg.sft_weight:
            loss = loss + self.cfg.sft_weight * (-chosen / n_tokens.chunk(2)[0].clamp(min=1)).mean()
        margin = (cr - rr).detach()
        return loss, {"reward_margin": float(margin.mean()), "reward_accuracy": float((margin > 0).float().mean()),
                      "chosen_reward": float(cr.detach().mean()), "rejected_reward": float(rr.detach().mean())}

    def prepare(self, engine, examples, tokenizer, rank, world):
        """The frozen reference's log-probs of every pair, by the engine before any update (module docstring).
        All examples on every rank (a list): the ranks share the batches and sum the results; a rank's own shard
        (Ray Data ingest, a dict): each rank scores its own rows."""
        import torch

        sharded = isinstance(examples, dict)
        items = list(examples.values()) if sharded else examples
        order = sorted(range(len(items)), key=lambda i: items[i]["length"])
        bs = self.cfg.train.micro_batch_size
        batches = [order[i:i + bs] for i in range(0, len(order), bs)]
        if sharded:
            mine = batches
            rounds = torch.tensor([len(batches)])
            if world > 1:
                torch.distributed.all_reduce(rounds, op=torch.distributed.ReduceOp.MAX)
            rounds = int(rounds)
        else:
            mine = batches[rank::world]
            rounds = -(-len(batches) // world)
        ref = torch.zeros((len(items), 2), dtype=torch.float64, device=engine.device)
        engine.eval()
        with torch.no_grad():
            for r in range(rounds):
                idx = mine[r] if r < len(mine) else batches[0]  # ZeRO-3: every rank runs the same forwards
                batch = self.collate([items[i] for i in idx], tokenizer)
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                logps, _ = self.sequence_logps(engine, batch)
                if r < len(mine):
                    ref[idx] = torch.stack(logps.chunk(2), dim=-1).to(ref.dtype)
        engine.train()
        if world > 1 and not sharded:
            torch.distributed.all_reduce(ref)
        for e, row in zip(items, ref.tolist()):
            e["ref"] = row

    def evaluate(self, model, tokenizer) -> dict:
        n = self.cfg.eval_toy_per_level
        if not n or self.cfg.train.zero_stage == 3:
            return {}
        from train.sft import toy_greedy_accuracy

        return toy_greedy_accuracy(model, tokenizer, n)


def check(cfg: DPOConfig) -> None:
    """What can be checked without Ray, in well under a second: the pairs file exists and every record has
    `prompt`, `chosen` and `rejected` strings (a string `prefix`, a known `kind` and a boolean `eos` where given),
    else one line naming the file, the line and the field; some pair is of the trained kinds; the model exists."""
    from train.ingest import check_data

    if not check_data(cfg.data, {}, cfg.train.ingest):  # Parquet, a folder, a URI: checked as Ray Data reads it
        from actors.replicas import check_model

        return check_model(cfg.model)
    kinds_seen: dict[str, int] = {}
    for rec in iter_jsonl(cfg.data, PAIR_FIELDS, PAIR_OPTIONAL, {"kind": PAIR_KINDS}, " (every pair needs one)",
                          key="data"):
        kinds_seen[rec.get("kind")] = kinds_seen.get(rec.get("kind"), 0) + 1
    usable = sum(c for k, c in kinds_seen.items() if k is None or k in cfg.kinds)
    if not usable:
        raise ConfigError(f"data: {cfg.data} holds no pairs of kinds {cfg.kinds} (it has "
                          f"{', '.join(f'{c} {k}' for k, c in kinds_seen.items()) or 'none'}); set kinds")
    from actors.replicas import check_model

    check_model(cfg.model)


def train(cfg: DPOConfig):
    """Run DPO or step-DPO; returns (Ray Train result, path of the exported model)."""
    check(cfg)
    return fit_and_export(DPOTask(cfg), cfg.train, cfg.job, cfg.output, cfg.save_dtype)
