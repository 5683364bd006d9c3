"""The routing decision and the curves that judge it (numpy only: no torch, transformers or vllm here).

    j = pick(pred, cost, lam)                   # per question: argmax over arms of pred - lam * cost
    points = router_curve(pred, acc, cost_q, arm_cost, lambdas)
    fixed = fixed_arms(acc, cost_q, names); best = oracle(acc, cost_q)
    figures = headline(points, fixed, best)     # router_compute_ratio, oracle_gain_share

Costs are in units of the most expensive arm's mean cost (`normalise`), so lambda is unitless: lambda = 1 trades
the whole of the dearest arm's compute for one unit of accuracy. The cost key (nominal or computed FLOPs, tokens,
seconds) is a recipe key; reports name it. `acc` is the held-out questions' soft labels (each arm's expected
accuracy on the question); ties in the pick go to the cheaper arm.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


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


def fixed_arms(acc: np.ndarray, cost_q: np.ndarray, names: Sequence[str]) -> list[dict]:
    return [{"arm": n, "accuracy": float(acc[:, a].mean()), "mean_cost": float(cost_q[:, a].mean())}
            for a, n in enumerate(names)]


def oracle(acc: np.ndarray, cost_q: np.ndarray) -> dict:
    """Best arm per question (largest label; ties: the cheaper one on that question)."""
    rows = np.arange(len(acc))
    j = np.array([int(np.lexsort((cost_q[q], -acc[q]))[0]) for q in rows], dtype=int)
    return {"arm": "oracle", "accuracy": float(acc[rows, j].mean()), "mean_cost": float(cost_q[rows, j].mean())}


def cost_at_accuracy(points: Sequence[dict], target: float) -> float | None:
    """The router's least mean cost among curve points whose accuracy reaches `target` (None: none reaches it)."""
    ok = [p["mean_cost"] for p in points if p["accuracy"] >= target - 1e-12]
    return min(ok) if ok else None


def headline(points: Sequence[dict], fixed: Sequence[dict], best: dict) -> dict:
    """router_compute_ratio: the router's mean cost at the best fixed arm's accuracy / that arm's mean cost (None
    where the router never reaches it; `_1pt`: at one accuracy point below it); oracle_gain_share: (the router's best accuracy - the cheapest arm's) /
    (the oracle's - the cheapest arm's)."""
    top = max(fixed, key=lambda f: (f["accuracy"], -f["mean_cost"]))
    cheap = min(fixed, key=lambda f: (f["mean_cost"], -f["accuracy"]))
    c = cost_at_accuracy(points, top["accuracy"])
    c1 = cost_at_accuracy(points, top["accuracy"] - 0.01)
    router_best = max(p["accuracy"] for p in points)
    gain = best["accuracy"] - cheap["accuracy"]
    return {
        "best_fixed_arm": top["arm"], "best_fixed_accuracy": top["accuracy"], "best_fixed_cost": top["mean_cost"],
        "cheapest_arm": cheap["arm"], "cheapest_accuracy": cheap["accuracy"],
        "oracle_accuracy": best["accuracy"], "oracle_cost": best["mean_cost"],
        "router_best_accuracy": router_best,
        "router_cost_at_best_fixed": c,
        "router_compute_ratio": None if c is None or top["mean_cost"] <= 0 else c / top["mean_cost"],
        # the same within one accuracy point of the best fixed arm (a softer target, reported beside it)
        "router_compute_ratio_1pt": None if c1 is None or top["mean_cost"] <= 0 else c1 / top["mean_cost"],
        "oracle_gain_share": None if gain <= 0 else (router_best - cheap["accuracy"]) / gain,
    }
