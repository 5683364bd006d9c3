"""PRM training on Ray Train + DeepSpeed, from Monte-Carlo step labels (`train.synthesize.mc_labels`, OmegaPRM's
`train.synthesize.omega`) or LPR's valued states (`train.synthesize.states`).

Three formats, each laid out exactly as `actors.prm` lays it out at inference (the same format classes encode
the training text, so training and scoring can never drift apart):

- `qwen` (ponder's own PRM, the Qwen2.5-Math-PRM layout): `actors.engines.qwen2_prm.Qwen2ForProcessRewardModel`, a
  two-label head read at each `<extra_0>` step tag; the label p of a step (soft: the fraction of completions
  that reached the right answer; hard: 1 if any did) is trained with cross-entropy against (1 - p, p)
  (`soft_label_loss`). The model is new (`new:toy-SIZE`), an existing PRM checkpoint, or - with `init_from` -
  a causal LM whose body (all `model.*` weights) starts the PRM; the toy build starts the PRM from the toy
  policy, which already reads the arithmetic.
- `math-shepherd`: a causal LM; at each step tag ("ки") the logits of '+' and '-' are read AT the tag position
  (where inference reads them; OpenR's training script is one position off: docs/algorithms.md), and trained with
  cross-entropy against (p, 1 - p) over the pair.
- `lpr` (LPR's value model): ponder's Qwen2 PRM class with a 4-way head (`num_labels` 4), read at the last token
  of question + state (`actors.prm_formats.LPRFormat`); cross-entropy against the state's value v (how many of 3
  completions ended right, 0..3). At inference a step's score is P(v >= 2) of the prefix ending there.

Data: JSONL. `qwen` / `math-shepherd`: one record per trajectory: `question`, `steps` (as the policy wrote them,
each ending in the step delimiter but the last), `soft` and `hard` (one label per step; null for a step without a
label, as OmegaPRM leaves the steps no search ended at: no loss there). `lpr`: one record per state or full
trajectory: `question`, `steps`, `value`. Records whose steps cannot be laid out (a step containing the tag) are
dropped with a count.

`token_labels` (qwen, toy questions only) adds a second loss, with that weight, on every token inside a step:
1 while the text can still become a right step, 0 from the character where the toy checker finds the slip
(`app.toy.checker.first_wrong_chars`). Measured on held-out sibling steps (a right and a wrong continuation of
one prefix), two epochs of it on the shipped PRM's data, from the shipped PRM, lift the share of pairs it orders
right from 0.77 to 0.82; three epochs from the policy's body end at 0.77, as tags alone do. Beam search's accuracy
on a validation set did not move with it (see the README's toy section), so the shipped build does not use it.

Each epoch (rank 0) the step-level ROC AUC on `eval_data` is reported (`eval_auc` against the hard labels,
`eval_auc_soft` against soft > 0.5).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field, model_validator

from app.config import Config, ConfigError
from train.loop import TrainConfig, TrainTask, fit_and_export
from train.sft import read_jsonl


class PRMTrainConfig(Config):
    job: Literal["prm"] = "prm"
    format: Literal["qwen", "math-shepherd", "lpr"] = "qwen"
    model: str = Field("new:toy-tiny", description="new:toy-SIZE, a PRM checkpoint (qwen) or a causal LM (math-shepherd)")
    init_from: str | None = Field(None, description="qwen: start the PRM body from this causal LM (path or toy:policy)")
    extra_layers: int = Field(0, ge=0, description="with init_from: new layers on top of the LM's body, starting as "
                              "the identity")
    data: str = Field(..., description="MC-label JSONL (train.synthesize.mc_labels / omega); lpr: states JSONL "
                      "(train.synthesize.states)")
    eval_data: str | None = Field(None, description="held-out data of the same kind for the per-epoch step AUC")
    labels: Literal["soft", "hard"] = "soft"
    token_labels: float = Field(0.0, ge=0, description="qwen, toy questions only: weight of a second loss on every "
                                "token of the steps, labelled by the toy checker (1 while the text can still become "
                                "a right step, 0 from the slip on); 0 trains on the step tags alone")
    max_length: int = Field(1024, ge=8)
    step_delimiter: str = "\n\n"
    output: str | None = None
    save_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="prm", lr=1e-3, micro_batch_size=32))

    @model_validator(mode="after")
    def _token_labels_need_a_label_head(self):
        if self.token_labels > 0 and self.format != "qwen":
            raise ValueError(f"token_labels: only format qwen has a label head at every token (got {self.format}); "
                             "set token_labels: 0")
        return self


def auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """ROC AUC (Mann-Whitney U with tied scores counted half); nan when one class is missing."""
    pairs = sorted(zip(scores, labels))
    pos = sum(1 for _, y in pairs if y)
    neg = len(pairs) - pos
    if not pos or not neg:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2  # ranks i+1 .. j
        rank_sum += avg_rank * sum(1 for k in range(i, j) if pairs[k][1])
        i = j
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def _tokenizer(spec: str):
    from train.sft import load_tokenizer_for

    return load_tokenizer_for(spec)


class PRMTask(TrainTask):
    def __init__(self, cfg: PRMTrainConfig):
        self.cfg = cfg

    def build_tokenizer(self):
        return _tokenizer(self.cfg.init_from or self.cfg.model)

    def fmt(self, tokenizer):
        from actors.prm_formats import make_format

        return make_format(self.cfg.format, tokenizer, self.cfg.step_delimiter)

    def build_model(self):
        import torch

        from app.toy import resolve_model

        cfg = self.cfg
        if cfg.format == "math-shepherd":
            from transformers import AutoModelForCausalLM

            if cfg.model.startswith("new:toy-"):
                raise ConfigError("a math-shepherd PRM fine-tunes a causal LM: give model: a path or toy:policy")
            model = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.model), dtype=torch.float32)
            tok = self.build_tokenizer()
            if model.get_input_embeddings().num_embeddings < len(tok):
                model.resize_token_embeddings(len(tok))
            return model
        from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel

        labels = LPR_VALUES if cfg.format == "lpr" else 2
        if cfg.init_from:
            return prm_from_causal_lm(resolve_model(cfg.init_from), self.build_tokenizer(), cfg.extra_layers, labels)
        if cfg.model.startswith("new:toy-"):
            from app.toy.models import prm_config

            conf = prm_config(self.build_tokenizer(), cfg.model[len("new:toy-"):])
            conf.num_labels = labels
            return Qwen2ForProcessRewardModel(conf)
        if labels != 2:  # a 2-label PRM checkpoint starts an LPR value model: its head's last layer starts anew
            return Qwen2ForProcessRewardModel.from_pretrained(resolve_model(cfg.model), dtype=torch.float32,
                                                              num_labels=labels, ignore_mismatched_sizes=True)
        return Qwen2ForProcessRewardModel.from_pretrained(resolve_model(cfg.model), dtype=torch.float32)

    def encode_records(self, records: list[dict], tokenizer) -> tuple[list[dict], int]:
        from actors.prm_formats import PRMInputError

        fmt = self.fmt(tokenizer)
        key = self.cfg.labels
        out, dropped = [], 0
        for r in records:
            steps = r["steps"]
            if self.cfg.format == "lpr":  # one label, the state's value, at its last token
                v = r.get("value")
                labels = [v] if isinstance(v, int) and 0 <= v < LPR_VALUES else []
                hard, soft = [int(x >= 2) for x in labels], [x / (LPR_VALUES - 1) for x in labels]
            else:
                labels = r[key]
                hard, soft = r.get("hard", labels), r.get("soft", labels)
            if not steps or not labels or (self.cfg.format != "lpr" and len(labels) != len(steps)):
                dropped += 1
                continue
            try:
                enc = fmt.encode(r["question"], steps)
            except PRMInputError:
                dropped += 1
                continue
            if len(enc.input_ids) > self.cfg.max_length:
                dropped += 1
                continue
            positions = list(enc.positions[-1:]) if self.cfg.format == "lpr" else list(enc.positions)
            ex = {"input_ids": list(enc.input_ids), "positions": positions, "labels": _labels(labels, float),
                  "hard": _labels(hard, int), "soft": _labels(soft, float)}
            if self.cfg.token_labels > 0:
                ex["token_positions"], ex["token_labels"] = token_labels(fmt, r["question"], steps, enc)
            out.append(ex)
        return out, dropped

    def load_examples(self, tokenizer) -> list[dict]:
        examples, dropped = self.encode_records(read_jsonl(self.cfg.data), tokenizer)
        if dropped:
            print(f"prm: dropped {dropped} records that could not be laid out in the {self.cfg.format} format")
        return examples

    def source(self) -> str | None:
        return self.cfg.data

    def record_spec(self) -> dict:
        return record_spec(self.cfg)

    def examples_of(self, records, tokenizer) -> list[dict]:
        return self.encode_records(records, tokenizer)[0]

    def collate(self, examples, tokenizer):
        import torch

        T = max(len(e["input_ids"]) for e in examples)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.full((len(examples), T), pad, dtype=torch.long)
        mask = torch.zeros((len(examples), T), dtype=torch.long)
        step_labels = torch.full((len(examples), T), -1.0)
        for r, e in enumerate(examples):
            ids[r, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[r, : len(e["input_ids"])] = 1
            step_labels[r, e["positions"]] = torch.tensor(e["labels"])
        batch = {"input_ids": ids, "attention_mask": mask, "step_labels": step_labels}
        if all("token_labels" in e for e in examples):
            tokens = torch.full((len(examples), T), -1.0)
            for r, e in enumerate(examples):
                tokens[r, e["token_positions"]] = torch.tensor(e["token_labels"])
            batch["token_labels"] = tokens
        return batch

    def loss(self, model, batch):
        if self.cfg.format == "qwen":
            from actors.engines.qwen2_prm import soft_label_loss

            tokens = batch.pop("token_labels", None)
            out = model(**batch)
            if tokens is None:
                return out.loss
            return out.loss + self.cfg.token_labels * soft_label_loss(out.logits, tokens)
        if self.cfg.format == "lpr":
            return value_loss(model, batch)
        return math_shepherd_loss(model, batch, self._label_ids)

    @property
    def _label_ids(self) -> tuple[int, int]:
        if not hasattr(self, "_ids"):
            self._ids = self.fmt(self.build_tokenizer()).label_ids
        return self._ids

    def scores(self, model, tokenizer, examples: list[dict], batch_size: int = 64) -> list[list[float]]:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                chunk = examples[i:i + batch_size]
                b = self.collate(chunk, tokenizer)
                dev = next(model.parameters()).device
                logits = model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
                for r, e in enumerate(chunk):
                    at = logits[r, e["positions"]].float()
                    if self.cfg.format == "qwen":
                        out.append(at.softmax(-1)[:, 1].tolist())
                    elif self.cfg.format == "lpr":  # P(v >= 2), as the PRM actor scores a step
                        out.append(at.softmax(-1)[:, 2:].sum(-1).tolist())
                    else:
                        out.append(at[:, list(self._label_ids)].softmax(-1)[:, 0].tolist())
        return out

    def evaluate(self, model, tokenizer) -> dict:
        if not self.cfg.eval_data or self.cfg.train.zero_stage == 3:
            return {}
        examples, _ = self.encode_records(read_jsonl(self.cfg.eval_data), tokenizer)
        if not examples:
            return {}
        return step_auc(self.scores(model, tokenizer, examples), examples)


def prm_from_causal_lm(path: str, tokenizer, extra_layers: int = 0, num_labels: int = 2):
    """A Qwen-layout PRM whose body is the body of the causal LM at `path` (Qwen2 or Llama), head new.

    A Llama body maps onto Qwen2's parameter for parameter (same names, RMSNorm, RoPE, SwiGLU); Qwen2 adds
    q/k/v biases, which start at zero, so the PRM's body computes exactly what the policy's does.
    `extra_layers` new decoder layers go on top, their output projections (o_proj, down_proj) zeroed so they
    start as the identity: the PRM still computes the policy's function at first, and the new layers can then
    read the policy's next-token predictions at earlier positions and compare them with what was written
    (a 2-layer body alone cannot, measured on the toy world: slips in sums went unnoticed).
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2Config

    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel

    src = AutoConfig.from_pretrained(path)
    if src.model_type not in ("qwen2", "llama"):
        raise ConfigError(f"init_from: a {src.model_type} model cannot start a Qwen2-layout PRM (qwen2 or llama)")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "max_position_embeddings", "rms_norm_eps", "hidden_act", "pad_token_id",
            "bos_token_id", "eos_token_id", "rope_parameters", "rope_theta", "head_dim")
    kw = {k: getattr(src, k) for k in keys if getattr(src, k, None) is not None}
    n_src = int(kw["num_hidden_layers"])
    kw["num_hidden_layers"] = n_src + int(extra_layers)
    conf = Qwen2Config(**kw, num_labels=num_labels, tie_word_embeddings=False, use_sliding_window=False)
    conf.architectures = ["Qwen2ForProcessRewardModel"]
    conf.step_tag_id = tokenizer.convert_tokens_to_ids("<extra_0>")
    model = Qwen2ForProcessRewardModel(conf)
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {path}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    body = {k: v.float() for k, v in state.items() if k.startswith("model.")}
    new_layers = tuple(f"model.layers.{i}." for i in range(n_src, n_src + int(extra_layers)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            new_bias = name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and name not in body
            new_output = name.startswith(new_layers) and name.endswith(("o_proj.weight", "down_proj.weight"))
            if new_bias or new_output:
                param.zero_()
    missing, unexpected = model.load_state_dict(body, strict=False)
    bad = [k for k in missing if k.startswith("model.") and not k.startswith(new_layers)
           and not k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))]
    if bad or unexpected:
        raise ConfigError(f"init_from {path}: body weights do not match a Qwen2 body (missing {bad[:3]}, unexpected {unexpected[:3]})")
    return model


def token_labels(fmt, question: str, steps: Sequence[str], enc) -> tuple[list[int], list[float]]:
    """Positions and labels of every token inside a step (`app.toy.checker.first_wrong_chars`).

    Why: a step's tag alone tells the PRM that a step went wrong, not where. Beam search asks it to tell apart
    sibling steps that differ in one digit, and the policy's own likelihood does that far better (it compares
    each written token with its prediction). Labelling each token teaches the PRM that comparison at the token
    where the slip is, and the tag reads it from there.
    """
    from app.toy.checker import first_wrong_chars

    try:
        wrong = first_wrong_chars(question, steps)
    except ValueError as e:
        raise ConfigError(f"token_labels: the toy checker cannot read {question!r} ({e}); set token_labels: 0 "
                          "for data that is not from the toy world") from None
    text = fmt.render(question, steps)
    tok = fmt.tokenizer(text, return_offsets_mapping=True, add_special_tokens=not fmt.use_chat)
    if tuple(tok["input_ids"]) != tuple(enc.input_ids):
        raise ConfigError("token_labels: the tokenizer's offsets do not match the PRM's encoding")
    tag_starts, at = [], len(text)
    for _ in steps:  # each stripped step sits right before its tag: find the last len(steps) tags
        at = text.rindex(fmt.STEP_TAG, 0, at)
        tag_starts.insert(0, at)
    spans = [(t - len(fmt.strip(step)), t) for t, step in zip(tag_starts, steps)]
    positions, labels = [], []
    tags = set(enc.positions)
    for k, (a, b) in enumerate(tok["offset_mapping"]):
        if k in tags:
            continue
        for (lo, hi), w in zip(spans, wrong):
            if lo <= a and b <= hi and b > a:
                positions.append(k)
                labels.append(1.0 if w is None or b <= lo + w else 0.0)
                break
    return positions, labels


def step_auc(scores: list[list[float]], examples: list[dict]) -> dict:
    """AUC of the step scores against the hard labels and against soft > 0.5 (steps without a label left out)."""
    rows = [(s, y, p) for row, e in zip(scores, examples) for s, y, p in zip(row, e["hard"], e["soft"]) if y >= 0]
    flat = [s for s, _, _ in rows]
    return {"eval_auc": auc(flat, [y for _, y, _ in rows]), "eval_auc_soft": auc(flat, [int(p > 0.5) for _, _, p in rows]),
            "eval_steps": len(flat)}


def _labels(values, kind) -> list:
    """Labels as numbers, -1 where a step has none (null: no loss there, left out of the AUC)."""
    return [kind(-1) if x is None else kind(x) for x in values]


LPR_VALUES = 4  # LPR: v = 0..3 right completions of 3


def value_loss(model, batch):
    """LPR: cross-entropy of the 4-way head at each state's last token against its value v."""
    import torch.nn.functional as F

    labels = batch["step_labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = labels >= 0
    if not mask.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[mask].float(), labels[mask].long())


def math_shepherd_loss(model, batch, label_ids: tuple[int, int]):
    """CE over the ('+', '-') logits AT each tag position against (p, 1 - p)."""
    import torch
    import torch.nn.functional as F

    labels = batch["step_labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    mask = labels >= 0
    if not mask.any():
        return logits.sum() * 0.0
    pair = logits[mask][:, list(label_ids)].float()
    p = labels[mask].float()
    return F.cross_entropy(pair, torch.stack([p, 1 - p], dim=-1))


def record_spec(cfg: PRMTrainConfig) -> dict:
    """The keys every record needs (`question`, `steps` and the label field of `labels`, or lpr's `value`)."""
    if cfg.format == "lpr":
        return {"required": {"question": str, "steps": list, "value": int},
                "choices": {"value": tuple(range(LPR_VALUES))},
                "why": " (format lpr reads states records: train.synthesize.states)"}
    return {"required": {"question": str, "steps": list, cfg.labels: list},
            "why": f" (labels: {cfg.labels} trains on it)"}


def check(cfg: PRMTrainConfig) -> None:
    """What can be checked without Ray: the data files exist and every record has the fields training reads (a
    missing one would be a KeyError inside a Ray Train worker; Parquet, folders and URIs: as Ray Data reads them),
    and the models exist. `eval_data` is a local JSONL file (rank 0 reads it for the per-epoch AUC)."""
    from train.ingest import check_data

    if cfg.eval_data and not Path(cfg.eval_data).is_file():
        raise FileNotFoundError(f"prm data not found: {cfg.eval_data}")
    local = check_data(cfg.data, record_spec(cfg), cfg.train.ingest)
    if cfg.eval_data:
        check_data(cfg.eval_data, record_spec(cfg), "memory", key="eval_data")
    if cfg.token_labels > 0 and local:
        from app.toy.checker import question_terms

        first = next(iter(read_jsonl(cfg.data)), None)
        try:
            if first is not None:
                question_terms(first["question"])
        except ValueError:
            raise ConfigError(f"token_labels: the toy checker labels the tokens, and {cfg.data} is not toy data "
                              f"({first['question']!r}); set token_labels: 0") from None
    from actors.replicas import check_model

    for m in (cfg.init_from, None if cfg.model.startswith("new:toy-") else cfg.model):
        if m:
            check_model(m)


def train(cfg: PRMTrainConfig):
    """Train the PRM; returns (Ray Train result, path of the exported model)."""
    check(cfg)
    model_class = None
    if cfg.format in ("qwen", "lpr"):
        from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel

        model_class = Qwen2ForProcessRewardModel
    return fit_and_export(PRMTask(cfg), cfg.train, "prm", cfg.output, cfg.save_dtype, model_class)
