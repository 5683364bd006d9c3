"""The router's evaluation as a table, JSON and a PNG plot (accuracy vs mean compute: router curve(s), fixed arms,
the oracle)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _g(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_eval(results: dict[str, dict]) -> str:
    """`results`: variant name ('filtered', 'unfiltered') -> evaluate()'s dict."""
    first = next(iter(results.values()))
    key = first["cost"]
    lines = [f"held-out questions: {first['questions']}; cost: {key} per question (mean); accuracy: mean soft label",
             "", f"{'arm':<28} {'accuracy':>9} {'mean ' + key:>22}"]
    for f in sorted(first["fixed"], key=lambda f: f["mean_cost"]):
        lines.append(f"{f['arm']:<28} {f['accuracy']:>9.4f} {f['mean_cost']:>22.4g}")
    o = first["oracle"]
    lines.append(f"{'oracle (best arm/question)':<28} {o['accuracy']:>9.4f} {o['mean_cost']:>22.4g}")
    for name, res in results.items():
        h = res["headline"]
        lines += ["", f"router ({name}): {'lambda':>10} {'accuracy':>9} {'mean ' + key:>22} arms"]
        pts = res["curve"]
        step = max(1, len(pts) // 12)
        for p in pts[::step] + ([pts[-1]] if (len(pts) - 1) % step else []):
            lines.append(f"{'':<19}{p['lambda']:>10.3g} {p['accuracy']:>9.4f} {p['mean_cost']:>22.4g} {p['arms_used']}")
        lines.append(f"  router_compute_ratio ({name}) = {_g(h['router_compute_ratio'])}  (router's mean {key} at "
                     f"{h['best_fixed_arm']}'s accuracy {h['best_fixed_accuracy']:.4f} / its {_g(h['best_fixed_cost'])}; "
                     f"within 1 point: {_g(h['router_compute_ratio_1pt'])})")
        lines.append(f"  oracle_gain_share ({name}) = {_g(h['oracle_gain_share'])}  (best router accuracy "
                     f"{h['router_best_accuracy']:.4f}; cheapest arm {h['cheapest_arm']} {h['cheapest_accuracy']:.4f};"
                     f" oracle {h['oracle_accuracy']:.4f})")
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str | Path, title: str = "router") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    key = first["cost"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for f in first["fixed"]:
        ax.scatter(f["mean_cost"], f["accuracy"], s=18, color="0.5")
        ax.annotate(f["arm"], (f["mean_cost"], f["accuracy"]), fontsize=6, color="0.35", xytext=(3, 2),
                    textcoords="offset points")
    o = first["oracle"]
    ax.scatter(o["mean_cost"], o["accuracy"], marker="*", s=140, color="tab:red", label="oracle (best arm per question)")
    for (name, res), color in zip(results.items(), ("tab:blue", "tab:green", "tab:orange")):
        pts = sorted(res["curve"], key=lambda p: p["mean_cost"])
        r = res["headline"]["router_compute_ratio"]
        ax.plot([p["mean_cost"] for p in pts], [p["accuracy"] for p in pts], "-o", ms=3, color=color,
                label=f"router, {name} (compute ratio {_g(r)})")
    ax.set_xscale("log")
    ax.set_xlabel(f"mean {key} per question")
    ax.set_ylabel("accuracy (held-out questions)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_eval(results: dict[str, dict], folder: str | Path, title: str) -> dict[str, Path]:
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    (d / "eval.txt").write_text(format_eval(results) + "\n")
    return {"json": d / "eval.json", "table": d / "eval.txt", "png": plot(results, d / "router.png", title)}
