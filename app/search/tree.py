"""Steps, search-tree nodes and finished trajectories.

A *step* is the text the policy produced up to and including the step delimiter (default "\\n\\n", kept in the
text, as in the published recipes). A *node* is a point in a search tree: the step that led to it, its parent,
its children and the statistics the methods keep (PRM scores, MCTS visit counts and values). A *trajectory* is
what a method hands back: the steps from the root to a leaf, the PRM's score of each step, whether it finished,
and (filled in by `app.search.record`) the extracted answer and its correctness.

Nothing here imports torch, transformers or vllm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

from app.search.select import aggregate


@dataclass
class Step:
    """One step of a trajectory: its text (delimiter included), the tokens it took, how generation ended.

    finish_reason is the engine's: "stop" (ended on the delimiter), "eos", "length".
    mean_logprob is the mean token log-probability when the engine reported it (MCTS priors use it).
    """

    text: str
    tokens: int = 0
    finish_reason: str | None = None
    mean_logprob: float | None = None


@dataclass(eq=False)
class Node:
    """A node of a search tree. The root has no step; every other node has the step that led to it.

    scores:  the PRM's per-step scores of the path root -> this node (one per step, the last one is this step's).
    prior, visits, value_sum, initial_value: MCTS statistics (Q = value_sum / visits, or initial_value unvisited).
    terminal: no further expansion (the trajectory finished, or a dead end).
    """

    step: Step | None = None
    parent: "Node | None" = None
    children: list["Node"] = field(default_factory=list)
    scores: list[float] | None = None
    terminal: bool = False
    finished: bool = False
    prior: float = 1.0
    visits: int = 0
    value_sum: float = 0.0
    initial_value: float = 0.0
    depth: int = 0

    def add_child(self, step: Step, **kw) -> "Node":
        child = Node(step=step, parent=self, depth=self.depth + 1, **kw)
        self.children.append(child)
        return child

    def add_steps(self, steps: Sequence[Step], scores: list[float] | None = None) -> "Node":
        """Children one below the other, one per step (a completion that holds several steps); returns the last.

        With `scores` (the PRM's per-step scores of the whole path to the last one), each new node gets its prefix.
        """
        node = self
        for step in steps:
            node = node.add_child(step)
            if scores is not None:
                node.scores = list(scores[: node.depth])
        return node

    def path(self) -> list["Node"]:
        """Nodes from the first step to this one (the root excluded)."""
        out: list[Node] = []
        node: Node | None = self
        while node is not None and node.step is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    @property
    def steps(self) -> list[Step]:
        return [n.step for n in self.path()]  # type: ignore[misc]

    @property
    def step_texts(self) -> list[str]:
        return [s.text for s in self.steps]

    @property
    def text(self) -> str:
        return "".join(self.step_texts)

    @property
    def tokens(self) -> int:
        """Generated tokens along the path (the whole trajectory so far)."""
        return sum(s.tokens for s in self.steps)

    @property
    def score(self) -> float | None:
        """The PRM score of this node's own (last) step."""
        return self.scores[-1] if self.scores else None

    @property
    def value(self) -> float:
        """MCTS Q: mean backed-up value, or the initial PRM value while unvisited."""
        return self.value_sum / self.visits if self.visits > 0 else self.initial_value

    def is_leaf(self) -> bool:
        return not self.children

    def walk(self) -> Iterator["Node"]:
        yield self
        for c in self.children:
            yield from c.walk()

    def to_trajectory(self, group: int | None = None, finished: bool | None = None) -> "Trajectory":
        steps = self.steps
        return Trajectory(
            steps=[s.text for s in steps],
            scores=list(self.scores) if self.scores is not None else None,
            finished=self.finished if finished is None else finished,
            finish_reason=steps[-1].finish_reason if steps else None,
            tokens=sum(s.tokens for s in steps),
            group=group,
        )


@dataclass
class Trajectory:
    """A finished (or abandoned) path: what a method returns and what selection and the results record use.

    steps:   step texts, delimiters included; "".join(steps) is the generated text.
    scores:  one PRM score in [0, 1] per step, or None when the method ran without a PRM.
    finished: it ended at EOS / a final answer (False: cut by the depth cap, the token budget, a dead end).
    group:   DVTS subtree index (selection keeps groups whole), else None.
    answer, correct: filled in by `app.search.record` (extraction and grading live in app.grading).
    """

    steps: list[str]
    scores: list[float] | None = None
    finished: bool = True
    finish_reason: str | None = None
    tokens: int = 0
    group: int | None = None
    answer: str | None = None
    correct: bool | None = None

    @property
    def text(self) -> str:
        return "".join(self.steps)

    def aggregate(self, strategy: str) -> float:
        if self.scores is None:
            raise ValueError("this trajectory has no PRM scores (the method ran without a PRM)")
        return aggregate(self.scores, strategy)

    def to_dict(self) -> dict:
        return {
            "steps": list(self.steps),
            "scores": None if self.scores is None else [float(s) for s in self.scores],
            "finished": self.finished,
            "finish_reason": self.finish_reason,
            "tokens": self.tokens,
            "group": self.group,
            "answer": self.answer,
            "correct": self.correct,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Trajectory":
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})


def split_steps(text: str, delimiter: str = "\n\n") -> list[str]:
    """Split a full completion into steps, each keeping its trailing delimiter.

    A text ending in the delimiter gives no empty trailing step (some PRM wrappers of the references score
    one; ponder does not). An empty text is one empty step, so that every trajectory has a step to score.
    """
    parts = text.split(delimiter)
    steps = [p + delimiter for p in parts[:-1]]
    if parts[-1]:
        steps.append(parts[-1])
    return steps or [text]


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
