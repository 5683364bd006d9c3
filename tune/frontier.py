"""The compute-optimal frontier of a sweep (`ponder frontier SWEEP_DIR`, also run at the end of `ponder tune`).

Reads every trial's records under SWEEP_DIR/trials (the `ponder search` format; `tune.sweep` writes them) and, per
difficulty bin (the problems' `level`: toy, MATH; or `oracle`: quantiles of the policy's own pass@1 on the
problem, Snell et al.'s oracle difficulty, estimated from the sweep's largest independent-sample run) and over all
problems:

- accuracy against compute for every strategy (method + parameters + selection rule; one curve each, N along it),
  compute being the mean per problem, nominal FLOPs (what the papers count) and computed FLOPs (what the engines
  ran after their prefix caches) both;
- the compute-optimal strategy per bin and budget N (highest accuracy at that N; ties: less compute), and the
  frontier: the points no cheaper point beats;
- `compute_saving`: take the accuracy the baseline (best-of-N, weighted) reaches at its largest budget; in each
  bin, the least compute any strategy at any N needs to reach it there, against the baseline's; overall, the
  least compute of a per-bin choice (each bin its own strategy and N, the bin known, as Snell et al.'s
  compute-optimal scaling) whose overall accuracy reaches the baseline's overall accuracy. Always >= 1 (the
  baseline is a candidate); `compute_saving_single` is the same with one strategy for every bin.

Writes frontier.json, frontier.md (the tables, also printed) and frontier_nominal.png / frontier_computed.png
(one panel per bin plus the overall frontier; log compute axis).

Best-of-N and majority run once at their largest N (`subsampled` in trial.json, `tune.sweep.SUBSAMPLED`): their accuracy at n is the records'
selection at n (the first n completions), and their compute at n is estimated from the same run: the generated
tokens of the first n completions exactly, the prompt once (one request), PRM tokens as the first n completions'
share of them, FLOPs and seconds in proportion.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from app.search.results import read_run

COMPUTE_KEYS = ("flops", "computed_flops", "prompt_tokens", "generated_tokens", "prm_tokens", "computed_prompt_tokens",
                "computed_generated_tokens", "computed_prm_tokens", "seconds")
KINDS = {"nominal": "flops", "computed": "computed_flops"}
RULE_ORDER = ("naive", "weighted", "maj")


# ---------------------------------------------------------------- one trial


def _get(c: dict, k: str) -> float | None:
    v = c.get(k)
    return None if v is None else float(v)


def compute_at(rec: dict, n: int) -> dict[str, float | None]:
    """A record's compute (the COMPUTE_KEYS; None where it does not report one), at n <= its N completions."""
    c = rec.get("compute") or {}
    vals = {k: _get(c, k) for k in COMPUTE_KEYS}
    trajs = rec.get("trajectories") or []
    N = len(trajs) or int(rec.get("N") or 1)
    if n >= N:
        return vals
    toks = [int(t.get("tokens") or 0) for t in trajs]
    gen_N, gen_n = sum(toks), sum(toks[:n])
    gshare = gen_n / gen_N if gen_N else n / N
    prompt = _get(c, "prompt_tokens") or 0.0
    pshare = (prompt + gen_n) / (prompt + gen_N) if prompt + gen_N else n / N
    prm = _get(c, "prm_tokens") or 0.0
    q = max(0.0, prm - gen_N) / N  # the question's PRM tokens per completion
    rshare = (n * q + gen_n) / (N * q + gen_N) if N * q + gen_N else n / N
    out = dict(vals)
    out["generated_tokens"] = float(gen_n)
    policy = (_get(c, "policy_flops") or 0.0) * pshare
    prm_flops = (_get(c, "prm_flops") or 0.0) * rshare
    out["prm_tokens"] = prm * rshare
    out["flops"] = policy + prm_flops
    if vals["computed_flops"] is not None:
        cprompt = _get(c, "computed_prompt_tokens") or 0.0
        cgen = _get(c, "computed_generated_tokens") or 0.0
        cshare = (cprompt + cgen * gshare) / (cprompt + cgen) if cprompt + cgen else n / N
        out["computed_generated_tokens"] = cgen * gshare
        out["computed_prm_tokens"] = (_get(c, "computed_prm_tokens") or 0.0) * rshare
        out["computed_flops"] = ((_get(c, "computed_policy_flops") or 0.0) * cshare
                                 + (_get(c, "computed_prm_flops") or 0.0) * rshare)
    full = vals["flops"] or 0.0
    if vals["seconds"] is not None:
        out["seconds"] = vals["seconds"] * (out["flops"] / full if full else n / N)
    return out


def correct_at(rec: dict, n: int) -> dict[str, bool]:
    """Each selection rule's correctness at n (the largest reported n <= n where n itself is not reported)."""
    out = {}
    for rule, by_n in (rec.get("selection") or {}).items():
        ns = sorted(int(k) for k in by_n)
        below = [m for m in ns if m <= n]
        if below:
            out[rule] = bool(by_n[str(below[-1])].get("correct"))
    return out


def read_trial(trial_dir: str | Path) -> dict:
    """A trial's info (trial.json), its problems (id -> level), failures, and per N the per-problem rows:
    {"info", "plan", "failed", "rows": {N: {id: {"correct": {rule: bool}, "compute": {...}}}}}."""
    d = Path(trial_dir)
    info_path = d / "trial.json"
    records, plan, failed = read_run(d)
    info = json.loads(info_path.read_text()) if info_path.is_file() else {
        "name": d.name, "strategy": d.name, "method": records[0]["method"] if records else d.name,
        "N": max((int(r.get("N") or 1) for r in records), default=1), "budgets": None}
    budgets = info.get("budgets") or [info["N"]]
    plan = plan if plan is not None else {r["id"]: r.get("level") for r in records}
    rows = {int(n): {r["id"]: {"correct": correct_at(r, int(n)), "compute": compute_at(r, int(n))} for r in records}
            for n in budgets}
    return {"info": info, "plan": plan, "failed": set(failed), "rows": rows, "records": records}


def summarize_rows(rows: dict[str, dict], ids: Iterable[str], failed: set) -> dict:
    """Accuracy per rule over `ids` (a problem with no row is wrong) and mean compute over the rows among them."""
    ids = list(ids)
    have = [rows[i] for i in ids if i in rows]
    rules = sorted({r for row in have for r in row["correct"]}, key=RULE_ORDER.index)
    acc = {r: (sum(1 for row in have if row["correct"].get(r)) / len(ids) if ids else 0.0) for r in rules}
    compute: dict[str, float | None] = {}
    for k in COMPUTE_KEYS:
        vals = [row["compute"][k] for row in have if row["compute"].get(k) is not None]
        compute[k] = sum(vals) / len(vals) if vals else None
    nf = len(failed & set(ids) - {i for i in ids if i in rows})
    return {"problems": len(ids), "solved": len(have), "failed": nf, "missing": len(ids) - len(have) - nf,
            "accuracy": acc, "compute": compute}


def trial_points(trial_dir: str | Path) -> list[dict]:
    """Per N the trial reports: counts, accuracy per rule (overall and per level) and mean compute per problem."""
    t = read_trial(trial_dir)
    levels: dict[Any, list[str]] = {}
    for pid, lvl in t["plan"].items():
        levels.setdefault(lvl, []).append(pid)
    out = []
    for n, rows in sorted(t["rows"].items()):
        s = summarize_rows(rows, t["plan"], t["failed"])
        s["N"] = n
        s["by_level"] = {lvl: summarize_rows(rows, ids, t["failed"])["accuracy"]
                         for lvl, ids in sorted(levels.items(), key=lambda kv: str(kv[0]))}
        out.append(s)
    return out


# ---------------------------------------------------------------- the sweep


def _trial_dirs(sweep_dir: Path) -> list[Path]:
    """The trials in the sweep's order (sweep.json), else every folder under trials/ with records."""
    doc = sweep_dir / "sweep.json"
    if doc.is_file():
        names = [t["name"] for t in json.loads(doc.read_text())["trials"]]
        return [sweep_dir / "trials" / n for n in names if (sweep_dir / "trials" / n).is_dir()]
    return sorted(p for p in (sweep_dir / "trials").glob("*") if p.is_dir())


def sweep_options(sweep_dir: Path) -> dict:
    """The recipe's `frontier:` section, from sweep.json (defaults where there is none)."""
    doc = sweep_dir / "sweep.json"
    if doc.is_file():
        return dict(json.loads(doc.read_text()).get("recipe", {}).get("frontier") or {})
    return {}


def _oracle_bins(trials: list[dict], plan: dict[str, Any], k: int) -> dict[str, str]:
    """Problem -> oracle bin "1".."k" (1 = easiest): quantiles of pass@1 over the completions of the trial with the
    most independent samples (best-of-N / majority at their largest N)."""
    cands = [t for t in trials if t["info"].get("subsampled")]
    if not cands:
        raise ValueError("oracle bins need a best_of_n or majority trial in the sweep (its samples estimate each "
                         "problem's pass@1); use bins: level")
    src = max(cands, key=lambda t: int(t["info"].get("N") or 0))
    p1 = {pid: 0.0 for pid in plan}
    for rec in src["records"]:
        trajs = rec.get("trajectories") or []
        if trajs:
            p1[rec["id"]] = sum(1 for x in trajs if x.get("correct")) / len(trajs)
    order = sorted(plan, key=lambda pid: (-p1.get(pid, 0.0), pid))
    k = max(1, min(k, len(order)))
    return {pid: str(1 + i * k // len(order)) for i, pid in enumerate(order)}


def _pareto(points: list[dict], key: str) -> list[dict]:
    """The points that no point of less (or equal) compute beats on accuracy, by compute."""
    pts = sorted((p for p in points if p.get(key) is not None), key=lambda p: (p[key], -p["accuracy"]))
    out, best = [], -1.0
    for p in pts:
        if p["accuracy"] > best + 1e-12:
            out.append(p)
            best = p["accuracy"]
    return out


def _per_bin_optimum(bins: dict[str, list[dict]], sizes: dict[str, int], key: str, target_correct: float) -> dict | None:
    """The per-bin choice (one point per bin) with least total compute whose correct count reaches the target:
    an exact merge of the bins' Pareto sets (states: (correct, compute, choice))."""
    total = sum(sizes.values())
    states: list[tuple[float, float, dict]] = [(0.0, 0.0, {})]
    for b, pts in bins.items():
        cand = _pareto(pts, key)
        if not cand:
            return None
        merged = [(c + round(p["accuracy"] * sizes[b]), w + p[key] * sizes[b], {**ch, b: p})
                  for c, w, ch in states for p in cand]
        merged.sort(key=lambda s: (s[1], -s[0]))
        states, best = [], -1.0
        for s in merged:
            if s[0] > best:
                states.append(s)
                best = s[0]
    ok = [s for s in states if s[0] >= target_correct - 1e-9]
    if not ok:
        return None
    c, w, choice = min(ok, key=lambda s: s[1])
    return {"accuracy": c / total, "compute": w / total,
            "choice": {b: {"strategy": p["strategy"], "N": p["N"], "accuracy": p["accuracy"], "compute": p[key]}
                       for b, p in choice.items()}}


def build(sweep_dir: str | Path, bins: str | None = None, oracle_bins: int | None = None,
          rules: list[str] | None = None, baseline: str | None = None, baseline_rule: str | None = None) -> dict:
    """The frontier data (what frontier.json holds); options default to the sweep recipe's `frontier:` section."""
    sweep_dir = Path(sweep_dir)
    opts = sweep_options(sweep_dir)
    bins = bins or opts.get("bins", "level")
    oracle_bins = oracle_bins or opts.get("oracle_bins", 5)
    rules = rules or opts.get("rules", ["weighted"])
    baseline = baseline or opts.get("baseline", "best_of_n")
    baseline_rule = baseline_rule or opts.get("baseline_rule", "weighted")
    dirs = _trial_dirs(sweep_dir)
    if not dirs:
        raise FileNotFoundError(f"{sweep_dir} holds no trials (trials/*/); run `ponder tune` first")
    trials = [read_trial(d) for d in dirs]
    plan: dict[str, Any] = {}
    failed: set = set()
    for t in trials:
        plan.update(t["plan"])
        failed |= t["failed"]
    if bins == "oracle":
        of = _oracle_bins(trials, plan, oracle_bins)
        bin_of = {pid: f"oracle {b}" for pid, b in of.items()}
    else:
        bin_of = {pid: f"level {lvl}" for pid, lvl in plan.items()}
    names = sorted(set(bin_of.values()), key=lambda s: (len(s), s))
    members = {"all": list(plan), **{b: [p for p in plan if bin_of[p] == b] for b in names}}

    # points: one per (strategy + rule, N), per bin
    points: dict[str, list[dict]] = {b: [] for b in members}
    strategies: list[str] = []
    base_label = None
    for t in trials:
        info = t["info"]
        have = sorted({r for rows in t["rows"].values() for row in rows.values() for r in row["correct"]},
                      key=RULE_ORDER.index)
        use = [r for r in rules if r in have] or have
        if info.get("method") == baseline and baseline_rule in have and base_label is None:
            base_label = f"{info['strategy']} {baseline_rule}"
            if baseline_rule not in use:
                use.append(baseline_rule)
        for rule in use:
            label = f"{info['strategy']} {rule}"
            if label not in strategies:
                strategies.append(label)
            for n, rows in t["rows"].items():
                for b, ids in members.items():
                    s = summarize_rows(rows, ids, t["failed"])
                    points[b].append({"strategy": label, "method": info.get("method"), "rule": rule, "N": n,
                                      "accuracy": s["accuracy"].get(rule, 0.0), "trial": info.get("name"),
                                      **{k: s["compute"][k] for k in COMPUTE_KEYS}})
    sizes = {b: len(ids) for b, ids in members.items()}
    out: dict[str, Any] = {"sweep": str(sweep_dir), "bins": bins, "bin_names": ["all", *names], "sizes": sizes,
                           "strategies": strategies, "baseline": base_label, "points": points, "kinds": {}}
    for kind, key in KINDS.items():
        if not any(p.get(key) is not None for p in points["all"]):
            continue
        k_out: dict[str, Any] = {"key": key, "bins": {}}
        for b in members:
            pts = [p for p in points[b] if p.get(key) is not None]
            best: dict[int, dict] = {}
            for p in pts:
                cur = best.get(p["N"])
                if cur is None or (p["accuracy"], -p[key]) > (cur["accuracy"], -cur[key]):
                    best[p["N"]] = p
            entry: dict[str, Any] = {
                "optimal_by_budget": {str(n): {"strategy": p["strategy"], "accuracy": p["accuracy"], "compute": p[key]}
                                      for n, p in sorted(best.items())},
                "frontier": [{"strategy": p["strategy"], "N": p["N"], "accuracy": p["accuracy"], "compute": p[key]}
                             for p in _pareto(pts, key)],
            }
            base = [p for p in pts if p["strategy"] == base_label]
            if base:
                bp = max(base, key=lambda p: p["N"])
                reach = [p for p in pts if p["accuracy"] >= bp["accuracy"] - 1e-12]
                op = min(reach, key=lambda p: (p[key], -p["accuracy"]))
                entry["baseline"] = {"strategy": bp["strategy"], "N": bp["N"], "accuracy": bp["accuracy"],
                                     "compute": bp[key]}
                entry["optimal"] = {"strategy": op["strategy"], "N": op["N"], "accuracy": op["accuracy"],
                                    "compute": op[key]}
                entry["compute_saving"] = bp[key] / op[key] if op[key] else None
            k_out["bins"][b] = entry
        allb = k_out["bins"]["all"]
        if "baseline" in allb and names:
            allb["compute_saving_single"] = allb.get("compute_saving")
            per = _per_bin_optimum({b: [p for p in points[b] if p.get(key) is not None] for b in names},
                                   {b: sizes[b] for b in names}, key, allb["baseline"]["accuracy"] * sizes["all"])
            if per is not None:
                allb["per_bin_optimal"] = per
                allb["compute_saving"] = allb["baseline"]["compute"] / per["compute"] if per["compute"] else None
        out["kinds"][kind] = k_out
    out["counts"] = {"problems": len(plan), "failed": len(failed)}
    return out


# ---------------------------------------------------------------- tables and plots


def _flops(x: float | None) -> str:
    if x is None:
        return "-"
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def format_tables(data: dict) -> str:
    """frontier.md: per compute kind, compute_saving per bin, the compute-optimal strategy per bin and N; then
    every strategy's accuracy and compute."""
    bins = data["bin_names"]
    sizes = ", ".join(f"{b}: {data['sizes'][b]}" for b in bins)
    lines = [f"# Compute-optimal frontier: {data['sweep']}", "",
             f"{data['counts']['problems']} problems, bins by {data['bins']} "
             f"({sizes}); compute is the mean per problem "
             "(FLOPs; nominal as the papers count, computed after the engines' prefix caches); "
             f"baseline: {data['baseline'] or '(none in the sweep)'} at its largest N."]
    for kind, k in data["kinds"].items():
        lines += ["", f"## compute_saving ({kind} FLOPs)", ""]
        rows = []
        for b in bins:
            e = k["bins"][b]
            if "baseline" not in e:
                continue
            bp = e["baseline"]
            if b == "all" and "per_bin_optimal" in e:
                per = e["per_bin_optimal"]
                how = "per-bin: " + "; ".join(f"{bb} {c['strategy']} N={c['N']}" for bb, c in per["choice"].items())
                rows.append([b, f"{bp['accuracy']:.3f}", _flops(bp["compute"]), how, f"{per['accuracy']:.3f}",
                             _flops(per["compute"]), f"{e['compute_saving']:.2f}x" if e.get("compute_saving") else "-"])
                if e.get("compute_saving_single"):
                    op = e["optimal"]
                    rows.append([f"{b} (one strategy)", f"{bp['accuracy']:.3f}", _flops(bp["compute"]),
                                 f"{op['strategy']} N={op['N']}", f"{op['accuracy']:.3f}", _flops(op["compute"]),
                                 f"{e['compute_saving_single']:.2f}x"])
                continue
            op = e["optimal"]
            rows.append([b, f"{bp['accuracy']:.3f}", _flops(bp["compute"]), f"{op['strategy']} N={op['N']}",
                         f"{op['accuracy']:.3f}", _flops(op["compute"]),
                         f"{e['compute_saving']:.2f}x" if e.get("compute_saving") else "-"])
        if rows:
            lines += _table(["bin", "baseline acc", "baseline FLOPs", "compute-optimal", "acc", "FLOPs",
                             "compute_saving"], rows)
        else:
            lines.append("(no baseline run in the sweep)")
        lines += ["", f"## compute-optimal strategy per bin and budget ({kind} FLOPs)", ""]
        ns = sorted({int(n) for b in bins for n in k["bins"][b]["optimal_by_budget"]})
        rows = []
        for n in ns:
            row = [str(n)]
            for b in bins:
                o = k["bins"][b]["optimal_by_budget"].get(str(n))
                row.append(f"{o['strategy']} {o['accuracy']:.3f} ({_flops(o['compute'])})" if o else "-")
            rows.append(row)
        lines += _table(["N", *bins], rows)
    lines += ["", "## every strategy", ""]
    rows = []
    allp = data["points"]["all"]
    for label in data["strategies"]:
        for p in sorted((p for p in allp if p["strategy"] == label), key=lambda p: p["N"]):
            accs = [f"{q['accuracy']:.3f}" for b in bins for q in data["points"][b]
                    if q["strategy"] == label and q["N"] == p["N"]]
            rows.append([label, str(p["N"]), *accs, _flops(p.get("flops")), _flops(p.get("computed_flops")),
                         "-" if p.get("generated_tokens") is None else f"{p['generated_tokens']:.0f}",
                         "-" if p.get("prm_tokens") is None else f"{p['prm_tokens']:.0f}",
                         "-" if p.get("seconds") is None else f"{p['seconds']:.2f}"])
    lines += _table(["strategy", "N", *[f"acc {b}" for b in bins], "nominal FLOPs", "computed FLOPs",
                     "generated tok", "PRM tok", "s"], rows)
    return "\n".join(lines) + "\n"


def plot(data: dict, out_dir: str | Path) -> list[Path]:
    """One PNG per compute kind: one panel per bin plus the overall one, a curve per strategy (log compute axis),
    the frontier dashed, the baseline's point ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    paths = []
    bins = data["bin_names"]
    cmap = plt.get_cmap("tab20" if len(data["strategies"]) > 10 else "tab10")
    colors = {s: cmap(i % cmap.N) for i, s in enumerate(data["strategies"])}
    for kind, k in data["kinds"].items():
        key = k["key"]
        cols = min(3, len(bins))
        rows = math.ceil(len(bins) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows + 1.2), squeeze=False)
        for ax, b in zip(axes.flat, bins):
            for label in data["strategies"]:
                pts = sorted((p for p in data["points"][b] if p["strategy"] == label and p.get(key)),
                             key=lambda p: p["N"])
                if not pts:
                    continue
                ax.plot([p[key] for p in pts], [p["accuracy"] for p in pts], "o-", ms=3.5, lw=1.3,
                        color=colors[label], label=label)
            fr = k["bins"][b]["frontier"]
            if fr:
                ax.plot([p["compute"] for p in fr], [p["accuracy"] for p in fr], "--", color="black", lw=1.0,
                        alpha=0.7, label="frontier" if b == bins[0] else None)
            e = k["bins"][b]
            if "baseline" in e:
                ax.plot([e["baseline"]["compute"]], [e["baseline"]["accuracy"]], "o", ms=11, mfc="none", mec="black")
            if b == "all" and "per_bin_optimal" in e:
                per = e["per_bin_optimal"]
                ax.plot([per["compute"]], [per["accuracy"]], "*", ms=13, color="black",
                        label="compute-optimal per bin")
            saving = e.get("compute_saving")
            ax.set_xscale("log")
            ax.set_title(f"{b} ({data['sizes'][b]} problems)" + (f", saving {saving:.2f}x" if saving else ""),
                         fontsize=10)
            ax.set_xlabel(f"{kind} FLOPs per problem")
            ax.set_ylabel("accuracy")
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(bins):]:
            ax.axis("off")
        handles, labels = [], []
        for ax in axes.flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
        fig.suptitle(f"accuracy vs {kind} compute: {Path(data['sweep']).name}", fontsize=12)
        fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(labels) / 4), 1, 0.97))
        path = out_dir / f"frontier_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write(sweep_dir: str | Path, **options) -> tuple[dict, str, list[Path]]:
    """Build the frontier of a sweep and write frontier.json, frontier.md and the PNGs into its directory."""
    sweep_dir = Path(sweep_dir)
    data = build(sweep_dir, **options)
    text = format_tables(data)
    (sweep_dir / "frontier.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    (sweep_dir / "frontier.md").write_text(text)
    pngs = plot(data, sweep_dir)
    return data, text, pngs
