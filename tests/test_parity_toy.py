"""Issue 12's parity on the SHIPPED toy policy: the HF and vLLM engines agree on greedy decoding.

- greedy answers (extracted from full solutions) agree on >= 99% of 200 toy problems;
- token counts and finish reasons agree (wherever the two texts agree, exactly; overall on >= 99%);
- the first step (stop string "\\n\\n") ends at the same place with the same counts.

Skipped, with the reason, only while the toy checkpoint is not built (the lead removes the skip once it ships).
"""
from __future__ import annotations

import pytest

from app.contracts import GenerationRequest as R
from app.toy import CHECKPOINTS

POLICY = CHECKPOINTS / "policy"
N_PROBLEMS = 200

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not (POLICY / "config.json").exists(),
                       reason=f"toy policy checkpoint not built yet ({POLICY}); `ponder toy build` makes it"),
]


def _prompts() -> list[str]:
    try:
        from app.toy.world import toy_problems, toy_prompt
    except ImportError:  # the generator is not there yet: plain arithmetic prompts in the same format
        return [f"Question: What is {7 + i % 90} + {3 * i % 97} - {i % 13}?\n\nAnswer:\n\n" for i in range(N_PROBLEMS)]
    problems = toy_problems("test", n_per_level=N_PROBLEMS // 5)
    assert len(problems) == N_PROBLEMS
    return [toy_prompt(p) for p in problems]


def _answer(text: str) -> str | None:
    try:
        from app.grading import extract_answer
    except ImportError:
        import re

        m = re.findall(r"\\boxed\{([^}]*)\}", text)
        return m[-1] if m else None
    return extract_answer(text)


@pytest.fixture(scope="module")
def engines():
    from actors.engines.hf import HFEngine
    from actors.engines.vllm import VLLMEngine

    hf = HFEngine("toy:policy", dtype="float32", device="cpu")
    vl = VLLMEngine("toy:policy", dtype="float32", seed=0)
    yield hf, vl
    vl.close()


def _agreement(h, v):
    same_answer = same_counts = 0
    for hg, vg in zip(h, v):
        hc, vc = hg[0], vg[0]
        same_answer += _answer(hc.text) == _answer(vc.text)
        counts_equal = (hc.prompt_tokens, hc.generated_tokens, hc.finish_reason, hc.stop_reason) == \
                       (vc.prompt_tokens, vc.generated_tokens, vc.finish_reason, vc.stop_reason)
        same_counts += counts_equal
        if hc.text == vc.text:
            assert counts_equal, (hc, vc)
    return same_answer / len(h), same_counts / len(h)


def test_greedy_answers_agree_on_200_toy_problems(engines):
    hf, vl = engines
    reqs = [R(p, max_tokens=320, temperature=0) for p in _prompts()]
    h, v = hf.generate(reqs), vl.generate_sync(reqs)
    answers, counts = _agreement(h, v)
    identical = sum(a[0].text == b[0].text for a, b in zip(h, v)) / len(h)
    print(f"toy parity: answers {answers:.1%}, counts/finish {counts:.1%}, identical texts {identical:.1%}")
    assert answers >= 0.99
    assert counts >= 0.99
    assert sum(g[0].finish_reason == "eos" for g in h) >= 0.9 * len(h)  # a trained policy ends its solutions


def test_first_step_stops_agree(engines):
    hf, vl = engines
    reqs = [R(p, max_tokens=96, temperature=0, stop=("\n\n",)) for p in _prompts()[:100]]
    h, v = hf.generate(reqs), vl.generate_sync(reqs)
    _, counts = _agreement(h, v)
    assert counts >= 0.99
    assert all(g[0].finish_reason == "stop" and g[0].text.endswith("\n\n") for g in h if g[0].stop_reason)
