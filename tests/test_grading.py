"""Grading: extraction order, a table of equivalence cases a mathematician would sign off, time limits, batches."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from app.grading import verify as grading
from app.grading import (
    answers_equivalent,
    extract_answer,
    grade,
    grade_batch,
    grade_stats,
    normalize_answer,
    reset_grade_stats,
)


def boxed(answer: str) -> str:
    return f"Let me work through it step by step.\n\nSo the result follows.\n\nThe answer is $\\boxed{{{answer}}}$."


# (prediction text, gold answer, expected). Every expected value is the mathematically right verdict.
# Left out on purpose, because the right verdict depends on a convention the pair does not state:
# "\frac{\pi}{6}" vs "30^\circ" (radians or degrees: math-verify strips the degree sign and says False),
# "0.25" vs "25\%" (25% is 0.25, but MATH also accepts "25" for "25\%": both are graded True here),
# "1.000" vs "1000" (a decimal point or a European thousands separator).
CASES = [
    # fractions
    (boxed(r"\frac{14}{3}"), r"\frac{14}{3}", True),
    (boxed(r"\dfrac{14}{3}"), r"\frac{14}{3}", True),
    (boxed(r"\tfrac{14}{3}"), r"\frac{14}{3}", True),
    (boxed("14/3"), r"\frac{14}{3}", True),
    (boxed(r"4\frac{2}{3}"), r"\frac{14}{3}", True),
    (boxed(r"\frac{28}{6}"), r"\frac{14}{3}", True),
    (boxed(r"\frac{3}{14}"), r"\frac{14}{3}", False),
    (boxed("4.6667"), r"\frac{14}{3}", False),  # a rounding is not the exact value
    (boxed(r"\frac12"), "0.5", True),
    (boxed(r"-\frac{1}{2}"), r"\frac{-1}{2}", True),
    (boxed(r"\frac{1}{2}"), r"-\frac{1}{2}", False),
    (boxed("1.5"), r"\frac{3}{2}", True),
    # radicals
    (boxed(r"2\sqrt{2}"), r"\sqrt{8}", True),
    (boxed(r"\frac{1}{\sqrt{3}}"), r"\frac{\sqrt{3}}{3}", True),
    (boxed(r"\sqrt2"), r"\sqrt{2}", True),
    (boxed(r"3\sqrt{2}"), r"2\sqrt{3}", False),
    (boxed(r"\sqrt[3]{8}"), "2", True),
    (boxed(r"\frac{\sqrt{6}}{2}"), r"\sqrt{\frac{3}{2}}", True),
    (boxed(r"1+\sqrt{5}"), r"\sqrt{5}+1", True),
    (boxed(r"1-\sqrt{5}"), r"\sqrt{5}-1", False),
    # intervals
    (boxed(r"(-\infty, 3]"), r"(-\infty,3]", True),
    (boxed(r"[2,5]"), r"[2,5)", False),
    (boxed(r"\left[ 2, 5 \right)"), r"[2,5)", True),
    (boxed(r"(-\infty,-1)\cup(1,\infty)"), r"(-\infty, -1) \cup (1, \infty)", True),
    (boxed(r"(1,\infty)"), r"(-\infty, -1) \cup (1, \infty)", False),
    (boxed(r"[0, \frac{1}{2}]"), r"\left[0,\tfrac12\right]", True),
    # tuples and lists
    (boxed(r"(3, \frac{\pi}{2})"), r"\left( 3, \frac{\pi}{2} \right)", True),
    (boxed(r"(2,1)"), "(1,2)", False),
    (boxed(r"(1, -2, 3)"), r"(1,-2,3)", True),
    (boxed(r"(1, 2, 3)"), r"(1,2,4)", False),
    (boxed(r"\{1, 2\}"), r"\{2,1\}", True),
    (boxed("3, 5, 7"), "7, 5, 3", True),
    # matrices and vectors
    (boxed(r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}"), r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", True),
    (boxed(r"\begin{pmatrix} 1 & 2 \\ 4 & 3 \end{pmatrix}"), r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", False),
    (boxed(r"\begin{pmatrix} \frac{1}{2} \\ -1 \end{pmatrix}"), r"\begin{pmatrix} 0.5 \\ -1 \end{pmatrix}", True),
    (boxed(r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"), r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", False),
    # units, percent, degrees, money
    (boxed(r"5\text{ cm}"), "5", True),
    (boxed(r"12 \text{ inches}"), "12", True),
    (boxed(r"6\text{ cm}^2"), "6", True),
    (boxed(r"25\%"), "25", True),
    (boxed("25"), r"25\%", True),
    (boxed(r"40\%"), "25", False),
    (boxed(r"30^\circ"), "30", True),
    (boxed(r"30^{\circ}"), r"30^\circ", True),
    (boxed(r"45^\circ"), "30", False),
    (boxed(r"\$18.90"), "18.90", True),
    (boxed(r"\$1,000"), "1000", True),
    (boxed("5"), r"5\text{ cm}", True),
    (boxed("90"), r"90^\circ", True),
    (boxed(r"12.5\%"), "12.5", True),
    # LaTeX spacing variants
    (boxed(r"-\!3"), "-3", True),
    (boxed(r"\left( 1, 2 \right)"), "(1,2)", True),
    (boxed(r"\frac{1}{2}\,\pi"), r"\frac{\pi}{2}", True),
    (boxed(r"\displaystyle \frac{7}{2}"), r"\frac72", True),
    (boxed(r"x^2 + 2x + 1"), r"(x+1)^2", True),
    (boxed(r"(x+1)^2"), r"x^2+1", False),
    (boxed(r"x = 5"), "5", True),
    (boxed(r"\pi"), "3.14", False),
    (boxed(r"\text{(B)}"), r"\text{(B)}", True),
    (boxed(r"\text{Evelyn}"), r"\text{Evelyn}", True),
    (boxed(r"\text{(C)}"), r"\text{(B)}", False),
    # GSM8K numbers, other answer phrasings
    ("She pays 1,234 dollars in total.\n#### 1,234", "1234", True),
    ("Total: 12 * 100 = 1200.\n#### 1200", "1,200", True),
    ("So he has 18 apples left.\n#### 18", "81", False),
    ("The answer is 1,000,000.", "1000000", True),
    ("The answer is 100.", "1000", False),
    ("Adding them gives 3 + 4 = 7 apples.", "7", True),
    ("Adding them gives 3 + 4 = 7 apples, minus 2 is 5.", "7", False),
    ("Therefore, the final answer is: $\\boxed{42}$. I hope it is correct.", "42", True),
    ("The final answer is $\\frac{2}{3}$. I hope it is correct.", r"\frac{2}{3}", True),
    # non-answers
    ("I am not sure how to solve this problem.", "7", False),
    ("", "7", False),
    (None, "7", False),
    ("Let me think about it... \\boxed{}", "7", False),
    ("The answer is \\boxed{\\frac{1", r"\frac{1}{2}", False),  # truncated inside the box
]


def test_table_is_large_enough():
    assert len(CASES) >= 60
    assert sum(expected for _, _, expected in CASES) >= 20 and sum(not e for _, _, e in CASES) >= 20


@pytest.mark.parametrize("prediction,gold,expected", CASES, ids=[f"{i:02d}" for i in range(len(CASES))])
def test_grade_table(prediction, gold, expected):
    assert grade(prediction, gold) is expected


# ----------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text,answer",
    [
        (r"So $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt{3}}{2}"),
        (r"\boxed{\left\{ 1, \{2\} \right\}}", r"\left\{ 1, \{2\} \right\}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\fbox{x^{2}}", "x^{2}"),
        (r"\boxed 5$ done", "5"),
        (r"early \boxed{3}, later \boxed{4", "3"),  # the last box is unclosed: the last complete one counts
        ("The final answer is $x = 2$. I hope it is correct.", "x = 2"),
        (r"Therefore, the final answer is: $\boxed{\dfrac{1}{4}}$. I hope it is correct.", r"\dfrac{1}{4}"),
        ("The answer is 3.5.", "3.5"),
        ("The answer is: $\\frac{1}{2}$.\nDone", r"\frac{1}{2}"),
        ("so the total is 16\n#### 1,600", "1,600"),
        ("3 cats and 4 dogs make -7.5 things", "-7.5"),
        ("pages 1-2 and 3-4", "4"),  # a hyphen between numbers is not a minus sign
        ("no numbers at all", None),
        (None, None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extraction_precedence():
    # "final answer is $...$" beats a later box, a box beats "The answer is", which beats ####, which beats numbers
    assert extract_answer(r"The final answer is $7$. Check: \boxed{8}") == "7"
    assert extract_answer(r"\boxed{8}. The answer is 9.") == "8"
    assert extract_answer("The answer is 9.\n#### 10") == "9"
    assert extract_answer("#### 10\nand then 11") == "10"
    assert extract_answer("first 10 and then 11") == "11"


@pytest.mark.parametrize(
    "raw,normal",
    [
        (r"\dfrac{1}{2}", r"\frac{1}{2}"),
        (r"\left( 1,\! 2 \right)", "(1,2)"),
        (r"25\%", "25"),
        (r"30^{\circ}", "30"),
        (r"\$1,234", "1234"),
        ("1, 234", "1,234"),  # a list, not a number with a thousands comma
        (r"5\text{ cm}", "5"),
        ("10 dollars", "10"),
        (r"\boxed{7}.", "7"),
        (r"\text{(A)}", "(A)"),
    ],
)
def test_normalize_answer(raw, normal):
    assert normalize_answer(raw) == normal


# ------------------------------------------------------------------------------------------- equivalence API


def test_answers_equivalent_is_symmetric_and_cached():
    grading._equivalent_cached.cache_clear()
    assert answers_equivalent(r"\frac{1}{2}", "0.5") and answers_equivalent("0.5", r"\frac{1}{2}")
    assert grading._equivalent_cached.cache_info().hits >= 1
    assert not answers_equivalent("2", "3")
    assert not answers_equivalent(None, "3")
    assert answers_equivalent(r"\sqrt{8}", r"2\sqrt{2}")


# -------------------------------------------------------------------------------------------------- time limit

HANG = r"\boxed{2^{2^{2^{100}}}}"  # sympy tries to decide 2^(2^(2^100)) == 3 and never finishes


def test_timeout_counts_as_wrong_and_returns_quickly(caplog):
    reset_grade_stats()
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="app.grading"):
        assert grade(HANG, "3", timeout=0.3) is False
    assert time.monotonic() - start < 2.0
    stats = grade_stats()
    assert (stats.checks, stats.timeouts) == (1, 1) and stats.timeout_fraction == 1.0
    assert any("timed out" in r.getMessage() for r in caplog.records)
    # the limit is gone afterwards: a normal grade still works
    assert grade(boxed(r"\frac{1}{\sqrt{2}}"), r"\frac{\sqrt{2}}{2}") is True


def test_timeout_restores_an_outer_alarm():
    import signal

    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        assert grade(HANG, "3", timeout=0.2) is False
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 3.0 < left <= 5.0 and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_time_limit_outside_the_main_thread_uses_a_helper_process():
    out = {}

    def work():
        out["hang"] = grade(HANG, "3", timeout=0.5)
        out["ok"] = grade(boxed(r"\sqrt{8}"), r"2\sqrt{2}", timeout=5.0)

    t = threading.Thread(target=work)
    t.start()
    t.join(timeout=120)  # the helper process starts once (imports sympy), then each grade is bounded
    assert not t.is_alive()
    assert out == {"hang": False, "ok": True}


# ------------------------------------------------------------------------------------------------------ batch


def test_grade_batch_in_process_without_ray():
    """Without Ray, grade_batch grades here and starts nothing. Run in a fresh interpreter, so whether another test
    of this session started Ray does not matter: this always runs."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pairs = [(p, g) for p, g, _ in CASES[:8]]
    script = """
import json, sys
import ray
from app.grading import grade_batch
pairs = [tuple(p) for p in json.loads(sys.stdin.read())]
assert not ray.is_initialized()
out = {"one": grade_batch(pairs, num_workers=1), "default": grade_batch(pairs)}
try:
    grade_batch(pairs, num_workers=2)
    out["error"] = None
except RuntimeError as e:
    out["error"] = str(e)
out["ray_started"] = ray.is_initialized()
print(json.dumps(out))
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(pairs), capture_output=True, text=True,
                          cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    expected = [e for _, _, e in CASES[:8]]
    assert out["one"] == out["default"] == expected
    assert out["error"] is not None and "ray.init" in out["error"] and "num_workers=1" in out["error"]
    assert out["ray_started"] is False  # grading without Ray never starts a cluster


def test_grade_batch_on_ray(ray_cluster):
    pairs = [(p, g) for p, g, _ in CASES] + [(HANG, "3")]
    expected = [e for _, _, e in CASES] + [False]
    reset_grade_stats()
    assert grade_batch(pairs, num_workers=2, timeout=2.0, chunk_size=16) == expected
    stats = grade_stats()
    assert stats.checks >= len(CASES) - 5  # non-answers are not checks
    assert stats.timeouts >= 1  # the pathological pair (the rest take ~0.1 s, even on a cold worker)
    assert grade_batch([]) == []
