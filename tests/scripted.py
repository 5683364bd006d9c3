"""A scripted, deterministic policy and PRM for testing search logic without models.

ScriptedPolicy: the *state* of a prompt is what follows the problem prompt (the trajectory so far). `script` maps a
state to its candidate next steps (a string, or (string, mean logprob)); a callable state -> candidates works too.
Each sample takes the next candidate in that state's cycle (mode "cycle"), or, in mode "seed", the candidate at
(request seed + sample index) % len, so that results depend only on seeds, not on call order or batching.
A candidate containing a stop string of the request is cut after it (finish "stop"); otherwise it ends at EOS.
A request without stop strings chains candidates (state by state) until one ends at EOS: a whole solution.
Tokens are whitespace-separated words; a text over max_tokens words is cut (finish "length").

ScriptedPRM: the score of a step is `scores[step.strip()]` (or a callable (steps_so_far) -> score), else `default`.
Both count usage like the real handles and record every call.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Callable, Sequence

from app.contracts import Completion, GenerationRequest, Usage, apply_stop

Cand = str | tuple[str, float]


def count_tokens(text: str) -> int:
    return len(text.split())


def _cut_words(text: str, k: int) -> str:
    ends = [m.end() for m in re.finditer(r"\S+", text)]
    return text[: ends[k - 1]] if k > 0 and len(ends) >= k else ("" if k <= 0 else text)


class ScriptedPolicy:
    num_parameters = 1000

    def __init__(
        self,
        script: dict[str, Sequence[Cand]] | Callable[[str], Sequence[Cand]],
        prefix: str = "",
        mode: str = "cycle",
        default: Sequence[Cand] = ("The answer is \\boxed{0}",),
        marker: str | None = None,
    ):
        self.script = script
        self.prefix = prefix
        self.marker = marker
        self.mode = mode
        self.default = list(default)
        self.counters: dict[str, int] = defaultdict(int)
        self.usage = Usage()
        self.calls: list[list[GenerationRequest]] = []
        self.log: list[tuple[str, int, tuple[str, ...], float]] = []  # (state, n, stop, temperature) per request

    def candidates(self, state: str) -> list[Cand]:
        if callable(self.script):
            c = list(self.script(state))
        else:
            c = list(self.script.get(state, self.default))
        return c or self.default

    def state_of(self, prompt) -> str:
        """The trajectory so far: what follows the prefix (or the first `marker`)."""
        assert isinstance(prompt, str), prompt
        if self.marker is not None:
            assert self.marker in prompt, prompt
            return prompt.split(self.marker, 1)[1]
        assert prompt.startswith(self.prefix), prompt
        return prompt[len(self.prefix):]

    def _pick(self, state: str, seed: int | None, j: int) -> Cand:
        cands = self.candidates(state)
        if self.mode == "seed":
            return cands[((seed or 0) + j) % len(cands)]
        i = self.counters[state]
        self.counters[state] += 1
        return cands[i % len(cands)]

    def _one(self, req: GenerationRequest, j: int) -> Completion:
        prompt = req.prompt
        state = self.state_of(prompt)
        text, logps, reason = "", [], "eos"
        for _ in range(1000):
            cand = self._pick(state + text, req.seed, j)
            piece, lp = (cand, None) if isinstance(cand, str) else cand
            cut, matched = apply_stop(piece, req.stop)
            if matched:
                text += cut
                logps.append((lp, count_tokens(cut)))
                reason = "stop"
                break
            text += piece
            logps.append((lp, count_tokens(piece)))
            if req.stop or not piece.endswith("\n\n"):
                reason = "eos"
                break
        tokens = count_tokens(text)
        if tokens > req.max_tokens:
            text, tokens, reason = _cut_words(text, req.max_tokens), req.max_tokens, "length"
        cum = None
        if req.logprobs and all(lp is not None for lp, _ in logps) and tokens:
            cum = sum(lp * t for lp, t in logps) * (tokens / max(1, sum(t for _, t in logps)))
        return Completion(
            text=text, prompt_tokens=count_tokens(prompt), generated_tokens=tokens, finish_reason=reason,  # type: ignore[arg-type]
            stop_reason=req.stop[0] if reason == "stop" else None, cumulative_logprob=cum,
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        self.calls.append(list(requests))
        out = []
        for req in requests:
            self.log.append((self.state_of(req.prompt), req.n, tuple(req.stop), req.temperature))
            out.append([self._one(req, j) for j in range(req.n)])
        self.usage.add_generation(out, self.num_parameters)
        return out


class ScriptedPRM:
    num_parameters = 100

    def __init__(self, scores: dict[str, float] | Callable[[list[str]], float] | None = None, default: float = 0.5):
        self.scores = scores or {}
        self.default = default
        self.usage = Usage()
        self.calls: list[list[list[str]]] = []

    def step_score(self, steps: list[str]) -> float:
        if callable(self.scores):
            return float(self.scores(steps))
        return float(self.scores.get(steps[-1].strip(), self.default))

    def score(self, question: str, trajectories: Sequence[Sequence[str]]) -> list[list[float]]:
        trajs = [list(t) for t in trajectories]
        self.calls.append(trajs)
        tokens = sum(count_tokens(question) + sum(count_tokens(s) for s in t) for t in trajs)
        self.usage.add_scoring(tokens, self.num_parameters)
        return [[self.step_score(t[: k + 1]) for k in range(len(t))] for t in trajs]


class ScriptedPool:
    """Stands in for a policy / PRM pool: picklable, `client()` makes a fresh handle (its own usage)."""

    def __init__(self, make: Callable[[], object]):
        self.make = make

    def client(self):
        return self.make()

    def stats(self) -> list[dict]:
        return []  # no engines: the bench reports no busy shares

    def reset_stats(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def simple_extract(text: str) -> str | None:
    """Tests' answer extraction: the last \\boxed{...}."""
    m = BOXED.findall(text)
    return m[-1].strip() if m else None


def simple_grade(text: str, gold: str) -> bool:
    a = simple_extract(text)
    return a is not None and a == str(gold).strip()
