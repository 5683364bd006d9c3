"""`python -m jobs.bench grading`: batch grading throughput at 1 and 2 Ray workers, and how often the time limit hits.

The table of (solution, gold) pairs is generated: MATH-style boxed answers (integers, fractions, radicals,
intervals, tuples, matrices, expressions, units), GSM8K `#### n` answers, "The answer is" phrasings and
solutions with no answer, about half right in a different spelling and half wrong, plus a few pathological
answers that sympy cannot decide in time (`--hard`, a fraction). Each worker count grades a fresh table of the
same mix (another seed), because math-verify caches parses per process. `agree` is the share of verdicts that
match the generator's ground truth.
"""
from __future__ import annotations

import argparse
import random
import time


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=int, default=2000, help="pairs graded per worker count (default 2000)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds per grade (default 3)")
    parser.add_argument("--hard", type=float, default=0.002, help="fraction of pathological pairs (default 0.002)")
    parser.add_argument("--seed", type=int, default=0)


def _solution(answer: str, rng: random.Random) -> str:
    steps = "\n\n".join(f"Step {i + 1}: we simplify the expression and get {rng.randint(2, 99)}." for i in range(rng.randint(2, 5)))
    style = rng.random()
    if style < 0.6:
        return f"{steps}\n\nTherefore, the final answer is: $\\boxed{{{answer}}}$. I hope it is correct."
    if style < 0.8:
        return f"{steps}\n\nSo the result is $\\boxed{{{answer}}}$."
    return f"{steps}\n\nThe answer is ${answer}$."


def _math_pair(rng: random.Random) -> tuple[str, str, str, bool]:
    """(gold, right spelling, wrong answer) of one kind of MATH answer."""
    a, b, c = rng.randint(2, 60), rng.randint(2, 60), rng.randint(2, 9)
    kind = rng.randrange(9)
    if kind == 0:
        return str(a * b), f"{a * b}", str(a * b + c)
    if kind == 1:
        return f"\\frac{{{a}}}{{{b + a}}}", f"\\dfrac{{{a * c}}}{{{(b + a) * c}}}", f"\\frac{{{a + 1}}}{{{b + a}}}"
    if kind == 2:
        return f"{c}\\sqrt{{{a}}}", f"\\sqrt{{{c * c * a}}}", f"{c + 1}\\sqrt{{{a}}}"
    if kind == 3:
        return f"(-\\infty, {a}]", f"\\left(-\\infty,{a}\\right]", f"(-\\infty, {a})"
    if kind == 4:
        return f"({a}, {b})", f"\\left( {a},{b} \\right)", f"({b + 1}, {a})"
    if kind == 5:
        return (
            f"\\begin{{pmatrix}} {a} & {b} \\\\ {c} & 1 \\end{{pmatrix}}",
            f"\\begin{{bmatrix}}{a}&{b}\\\\{c}&1\\end{{bmatrix}}",
            f"\\begin{{pmatrix}} {a} & {b} \\\\ 1 & {c} \\end{{pmatrix}}",
        )
    if kind == 6:
        return f"x^2 + {2 * a}x + {a * a}", f"(x+{a})^2", f"(x+{a + 1})^2"
    if kind == 7:
        return f"{a}", f"{a}^\\circ", f"{a + c}^\\circ"
    return f"{a}", f"{a}\\text{{ cm}}", f"{a + c}\\text{{ cm}}"


def make_pairs(n: int, seed: int, hard: float) -> list[tuple[str, str, bool]]:
    """(prediction text, gold, truth) triples of the mix described in the module docstring."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < hard:
            e = rng.randint(50, 200)
            out.append((f"So $\\boxed{{2^{{2^{{2^{{{e}}}}}}}}}$.", str(rng.randint(2, 9)), False))
        elif r < 0.6:
            gold, right, wrong = _math_pair(rng)
            ok = rng.random() < 0.5
            out.append((_solution(right if ok else wrong, rng), gold, ok))
        elif r < 0.9:
            x = rng.randint(100, 99999)
            ok = rng.random() < 0.5
            shown = f"{x:,}" if ok else f"{x + rng.randint(1, 50):,}"
            out.append((f"She spends {rng.randint(2, 9)} hours and earns money.\nIn total {shown}.\n#### {shown}", str(x), ok))
        else:
            out.append(("I could not finish this problem; the algebra gets messy.", str(rng.randint(1, 99)), False))
    return out


def _warm_workers(n: int) -> None:
    """Start n worker processes and load sympy in each, so start-up is not timed."""
    import ray

    @ray.remote(num_cpus=1)
    def warm() -> bool:
        from app.grading import grade

        time.sleep(0.5)  # keep this worker busy so that each task lands on its own process
        return grade("\\boxed{\\frac{1}{2}}", "0.5")

    assert all(ray.get([warm.remote() for _ in range(n)]))


def run(args) -> tuple[list[dict], dict]:
    from app.grading import grade_batch, grade_stats, reset_grade_stats
    from jobs.common import init_ray

    init_ray(include_dashboard=False)  # nothing else on the cores being measured
    _warm_workers(2)
    rows, figures = [], {}
    total_checks = total_timeouts = 0
    for i, workers in enumerate((1, 2)):
        table = make_pairs(args.pairs, args.seed + i, args.hard)
        reset_grade_stats()
        start = time.perf_counter()
        verdicts = grade_batch([(p, g) for p, g, _ in table], num_workers=workers, timeout=args.timeout)
        seconds = time.perf_counter() - start
        stats = grade_stats()
        total_checks += stats.checks
        total_timeouts += stats.timeouts
        agree = sum(v == t for v, (_, _, t) in zip(verdicts, table)) / len(table)
        rate = len(table) / seconds
        rows.append(
            {
                "workers": workers,
                "pairs": len(table),
                "seconds": round(seconds, 2),
                "pairs_per_s": rate,
                "timeouts": stats.timeouts,
                "timeout_fraction": stats.timeouts / len(table),
                "agree": agree,
            }
        )
        figures[f"pairs_per_s_{workers}_worker{'s' if workers > 1 else ''}"] = rate
    figures["scaling_2_over_1"] = figures["pairs_per_s_2_workers"] / figures["pairs_per_s_1_worker"]
    figures["timeout_fraction"] = total_timeouts / sum(r["pairs"] for r in rows)
    figures["timeout_fraction_of_checks"] = total_timeouts / total_checks if total_checks else 0.0
    figures["agree"] = sum(r["agree"] for r in rows) / len(rows)
    figures["timeout_s"] = args.timeout
    return rows, figures
