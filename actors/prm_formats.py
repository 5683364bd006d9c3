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

Steps arrive as the policy wrote them, each ending in the step delimiter (default "\\n\\n"). Each format strips that
one trailing delimiter before laying the steps out. One score per given step, never more. If the number of score
positions found differs from the number of steps (a step that itself contains the tag, a tokenizer that merges
the tag with its neighbours), scoring fails with an error naming the trajectory, never a silent pad or cut.
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


FORMATS: dict[str, type[PRMFormat]] = {f.name: f for f in (QwenPRMFormat, MathShepherdFormat, RLHFlowFormat)}


def make_format(name: str, tokenizer, step_delimiter: str = "\n\n") -> PRMFormat:
    if name not in FORMATS:
        raise ValueError(f"unknown PRM format {name!r}; one of {sorted(FORMATS)}")
    return FORMATS[name](tokenizer, step_delimiter=step_delimiter)
