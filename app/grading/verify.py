"""Decide whether an answer equals the gold answer: cheap checks first, then math-verify under a time limit.

Equivalence runs cheap checks first (equal normalised strings; two plain numbers compared exactly, with
thousands commas, units, percent and degree signs stripped) and only then math-verify (sympy), which can
hang on inputs such as `2^{2^{2^{100}}}`. Every math-verify call is bounded in time: a grade that runs out
of time counts as wrong, is logged, and is counted (`grade_stats().timeout_fraction`).

How the time limit works, and why not math-verify's own: `parse(parsing_timeout=)` and
`verify(timeout_seconds=)` arm `signal.alarm` with whole seconds per step and cancel any outer alarm when they
return, so a grade (two parses plus several comparisons) could run for many times its limit. ponder turns
them off (`None`) and arms one `setitimer` for the whole grade instead (sub-second, one budget). Signals only
work in the main thread (Ray tasks run there); anywhere else (threaded actors, Serve replicas) the grade runs
in a helper process that is killed when it runs out of time, so a hung sympy never blocks the caller.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction

from app.grading.extract import extract_answer, last_boxed

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3.0  # seconds per grade; the references use a 3 s sympy alarm

# -------------------------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "cm|mm|km|m|meters?|metres?|inch(?:es)?|in|feet|foot|ft|yards?|yd|miles?|mi|units?|square|sq|cubic|"
    "dollars?|cents?|degrees?|hours?|hrs?|minutes?|mins?|seconds?|secs?|days?|weeks?|months?|years?|mph|"
    "kg|g|grams?|pounds?|lbs?|ounces?|oz|liters?|litres?|ml|gallons?|people|students|apples|marbles|pages"
)
_TRAILING_UNITS = re.compile(rf"^(-?[\d.,/]+)\s*(?:(?:{_UNIT_WORDS})\b\s*(?:\^?\{{?[23]\}}?)?\s*)+$", re.IGNORECASE)
_TEXT_UNITS = re.compile(r"^(.*?[\d}])\s*\\(?:text|mbox|mathrm)\{\s*[A-Za-z][A-Za-z .]*\}\s*(?:\^\{?[23]\}?)?$")
_TEXT_WRAP = re.compile(r"\\(?:text|textbf|textit|mbox|mathrm|mathbf)\{([^{}]*)\}")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_PLAIN_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?$")
_LATEX_FRACTION = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(\d+)\}$")
_PERCENT = re.compile(r"\\?%")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree")


def _tidy(s: str) -> str:
    """Spelling clean-up that keeps the LaTeX parseable (what math-verify gets)."""
    s = str(s).strip()
    boxed = last_boxed(s)
    if boxed is not None and s.startswith(("\\boxed", "\\fbox")):
        s = boxed
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2]
    if s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\left\b|\\right\b|\\displaystyle\b", "", s)
    s = re.sub(r"(?<!\\)\\[!,;:> ]|\\q?quad\b|~", " ", s)  # not a matrix row break (two backslashes)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = _DEGREES.sub("", s)
    s = _PERCENT.sub("", s)
    s = s.strip()
    m = _TEXT_UNITS.match(s)
    if m:
        s = m.group(1)
    s = _TEXT_WRAP.sub(r"\1", s).strip()
    m = _TRAILING_UNITS.match(s)
    if m:
        s = m.group(1)
    s = s.strip().rstrip(".").strip()
    if _THOUSANDS.match(s):  # "1,234" but not "1, 234" (a list)
        s = s.replace(",", "")
    return s


def normalize_answer(s: str | None) -> str:
    """A canonical spelling of a bare answer, for exact comparison: conservative, never changes the value.

    Drops delimiters (`$`, `\\boxed{}`), spacing macros (`\\!`, `\\,`, `\\left`, `\\right`, whitespace),
    `\\dfrac`/`\\tfrac`, text wrappers, trailing units, percent and degree signs, dollar signs and
    thousands commas of plain numbers (so "25\\%" and "25", "30^\\circ" and "30", "1,234" and "1234" match:
    the MATH and GSM8K conventions).
    """
    if s is None:
        return ""
    return re.sub(r"\s+", "", _tidy(s))


def _as_number(normalized: str) -> Fraction | None:
    """Exact value of a plain number (`-12`, `3.50`, `7/2`, `\\frac{7}{2}`), else None."""
    try:
        if _PLAIN_NUMBER.match(normalized):
            return Fraction(normalized)
        m = _LATEX_FRACTION.match(normalized)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _fast_path(a: str, b: str) -> bool | None:
    """True/False when cheap checks settle it, None when sympy has to decide."""
    na, nb = normalize_answer(a), normalize_answer(b)
    if not na or not nb:
        return False
    if na == nb:
        return True
    xa, xb = _as_number(na), _as_number(nb)
    if xa is None or xb is None:
        return None
    if xa == xb:
        return True
    pa, pb = bool(_PERCENT.search(a)), bool(_PERCENT.search(b))
    if pa != pb:  # "25%" also equals 0.25 (math-verify agrees)
        return (xa / 100 == xb) if pa else (xb / 100 == xa)
    return False


# ------------------------------------------------------------------------------------------ time-bounded sympy


class _OutOfTime(BaseException):
    """Raised by the alarm. A BaseException so that sympy's and math-verify's `except Exception` let it through."""


def _signals_usable() -> bool:
    """Signal-based limits work only in the main thread, on platforms with setitimer."""
    return threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")


@contextmanager
def _time_limit(seconds: float):
    """Raise _OutOfTime in this (main) thread after `seconds`; restores any alarm armed outside (pytest-timeout)."""
    state = {"armed": True}

    def on_alarm(signum, frame):
        if state["armed"]:
            raise _OutOfTime

    start = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, on_alarm)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        state["armed"] = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            left = max(previous_delay - (time.monotonic() - start), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its own timeout is off; ponder's limit replaces it (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


_FILTER = _DropTimeoutDisabledWarning()
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_FILTER)


def _math_verify_equal(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    g = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    p = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


_LOADED = False
_WARM_UP_PAIRS = [
    (r"\frac{1}{2}", "0.5"),
    (r"(-\infty, 3] \cup (4, 5)", r"(-\infty,3]\cup(4,5)"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{bmatrix}1&2\\3&4\end{bmatrix}"),
    (r"\{1, 2\}", "(1, 2)"),
    ("x = 5", "5"),
    (r"(x+1)^2", r"x^2 + 2x + 1"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
]


def _ensure_loaded() -> None:
    """Import sympy and build the LaTeX parser once, outside any limit (seconds on a cold Ray worker)."""
    global _LOADED
    if not _LOADED:
        for gold, pred in _WARM_UP_PAIRS:  # each kind pulls in its own part of sympy on first use
            _math_verify_equal(gold, pred)
        _LOADED = True


def _decide_in_main_thread(gold: str, pred: str, timeout: float) -> tuple[bool, bool]:
    """(equal, timed_out), with the signal limit (main thread only). Also what the helper process runs."""
    _ensure_loaded()
    try:
        with _time_limit(timeout):
            return _math_verify_equal(gold, pred), False
    except _OutOfTime:
        return False, True


class _HelperProcess:
    """One spawned process that grades for callers outside the main thread; killed and replaced on a timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = None

    def _get(self):
        with self._lock:
            if self._pool is None:
                pool = multiprocessing.get_context("spawn").Pool(1)
                pool.apply_async(_warm_up).get(timeout=120)  # imports sympy: not counted against a grade
                self._pool = pool
            return self._pool

    def decide(self, gold: str, pred: str, timeout: float) -> tuple[bool, bool]:
        pool = self._get()
        try:
            return pool.apply_async(_decide_in_main_thread, (gold, pred, timeout)).get(timeout=timeout + 2.0)
        except multiprocessing.TimeoutError:
            with self._lock:
                if self._pool is pool:
                    pool.terminate()
                    self._pool = None
            return False, True


def _warm_up() -> None:
    _ensure_loaded()


_HELPER = _HelperProcess()


@dataclass
class GradeStats:
    """How many equivalence checks ran and how many hit the time limit (for reports and the bench)."""

    checks: int = 0
    timeouts: int = 0

    @property
    def timeout_fraction(self) -> float:
        return self.timeouts / self.checks if self.checks else 0.0


_STATS = GradeStats()
_STATS_LOCK = threading.Lock()


def grade_stats() -> GradeStats:
    """Counters of this process since the last reset (grade_batch adds in what its Ray tasks counted)."""
    with _STATS_LOCK:
        return GradeStats(_STATS.checks, _STATS.timeouts)


def reset_grade_stats() -> None:
    with _STATS_LOCK:
        _STATS.checks = _STATS.timeouts = 0


def count_grades(checks: int, timeouts: int) -> None:
    with _STATS_LOCK:
        _STATS.checks += checks
        _STATS.timeouts += timeouts


def _equivalent(gold: str, pred: str, timeout: float) -> bool:
    """Bare gold vs bare prediction: fast paths, then math-verify within `timeout` seconds."""
    fast = _fast_path(gold, pred)
    if fast is not None:
        count_grades(1, 0)
        return fast
    g, p = _tidy(gold), _tidy(pred)
    if _signals_usable():
        equal, timed_out = _decide_in_main_thread(g, p, timeout)
    else:
        equal, timed_out = _HELPER.decide(g, p, timeout)
    count_grades(1, int(timed_out))
    if timed_out:
        log.warning("grading timed out after %.1f s (counted as wrong): gold=%.80r prediction=%.80r", timeout, gold, pred)
    return equal


# ------------------------------------------------------------------------------------------------ public API


def grade(prediction_text: str | None, gold_answer: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Is the final answer of a whole solution equal to the bare gold answer (e.g. `\\frac{14}{3}`)?

    No extractable answer is wrong. A check that runs past `timeout` seconds is wrong and logged.
    """
    pred = extract_answer(prediction_text)
    if pred is None or gold_answer is None:
        return False
    gold = str(gold_answer).strip()
    gold = last_boxed(gold) or gold
    return _equivalent(gold, pred, timeout)


def answers_equivalent(a: str | None, b: str | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Are two bare answers the same (for grouping votes into classes)? Symmetric and cached.

    The cache keeps verdicts that ran out of time too (as False): a pair that hung once would hang again.
    """
    if a is None or b is None:
        return False
    x, y = sorted((str(a).strip(), str(b).strip()))
    return _equivalent_cached(x, y, timeout)


@functools.lru_cache(maxsize=65536)
def _equivalent_cached(x: str, y: str, timeout: float) -> bool:
    return _equivalent(x, y, timeout)
