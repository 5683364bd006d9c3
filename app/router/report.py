"""The router's evaluation as a table, JSON and a PNG plot: the held-out figures of `app.router.policy.assess`
(lambda chosen on validation, the best fixed arm chosen on train + val, the compute ratio at matched accuracy),
with the test-set size beside them, and the plot of accuracy vs mean compute."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# the figures `ponder route eval` prints last and writes as eval.json's "figures" (the main router's)
FIGURES = ("test_questions", "val_questions", "lambda", "router_accuracy", "router_cost", "best_fixed_arm",
           "best_fixed_accuracy", "best_fixed_cost", "router_minus_best_fixed", "oracle_accuracy", "oracle_cost",
           "greedy_accuracy", "greedy_cost", "oracle_gain_share", "matched_fixed_arm", "compute_ratio",
           "compute_ratio_mixed")


def _g(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def figures(results: dict[str, dict], main: str, cost: str) -> dict:
    """The main router's headline figures, plus each variant's accuracy, gain share and compute ratio by name."""
    main = main if main in results else next(iter(results))
    fig = {k: results[main]["headline"][k] for k in FIGURES}
    for name, res in results.items():
        h = res["headline"]
        keys = ("router_accuracy", "router_cost", "oracle_gain_share", "compute_ratio")
        fig.update({f"{k}_{name}": h[k] for k in keys})
    fig.update(router=main, cost=cost)
    return fig


def format_eval(results: dict[str, dict]) -> str:
    """`results`: variant name ('filtered', 'unfiltered') -> router.evaluate()'s dict."""
    first = next(iter(results.values()))
    h0, key = first["headline"], first["cost"]
    lines = [f"test questions: {h0['test_questions']} (one question = {100 / max(1, h0['test_questions']):.2g} "
             f"accuracy points); lambda chosen on {h0['val_questions']} validation questions; best fixed arm chosen on "
             f"{h0['select_questions']} train + val questions; cost: {key} per question (mean); accuracy: mean soft "
             f"label", "", f"{'arm (test)':<28} {'accuracy':>9} {'mean ' + key:>22}"]
    for f in sorted(first["fixed"], key=lambda f: f["mean_cost"]):
        mark = "  <- best fixed arm (train + val)" if f["arm"] == h0["best_fixed_arm"] else ""
        lines.append(f"{f['arm']:<28} {f['accuracy']:>9.4f} {f['mean_cost']:>22.4g}{mark}")
    o = first["oracle"]
    lines.append(f"{'oracle (best arm/question)':<28} {o['accuracy']:>9.4f} {o['mean_cost']:>22.4g}")
    for name, res in results.items():
        h = res["headline"]
        lines += ["", f"router ({name}) at lambda {h['lambda']:.3g} (validation accuracy {h['val_accuracy']:.4f}): "
                      f"test accuracy {h['router_accuracy']:.4f}, mean {key} {h['router_cost']:.4g}, "
                      f"{h['router_arms_used']} arms used",
                  f"  vs best fixed arm {h['best_fixed_arm']}: {h['best_fixed_accuracy']:.4f} at "
                  f"{h['best_fixed_cost']:.4g} (router {h['router_minus_best_fixed']:+.4f})",
                  f"  oracle_gain_share = {_g(h['oracle_gain_share'])}  ((router - best fixed) / (oracle "
                  f"{h['oracle_accuracy']:.4f} - best fixed)); greedy {_g(h['greedy_accuracy'])} at "
                  f"{_g(h['greedy_cost'])}",
                  f"  compute_ratio = {_g(h['compute_ratio'])}  (router's mean {key} / the cheapest fixed arm reaching "
                  f"its test accuracy: {_g(h['matched_fixed_arm'])}); against mixtures of two fixed arms: "
                  f"{_g(h['compute_ratio_mixed'])}"]
    return "\n".join(lines)


def plot(results: dict[str, dict], path: str | Path, title: str = "router") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(results.values()))
    key, h0 = first["cost"], first["headline"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    env = sorted(first["fixed"], key=lambda f: f["mean_cost"])
    xs, ys, top = [], [], -1.0
    for f in env:                                       # the fixed arms' lower envelope (a step function)
        if f["accuracy"] > top:
            if xs:                                      # across at the last level, then up to this arm
                xs.append(f["mean_cost"]), ys.append(top)
            xs.append(f["mean_cost"]), ys.append(f["accuracy"])
            top = f["accuracy"]
    ax.plot(xs, ys, "-", color="0.6", lw=1, label="fixed arms' lower envelope (test)")
    for f in first["fixed"]:
        best = f["arm"] == h0["best_fixed_arm"]
        ax.scatter(f["mean_cost"], f["accuracy"], s=40 if best else 18, color="black" if best else "0.5",
                   marker="s" if best else "o")
        ax.annotate(f["arm"], (f["mean_cost"], f["accuracy"]), fontsize=6, color="0.35", xytext=(3, 2),
                    textcoords="offset points")
    o = first["oracle"]
    ax.scatter(o["mean_cost"], o["accuracy"], marker="*", s=140, color="tab:red",
               label="oracle (best arm per question)")
    for (name, res), color in zip(results.items(), ("tab:blue", "tab:green", "tab:orange")):
        pts = sorted(res["curve"], key=lambda p: p["mean_cost"])
        h = res["headline"]
        ax.plot([p["mean_cost"] for p in pts], [p["accuracy"] for p in pts], "-", lw=1, alpha=0.5, color=color,
                label=f"router, {name}: test curve over lambda (descriptive)")
        ax.scatter(h["router_cost"], h["router_accuracy"], s=90, marker="D", color=color, zorder=5,
                   label=f"router, {name}, lambda {h['lambda']:.3g} chosen on val (ratio {_g(h['compute_ratio'])})")
    ax.set_xscale("log")
    ax.set_xlabel(f"mean {key} per question")
    ax.set_ylabel(f"accuracy ({h0['test_questions']} held-out questions)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def write_eval(results: dict[str, dict], figs: dict, folder: str | Path, title: str) -> dict[str, Path]:
    """eval.json ({"figures": the main figures, "variants": every router's full result}), eval.txt, router.png."""
    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / "eval.json").write_text(json.dumps({"figures": figs, "variants": results}, indent=1) + "\n")
    (d / "eval.txt").write_text(format_eval(results) + "\n")
    return {"json": d / "eval.json", "table": d / "eval.txt", "png": plot(results, d / "router.png", title)}
