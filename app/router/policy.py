"""The routing decision and the held-out figures that judge it (numpy only: no torch, transformers or vllm here).

    j = pick(pred, cost, lam)                   # per question: argmax over arms of pred - lam * cost
    fig = assess(names, arm_cost, lambdas, val=(pred, acc, cost_q), test=(pred, acc, cost_q), select=(acc, cost_q))

Costs are in units of the most expensive arm's mean cost (`normalise`), so lambda is unitless: lambda = 1 trades
the whole of the dearest arm's compute for one unit of accuracy. The cost key (nominal or computed FLOPs, tokens,
seconds) is a recipe key; reports name it. `acc` is soft labels (each arm's expected accuracy on a question); ties
in the pick go to the cheaper arm.

What `assess` reports, and why each figure is measured the way it is (no choice sees a test question):

- **lambda** is chosen on the validation questions: the grid point with the highest validation accuracy (ties: the
  cheaper point). The router's accuracy and mean cost are then read on the test questions at that lambda. (The
  router's best point over a lambda grid read on test would pick the luckiest lambda of the test set itself.)
- **The best fixed arm** is the arm with the highest mean label on the train + validation questions (ties: the
  cheaper), reported with its test accuracy and cost; it, not greedy or the cheapest arm, is the baseline for
  gains: running it on every question is what a user does without a router.
- **oracle_gain_share** = (router - best fixed arm) / (oracle - best fixed arm), test accuracies; 0 for a router
  that always picks the best fixed arm, negative when it is worse. The oracle (the best arm per question) is taken
  over distinct arms only: `app.router.data` gives a method one n = 1 arm, since every rule at n = 1 is one
  procedure and copies with independent bootstrap noise would raise the per-question maximum by noise alone.
- **compute_ratio** = the router's mean test cost / the least mean test cost of any fixed arm whose test accuracy
  reaches the router's test accuracy (the fixed arms' lower envelope, a step function as Snell et al.'s C(a); None
  when no fixed arm reaches it). **compute_ratio_mixed** compares with the lower convex envelope instead: a random
  mixture of two fixed arms per question is also a query-blind policy, and it interpolates cost and accuracy
  linearly, so this is the stricter baseline. Both are at matched held-out accuracy, so neither side gets a
  discount the other does not.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

EPS = 1e-12


def normalise(arm_cost: np.ndarray) -> tuple[np.ndarray, float]:
    """(cost / scale, scale) with scale the largest arm cost (1 when all are 0)."""
    c = np.asarray(arm_cost, dtype=np.float64)
    scale = float(c.max()) if c.size and c.max() > 0 else 1.0
    return c / scale, scale


def pick(pred: np.ndarray, cost: np.ndarray, lam: float, allowed: np.ndarray | None = None) -> np.ndarray:
    """[Q] arm index maximising pred - lam * cost (pred [Q, A] or [A]; cost [A], normalised); ties -> cheaper arm.

    `allowed`: [A] bool, the arms the caller lets the router choose from."""
    pred = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    cost = np.asarray(cost, dtype=np.float64)
    util = pred - lam * cost[None, :]
    if allowed is not None:
        util = np.where(np.asarray(allowed, dtype=bool)[None, :], util, -np.inf)
    order = np.argsort(cost, kind="stable")            # cheaper first, so argmax's first-max rule prefers it
    return order[np.argmax(util[:, order], axis=1)]


def default_lambdas(num: int = 50, low: float = 1e-4, high: float = 10.0) -> list[float]:
    return [0.0] + [float(x) for x in np.logspace(np.log10(low), np.log10(high), num)]


def router_curve(pred: np.ndarray, acc: np.ndarray, cost_q: np.ndarray, arm_cost: np.ndarray,
                 lambdas: Sequence[float]) -> list[dict]:
    """Accuracy and mean cost of the router's picks on each question, for each lambda."""
    norm, _ = normalise(arm_cost)
    rows = np.arange(len(acc))
    out = []
    for lam in lambdas:
        j = pick(pred, norm, lam)
        out.append({"lambda": float(lam), "accuracy": float(acc[rows, j].mean()),
                    "mean_cost": float(cost_q[rows, j].mean()),
                    "arms_used": int(len(set(j.tolist())))})
    return out


def choose_lambda(val_curve: Sequence[dict]) -> int:
    """Index of the validation curve's point with the highest accuracy (ties: the lower mean cost, then the larger
    lambda)."""
    return max(range(len(val_curve)), key=lambda i: (round(val_curve[i]["accuracy"], 12),
                                                     -val_curve[i]["mean_cost"], val_curve[i]["lambda"]))


def fixed_arms(acc: np.ndarray, cost_q: np.ndarray, names: Sequence[str]) -> list[dict]:
    return [{"arm": n, "accuracy": float(acc[:, a].mean()), "mean_cost": float(cost_q[:, a].mean())}
            for a, n in enumerate(names)]


def best_fixed(acc: np.ndarray, cost_q: np.ndarray) -> int:
    """The arm with the highest mean label on these questions (ties: the lower mean cost)."""
    m, c = acc.mean(axis=0), cost_q.mean(axis=0)
    return int(np.lexsort((c, -np.round(m, 12)))[0])


def oracle(acc: np.ndarray, cost_q: np.ndarray) -> dict:
    """Best arm per question (largest label; ties: the cheaper one on that question). Give it distinct arms only."""
    rows = np.arange(len(acc))
    j = np.array([int(np.lexsort((cost_q[q], -acc[q]))[0]) for q in rows], dtype=int)
    return {"arm": "oracle", "accuracy": float(acc[rows, j].mean()), "mean_cost": float(cost_q[rows, j].mean())}


def envelope_cost(fixed: Sequence[dict], target: float, mixed: bool = False) -> float | None:
    """The least mean cost at which fixed arms reach accuracy `target`: one arm (`mixed=False`), or a random
    mixture of two (the lower convex envelope). None where no fixed arm reaches it."""
    pts = [(f["mean_cost"], f["accuracy"]) for f in fixed]
    best = [c for c, a in pts if a >= target - EPS]
    if not best:
        return None
    out = min(best)
    if mixed:
        for c1, a1 in pts:
            for c2, a2 in pts:
                if a1 < target - EPS < target + EPS < a2:      # mix p of arm 2 and 1 - p of arm 1 to hit target
                    p = (target - a1) / (a2 - a1)
                    out = min(out, (1 - p) * c1 + p * c2)
    return out


def _ratio(cost: float, base: float | None) -> float | None:
    return None if base is None or base <= 0 else cost / base


def assess(names: Sequence[str], arm_cost: np.ndarray, lambdas: Sequence[float],
           val: tuple[np.ndarray, np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray, np.ndarray],
           select: tuple[np.ndarray, np.ndarray]) -> dict:
    """The held-out figures (the module doc defines each). `val`, `test`: (pred, acc, cost_q), each [Q, A], of the
    validation and the test questions; `select`: (acc, cost_q) of the questions the best fixed arm is chosen on
    (train + validation); `arm_cost`: [A] the costs the router prices (measured on its training questions)."""
    lambdas = list(lambdas)
    val_curve = router_curve(*val, arm_cost, lambdas)
    k = choose_lambda(val_curve)
    test_curve = router_curve(*test, arm_cost, lambdas)
    point = test_curve[k]
    _, acc, cost_q = test
    fixed = fixed_arms(acc, cost_q, names)
    b = best_fixed(*select)
    top = fixed[b]
    best = oracle(acc, cost_q)
    greedy = next((f for f in fixed if f["arm"].startswith("greedy/")), None)
    gain = best["accuracy"] - top["accuracy"]
    step, mix = envelope_cost(fixed, point["accuracy"]), envelope_cost(fixed, point["accuracy"], mixed=True)
    matched = min((f for f in fixed if f["accuracy"] >= point["accuracy"] - EPS), key=lambda f: f["mean_cost"],
                  default=None)
    headline = {
        "test_questions": int(len(acc)), "val_questions": int(len(val[1])), "select_questions": int(len(select[0])),
        "lambda": point["lambda"], "val_accuracy": val_curve[k]["accuracy"],
        "router_accuracy": point["accuracy"], "router_cost": point["mean_cost"], "router_arms_used": point["arms_used"],
        "best_fixed_arm": top["arm"], "best_fixed_select_accuracy": float(select[0][:, b].mean()),
        "best_fixed_accuracy": top["accuracy"], "best_fixed_cost": top["mean_cost"],
        "router_minus_best_fixed": point["accuracy"] - top["accuracy"],
        "oracle_accuracy": best["accuracy"], "oracle_cost": best["mean_cost"],
        "greedy_accuracy": greedy and greedy["accuracy"], "greedy_cost": greedy and greedy["mean_cost"],
        "oracle_gain_share": None if gain <= EPS else (point["accuracy"] - top["accuracy"]) / gain,
        "matched_fixed_arm": matched and matched["arm"],
        "compute_ratio": _ratio(point["mean_cost"], step),
        "compute_ratio_mixed": _ratio(point["mean_cost"], mix),
    }
    return {"headline": headline, "val_curve": val_curve, "curve": test_curve, "fixed": fixed, "oracle": best}
