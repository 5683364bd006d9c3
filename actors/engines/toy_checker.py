"""The toy world's checker served as a PRM: the oracle verifier, for measuring what a search method can do.

`prm: {format: toy-checker}` in a toy recipe puts this in place of a model: a step scores 1.0 while every step
so far is right and 0.0 from the first slip on (`app.toy.checker.exact_step_labels`, the toy PRM's own training
labels). It reads no tokens and costs no FLOPs. With it, beam search on the toy world shows its ceiling (README:
0.94 of the level-4 test problems, where majority solves 0.665), which separates what the search does from what
the PRM does. Toy questions only: anything else fails its own call with a PRMInputError naming it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from actors.prm_formats import EncodedTrajectory, PRMInputError


@dataclass(frozen=True)
class CheckedTrajectory(EncodedTrajectory):
    """No tokens: the question and steps themselves, which the checker reads."""

    question: str = ""
    steps: tuple[str, ...] = ()


class ToyCheckerFormat:
    """Keeps the text as it is (the PRMFormat interface, with no tokenizer)."""

    name = "toy-checker"

    def __init__(self, step_delimiter: str = "\n\n"):
        self.step_delimiter = step_delimiter

    def encode(self, question: str, steps: Sequence[str], index: int | None = None) -> CheckedTrajectory:
        from app.toy.checker import question_terms

        try:
            question_terms(question)
        except ValueError:
            raise PRMInputError(f"toy-checker PRM: {question[:80]!r} is not a toy question ('What is 3 + 4 - 2?'); "
                                "the checker scores the toy world only, use a PRM model for other data") from None
        return CheckedTrajectory(input_ids=(), positions=tuple(range(len(steps))), question=question, steps=tuple(steps))


class ToyCheckerEngine:
    """`score(items)` -> per-step 1.0 / 0.0 from the toy checker."""

    num_parameters = 0
    max_length = None

    def score(self, items: Sequence[CheckedTrajectory]) -> list[list[float]]:
        from app.toy.checker import exact_step_labels

        return [[float(y) for y in exact_step_labels(it.question, list(it.steps))] if it.steps else [] for it in items]
