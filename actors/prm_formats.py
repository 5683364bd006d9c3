"""How published PRMs lay out a trajectory and where each step's score is read: one small class per family.

A PRM reads a question and a trajectory (a list of steps) and gives one score in [0, 1] per step. Published PRMs
disagree on how the steps are laid out and where the score is read (docs/algorithms.md,
"PRM input formats"); every tag and label token id is derived from the PRM's own tokenizer in the class's
constructor, in one place (ids depend on leading spaces, so they are never hard-coded):

- `QwenPRMFormat` ("qwen"): Qwen2.5-Math-PRM and ponder's own PRM. A two-label token classifier
  (`actors.engines.qwen2_prm.Qwen2ForProcessRewardModel`; vLLM serves it natively); score = P(label 1) at each
  `<extra_0>` step tag.
- `MathShepherdFormat` ("math-shepherd"): a causal LM; "question answer" with a " ки" after every step;
  score = P('+') of the softmax over the '+' and '-' logits at each "ки".
- `RLHFlowFormat` ("rlhflow"): a causal LM; the steps are user turns of a chat, each answered "+";
  score of step k = P('+') vs '-' at the position that predicts the k-th assistant reply.
- `LPRFormat` ("lpr"): LPR's value model (Jiao et al. 2024); a 4-way head (v = how many of 3 completions of the
  state end right) on the last token of question + state; score of step k = P(v >= 2) at the last token of step k.

Steps arrive as the policy wrote them, each ending in the step delimiter (default "\\n\\n"). Each format but LPR's
strips that one trailing delimiter before laying the steps out (LPR's states are trained as the policy wrote
them). One score per given step, never more. If the number of score positions found differs from the number of
steps (a step that itself contains the tag, a tokenizer that merges the tag with its neighbours, an empty step),
scoring fails with an error naming the trajectory, never a silent pad or cut.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Sequence

from app.problems import QWEN_MATH_SYSTEM_PROMPT


class PRMInputError(ValueError):
    """A trajectory that cannot be laid out for the PRM (step count mismatch, too long). Names the trajectory."""


@dataclass(frozen=True)
class EncodedTrajectory:
    """Token ids of one (question, trajectory) and the positions whose outputs give the step scores, in order."""

    input_ids: tuple[int, ...]
    positions: tuple[int, ...]


def describe(index: int | None, steps: Sequence[str]) -> str:
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
    num_labels: int = 2  # classifier columns
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
                f"{self.name} PRM: {describe(index, steps)}: found {len(enc.positions)} score positions ({tag}) "
                f"for {len(steps)} steps; a step may contain the tag itself, or the tokenizer merged the tag with "
                "its neighbours"
            )
        return enc


class QwenPRMFormat(PRMFormat):
    """Qwen2.5-Math-PRM layout (ponder's own PRM uses it too).

    With a chat template: system `QWEN_MATH_SYSTEM_PROMPT`, user = the question, assistant = the stripped steps joined by
    `<extra_0>` with one more at the end; rendered with the template and tokenized without extra special tokens
    (the template carries them), as in the model card. Without a chat template (the toy character tokenizer) the
    plain layout is: question + "\\n\\n" + every stripped step followed by `<extra_0>`, i.e. the same assistant
    text as above after "question\\n\\n". Score = P(label 1) of the two-label head at each `<extra_0>`.
    """

    name = "qwen"
    head = "classifier"
    good_label = 1
    STEP_TAG = "<extra_0>"

    def __init__(self, tokenizer, step_delimiter: str = "\n\n", system: str = QWEN_MATH_SYSTEM_PROMPT):
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

    Text = question + " " + answer, where answer = the stripped steps joined by "\\n\\n", in which every "\\n\\n"
    becomes " ки\\n\\n" and " ки" ends it (the reference's layout, minus its empty trailing step). Only the answer
    is tagged: a question with blank lines of its own keeps them untagged, as in the reference. Tokenized with
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
        tagged = answer.replace("\n\n", f" {self.STEP_TAG}\n\n") + f" {self.STEP_TAG}"
        return f"{question} {tagged}"

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


class LPRFormat(PRMFormat):
    """LPR's PRM (Jiao et al. 2024; SparkJiao/dpo-trajectory-reasoning): a value model over states.

    Trained on (question + state, v), v = how many of 3 completions of the state end right (0..3), with a 4-way
    head on the last token (`train.synthesize.states` makes the data, `ponder train prm` with `format: lpr`
    trains it: ponder's Qwen2 PRM class with `num_labels: 4`). Text: question + "\\n\\n" + the steps as the policy
    wrote them (delimiters kept: a state ends in one, as its completions started from it). Tokenized piece by
    piece (the question with the tokenizer's special tokens, then each step on its own), so the tokens of a state
    of k steps are exactly the first tokens of the whole trajectory's, whatever a tokenizer would merge across a
    step boundary: one causal forward reads every prefix, and the output at the last token of step k is what a
    forward of that state alone gives. Score of step k = P(v >= 2) = the head's classes 2 and 3 at that token
    (`good_labels`; the engines read P(good) of two columns, `fold_value_head` gives them these two).
    """

    name = "lpr"
    head = "classifier"
    good_label = 1  # of the folded head: (P(v < 2), P(v >= 2))
    num_labels = 4
    good_labels: tuple[int, ...] = (2, 3)

    def render(self, question: str, steps: Sequence[str]) -> str:
        return question + "\n\n" + "".join(steps)

    def encode(self, question, steps, index=None):
        ids = list(self.tokenizer.encode(question + "\n\n"))
        pos = []
        for s in steps:
            piece = self.tokenizer.encode(s, add_special_tokens=False)
            ids += piece
            if piece:
                pos.append(len(ids) - 1)
        return self._check(EncodedTrajectory(tuple(ids), tuple(pos)), steps, index, "steps with tokens")


def fold_value_head(model, good: Sequence[int]) -> None:
    """Replace a k-way classifier head (`model.score`) with one giving two columns, (log P(v not in good),
    log P(v in good)): softmax of them is (P(bad), P(good)), what the engines read at column `good_label` 1. No
    parameters are added; the head's own weights are kept inside."""
    import torch

    class Folded(torch.nn.Module):
        def __init__(self, head, good):
            super().__init__()
            self.head = head
            self.good = list(good)

        def forward(self, hidden):
            logp = self.head(hidden).float().log_softmax(-1)
            bad = [i for i in range(logp.shape[-1]) if i not in self.good]
            return torch.stack([logp[..., bad].logsumexp(-1), logp[..., self.good].logsumexp(-1)], dim=-1)

    model.score = Folded(model.score, good)


FORMATS: dict[str, type[PRMFormat]] = {f.name: f for f in (QwenPRMFormat, MathShepherdFormat, RLHFlowFormat,
                                                            LPRFormat)}


def make_format(name: str, tokenizer, step_delimiter: str = "\n\n") -> PRMFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown PRM format {name!r}; one of {sorted(FORMATS)}")
    return FORMATS[name](tokenizer, step_delimiter=step_delimiter)
