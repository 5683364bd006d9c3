"""The compute-optimal frontier of a sweep, measured as Snell et al. measure it (`ponder frontier SWEEP_DIR`, also
run at the end of `ponder tune`).

Reads every trial's records under SWEEP_DIR/trials (the `ponder search` format; `tune.sweep` writes them). Problems
fall in difficulty bins: their `level` (toy, MATH) or `oracle`: quantiles of the policy's own pass@1 on the problem
(Snell et al.'s oracle difficulty, estimated from the sweep's largest independent-sample run). A strategy is a
method + its parameters + a selection rule; its accuracy at budget n is:

- for a method run once per budget (greedy, beam search, DVTS, particle filtering, REBASE, MCTS): the record's
  choice at its own N, right or wrong;
- for a subsampled method (best-of-N, majority: `subsampled` in trial.json, run once at their largest N), the
  EXPECTED accuracy over random n-subsets of the run's N completions (`expected_correct`: every subset where there
  are at most `subset_draws` of them, else that many seeded random ones, each judged by the rule as the router's
  soft labels are, `app.router.data.choose`); at n = N the record's own choice. No single draw decides: best-of-N
  and majority at n = 1 are both pass@1. Compute at n: the prompt once, n/N of the generated and PRM tokens (a
  random n-subset's expected share), FLOPs in proportion. Compute is the mean per problem, nominal FLOPs (what the
  papers count) and computed FLOPs (what the engines ran after their prefix caches), each its own table.

**Baseline**: best-of-N (`baseline`, rule `baseline_rule`: weighted) and its lower envelope
`C_bon(a) = min compute of best-of-N at any n whose accuracy reaches a`.

**Compute-optimal, held out** (Snell et al.'s two-fold cross-validation, repeated): `cv_repeats` times, split every
bin's problems at random into halves (stratified two-fold); on each fold, in each bin and at each budget N, choose
the strategy at N with the highest accuracy on the training half (ties: less compute) and score it on the other
half. The bins combine by their test problems, each bin keeping its own choice at N, so no bin's accuracy is ever
traded for another's. That gives a held-out curve (compute, accuracy) per N and
`C_opt(a) = min compute of that held-out curve reaching a` (infinite where it never does).

**compute_saving** is a curve: on each fold, at each best-of-N budget n, `a` = best-of-N's accuracy at n on the test
half and `saving(a) = C_bon(a) / C_opt(a)` (0 where the held-out choice never reaches a; left out where a = 0);
reported as the median over the 2 x cv_repeats folds with its 10th-90th percentile spread. The ONE summary figure,
`compute_saving`, is that curve at best-of-N's largest N (its best accuracy): the median over folds, with
`compute_saving_spread` [10th, 90th percentile] and `reached` (the share of folds where the held-out choice reached
that accuracy at all). Per bin it is the same within the bin; `compute_saving_single` chooses one strategy for
every bin. A sweep whose only strategy is best-of-N gets exactly 1.0 at every accuracy; one with a second strategy
as accurate as best-of-N at every n for 1/k of its compute gets k. Each fold scores about half the problems: with
K problems one test problem moves a fold's accuracy by about 2/K.

Writes frontier.json, frontier.md (the tables, also printed) and frontier_nominal.png / frontier_computed.png (one
panel per bin: every strategy's in-sample curve, faint, and the held-out compute-optimal curve beside best-of-N's,
plus the compute_saving curve; log compute axis).
"""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from app.router.data import answer_classes, choose, derive_rng
from app.search.results import read_run
from app.search.select import aggregate

COMPUTE_KEYS = ("flops", "computed_flops", "prompt_tokens", "generated_tokens", "prm_tokens", "computed_prompt_tokens",
                "computed_generated_tokens", "computed_prm_tokens", "seconds")
KINDS = {"nominal": "flops", "computed": "computed_flops"}
RULE_ORDER = ("naive", "weighted", "maj")
SUBSET_DRAWS = 256     # n-subsets judged per problem, rule and n (all of them where there are no more)
CV_REPEATS = 50        # repeats of the stratified two-fold split
EPS = 1e-9


# ---------------------------------------------------------------- one trial


def _get(c: dict, k: str) -> float | None:
    v = c.get(k)
    return None if v is None else float(v)


def compute_at(rec: dict, n: int) -> dict[str, float | None]:
    """A record's compute (the COMPUTE_KEYS; None where it does not report one), at n <= its N completions: for
    n < N what a random n-subset of the completions costs on average (the prompt once, n/N of the rest)."""
    c = rec.get("compute") or {}
    vals = {k: _get(c, k) for k in COMPUTE_KEYS}
    trajs = rec.get("trajectories") or []
    N = len(trajs) or int(rec.get("N") or 1)
    if n >= N:
        return vals
    gen_N = float(sum(int(t.get("tokens") or 0) for t in trajs))
    gen_n = gen_N * n / N  # a random n-subset's expected share
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


# ---------------------------------------------------------------- accuracy at n, expected over n-subsets


def _subsets(N: int, n: int, draws: int, rng: np.random.Generator) -> list[list[int]]:
    """Every n-subset of range(N) where there are at most `draws`, else `draws` random ones (each sorted)."""
    if math.comb(N, n) <= draws:
        return [list(c) for c in itertools.combinations(range(N), n)]
    return [sorted(int(i) for i in rng.choice(N, size=n, replace=False)) for _ in range(draws)]


def expected_correct(rec: dict, rule: str, n: int, draws: int = SUBSET_DRAWS, seed: int = 0) -> float:
    """The rule's accuracy on this problem at n, expected over random n-subsets of the record's N completions (in
    the run's order, so ties break as the run breaks them); at n >= N, the record's own choice. Without step scores
    (a rule that needs them) it falls back to the record's choice at n."""
    trajs = rec.get("trajectories") or []
    N = len(trajs)
    if N == 0 or n >= N:
        return float(correct_at(rec, n).get(rule, False))
    aggs = None
    if rule != "maj":
        if not all(t.get("scores") for t in trajs):
            return float(correct_at(rec, n).get(rule, False))
        aggs = [aggregate(t["scores"], rec.get("agg_strategy") or "last") for t in trajs]
    classes = answer_classes(trajs, rec.get("grouping") == "exact")
    subs = _subsets(N, n, draws, derive_rng(seed, str(rec["id"]), f"{rule}@{n}"))
    hits = 0
    for idx in subs:
        j = choose(rule, idx, classes, aggs)
        hits += bool(j is not None and trajs[j].get("correct"))
    return hits / len(subs)


# ---------------------------------------------------------------- the held-out frontier


def _mean(x: np.ndarray, axis: int = 0) -> np.ndarray:
    """nanmean without the all-NaN warning (NaN stays NaN)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nansum(x, axis=axis) / np.sum(~np.isnan(x), axis=axis)


def _choose(A: np.ndarray, C: np.ndarray, rows: np.ndarray, cand: Sequence[int]) -> int:
    """The column among `cand` with the highest mean accuracy over `rows` (ties: the least mean compute)."""
    acc = A[np.ix_(rows, cand)].mean(0) if len(rows) else np.zeros(len(cand))
    cost = _mean(C[np.ix_(rows, cand)]) if len(rows) else np.zeros(len(cand))
    cost = np.where(np.isnan(cost), np.inf, cost)
    best = max(range(len(cand)), key=lambda k: (round(float(acc[k]), 9), -float(cost[k]), -k))
    return cand[best]


def envelope(curve: Sequence[tuple[float, float]], a: float) -> float:
    """min compute over the (accuracy, compute) points whose accuracy reaches a; inf where none does."""
    costs = [c for acc, c in curve if acc >= a - EPS and not math.isnan(c)]
    return min(costs) if costs else math.inf


def _split(bins: dict[str, np.ndarray], rng: np.random.Generator, P: int) -> np.ndarray:
    """A stratified two-fold split: True for the first half of every bin (odd bins: the extra one at random)."""
    first = np.zeros(P, bool)
    for ib in bins.values():
        perm = rng.permutation(ib)
        half = len(ib) // 2 + (int(rng.integers(2)) if len(ib) % 2 else 0)
        first[perm[:half]] = True
    return first


def _fold(A, C, groups, ns, cols_by_n, base_cols, train, test) -> dict:
    """One fold: per group (a name -> bins making it up), the held-out curve per N (the choice per bin made on the
    training rows, scored on the test rows), best-of-N's curve on the test rows, and the saving at each of its n."""
    out = {}
    for g, bins in groups.items():
        rows = np.concatenate(list(bins.values()))
        test_rows = rows[test[rows]]
        held, choices = [], {}
        for N in ns:
            hits, costs, pick = 0.0, [], {}
            for b, ib in bins.items():
                tr, te = ib[train[ib]], ib[test[ib]]
                j = _choose(A, C, tr, cols_by_n[N])  # a bin with no training problem: the first candidate
                pick[b] = j
                hits += float(A[te, j].sum())
                costs.append(C[te, j])
            cost = _mean(np.concatenate(costs)) if len(test_rows) else math.nan
            held.append((hits / len(test_rows) if len(test_rows) else 0.0, float(cost)))
            choices[N] = pick
        bon = [(float(A[test_rows, j].mean()) if len(test_rows) else 0.0, float(_mean(C[test_rows, j])))
               for j in base_cols]
        saving = []
        for a, _ in bon:
            if a <= EPS:
                saving.append(math.nan)  # nothing to match
                continue
            co = envelope(held, a)
            saving.append(0.0 if math.isinf(co) else envelope(bon, a) / co)
        out[g] = {"held": held, "bon": bon, "saving": saving, "choices": choices, "test": len(test_rows)}
    return out


def _stats(x: Sequence[float]) -> dict:
    v = np.array([y for y in x if not math.isnan(y)], float)
    if not len(v):
        return {"median": None, "q10": None, "q90": None, "folds": 0, "reached": None}
    return {"median": float(np.median(v)), "q10": float(np.percentile(v, 10)), "q90": float(np.percentile(v, 90)),
            "folds": len(v), "reached": float((v > 0).mean())}


def cross_validate(A: np.ndarray, C: np.ndarray, cols: list[dict], base_cols: list[int],
                   bins: dict[str, np.ndarray], repeats: int = CV_REPEATS, seed: int = 0) -> dict:
    """The held-out frontier of one compute kind (A: problems x columns accuracy, C: their compute, NaN where a
    problem has no record): per bin, over all bins (each its own choice), and `single` (one choice for all)."""
    P = A.shape[0]
    ns = sorted({c["N"] for c in cols})
    cols_by_n = {N: [j for j, c in enumerate(cols) if c["N"] == N] for N in ns}
    allrows = np.arange(P)
    groups = {"all": bins, **{b: {b: ib} for b, ib in bins.items()}, "single": {"all": allrows}}
    rng = np.random.default_rng(seed)
    folds = []
    for _ in range(repeats):
        first = _split(bins, rng, P)
        for test in (~first, first):
            folds.append(_fold(A, C, groups, ns, cols_by_n, base_cols, ~test, test))
    base_ns = [cols[j]["N"] for j in base_cols]
    out = {}
    for g in groups:
        fs = [f[g] for f in folds]
        held = [{"N": N,
                 "accuracy": float(np.mean([f["held"][i][0] for f in fs])),
                 "accuracy_sd": float(np.std([f["held"][i][0] for f in fs])),
                 "compute": float(_mean(np.array([f["held"][i][1] for f in fs]))),
                 "choice": (dict(Counter(cols[next(iter(f["choices"][N].values()))]["strategy"] for f in fs)
                                 .most_common()) if len(groups[g]) == 1 else {})}
                for i, N in enumerate(ns)]
        curve = [{"N": n,
                  "accuracy": float(np.mean([f["bon"][i][0] for f in fs])),
                  "compute": float(_mean(np.array([f["bon"][i][1] for f in fs]))),
                  "saving": _stats([f["saving"][i] for f in fs])}
                 for i, n in enumerate(base_ns)]
        top = curve[-1]["saving"] if curve else _stats([])
        out[g] = {"test_problems": float(np.mean([f["test"] for f in fs])), "held_out": held, "curve": curve,
                  "compute_saving": top["median"], "compute_saving_spread": [top["q10"], top["q90"]],
                  "reached": top["reached"]}
    return out


# ---------------------------------------------------------------- the sweep


def build(sweep_dir: str | Path, bins: str | None = None, oracle_bins: int | None = None,
          rules: list[str] | None = None, baseline: str | None = None, baseline_rule: str | None = None,
          cv_repeats: int | None = None, subset_draws: int | None = None, seed: int | None = None) -> dict:
    """The frontier data (what frontier.json holds); options default to the sweep recipe's `frontier:` section."""
    sweep_dir = Path(sweep_dir)
    opts = sweep_options(sweep_dir)
    bins = bins or opts.get("bins", "level")
    oracle_bins = oracle_bins or opts.get("oracle_bins", 5)
    rules = rules or opts.get("rules", ["weighted"])
    baseline = baseline or opts.get("baseline", "best_of_n")
    baseline_rule = baseline_rule or opts.get("baseline_rule", "weighted")
    cv_repeats = cv_repeats or opts.get("cv_repeats", CV_REPEATS)
    subset_draws = subset_draws or opts.get("subset_draws", SUBSET_DRAWS)
    seed = opts.get("seed", 0) if seed is None else seed
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
    pids = list(plan)
    row = {pid: i for i, pid in enumerate(pids)}
    members = {"all": pids, **{b: [p for p in pids if bin_of[p] == b] for b in names}}

    # columns: one per (strategy + rule, N); per problem its accuracy (expected over n-subsets where subsampled)
    cols: list[dict] = []
    acc_cols: list[np.ndarray] = []
    cost_cols: dict[str, list[np.ndarray]] = {k: [] for k in COMPUTE_KEYS}
    strategies: list[str] = []
    base_label = None
    for t in trials:
        info = t["info"]
        have = sorted({r for rows in t["rows"].values() for row_ in rows.values() for r in row_["correct"]},
                      key=RULE_ORDER.index)
        use = [r for r in rules if r in have] or have
        if info.get("method") == baseline and baseline_rule in have and base_label is None:
            base_label = f"{info['strategy']} {baseline_rule}"
            if baseline_rule not in use:
                use.append(baseline_rule)
        recs = {r["id"]: r for r in t["records"]}
        for rule in use:
            label = f"{info['strategy']} {rule}"
            if label not in strategies:
                strategies.append(label)
            for n, rows in sorted(t["rows"].items()):
                acc = np.zeros(len(pids))
                cost = {k: np.full(len(pids), np.nan) for k in COMPUTE_KEYS}
                for pid, r in rows.items():
                    if pid not in row:
                        continue
                    acc[row[pid]] = (expected_correct(recs[pid], rule, n, subset_draws, seed) if info.get("subsampled")
                                     else float(bool(r["correct"].get(rule))))
                    for k in COMPUTE_KEYS:
                        if r["compute"].get(k) is not None:
                            cost[k][row[pid]] = r["compute"][k]
                cols.append({"strategy": label, "method": info.get("method"), "rule": rule, "N": n,
                             "trial": info.get("name"), "subsampled": bool(info.get("subsampled"))})
                acc_cols.append(acc)
                for k in COMPUTE_KEYS:
                    cost_cols[k].append(cost[k])
    A = np.stack(acc_cols, 1) if acc_cols else np.zeros((len(pids), 0))
    Cs = {k: np.stack(v, 1) if v else np.zeros((len(pids), 0)) for k, v in cost_cols.items()}

    # in-sample points (what each strategy does on all the problems of a bin; no choice made on them)
    points: dict[str, list[dict]] = {}
    for b, ids in members.items():
        ix = np.array([row[p] for p in ids], int)
        points[b] = [{**c, "accuracy": float(A[ix, j].mean()) if len(ix) else 0.0,
                      **{k: (None if np.all(np.isnan(Cs[k][ix, j])) else float(_mean(Cs[k][ix, j])))
                         for k in COMPUTE_KEYS}}
                     for j, c in enumerate(cols)]
    sizes = {b: len(ids) for b, ids in members.items()}
    base_cols = sorted((j for j, c in enumerate(cols) if c["strategy"] == base_label), key=lambda j: cols[j]["N"])
    out: dict[str, Any] = {"sweep": str(sweep_dir), "bins": bins, "bin_names": ["all", *names], "sizes": sizes,
                           "strategies": strategies, "baseline": base_label, "points": points,
                           "cv": {"repeats": cv_repeats, "folds": 2 * cv_repeats, "seed": seed,
                                  "subset_draws": subset_draws}, "kinds": {}}
    bin_rows = {b: np.array([row[p] for p in members[b]], int) for b in names}
    for kind, key in KINDS.items():
        if not any(p.get(key) is not None for p in points["all"]) or not base_cols:
            continue
        cv = cross_validate(A, Cs[key], cols, base_cols, bin_rows, cv_repeats, seed)
        k_out: dict[str, Any] = {"key": key, "bins": {}}
        for b in ["all", *names]:
            e = cv[b]
            top = e["curve"][-1]
            e["baseline"] = {"strategy": base_label, "N": top["N"], "accuracy": top["accuracy"],
                             "compute": top["compute"]}
            k_out["bins"][b] = e
        single = cv["single"]
        k_out["bins"]["all"].update({"compute_saving_single": single["compute_saving"],
                                     "compute_saving_single_spread": single["compute_saving_spread"],
                                     "reached_single": single["reached"], "held_out_single": single["held_out"],
                                     "curve_single": single["curve"]})
        out["kinds"][kind] = k_out
    out["counts"] = {"problems": len(plan), "failed": len(failed)}
    return out


# ---------------------------------------------------------------- tables and plots


def _flops(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    for unit, div in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _saving(s: dict) -> str:
    """median [q10, q90] of a saving over the folds."""
    if s.get("median") is None:
        return "-"
    return f"{s['median']:.2f}x [{s['q10']:.2f}, {s['q90']:.2f}]"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def format_tables(data: dict) -> str:
    """frontier.md: per compute kind, the held-out compute_saving per bin, the saving curve over best-of-N's
    accuracies, the held-out compute-optimal curve beside best-of-N's, the choice per bin and budget; then every
    strategy's in-sample accuracy (expected over n-subsets where subsampled) and compute."""
    bins = data["bin_names"]
    cv = data["cv"]
    K = data["sizes"]["all"]
    sizes = ", ".join(f"{b}: {data['sizes'][b]}" for b in bins)
    lines = [f"# Compute-optimal frontier: {data['sweep']}", "",
             f"{data['counts']['problems']} problems, bins by {data['bins']} ({sizes}). Compute is the mean per "
             "problem (FLOPs; nominal as the papers count, computed after the engines' prefix caches). Baseline: "
             f"{data['baseline'] or '(none in the sweep)'} and its lower envelope C_bon(a). Held out: "
             f"{cv['repeats']} repeats of stratified two-fold cross-validation over problems ({cv['folds']} folds); "
             f"each fold chooses per bin and budget on one half and scores on the other (about {K / 2:g} test "
             f"problems: one problem = {2 / K:.3f} of a fold's accuracy). compute_saving = C_bon(a) / C_opt(a) at "
             "best-of-N's accuracy a: the median over folds [10th, 90th percentile]; 'reached' = the share of folds "
             "where the held-out choice reached a at all (0x where it did not)."]
    for kind, k in data["kinds"].items():
        lines += ["", f"## compute_saving at best-of-N's largest-N accuracy, held out ({kind} FLOPs)", ""]
        rows = []
        for b in bins:
            e = k["bins"][b]
            bp = e["baseline"]
            rows.append([b, f"{e['test_problems']:g}", f"{bp['accuracy']:.3f}", _flops(bp["compute"]),
                         _saving({"median": e["compute_saving"], "q10": e["compute_saving_spread"][0],
                                  "q90": e["compute_saving_spread"][1]}),
                         "-" if e["reached"] is None else f"{e['reached']:.2f}"])
        e = k["bins"]["all"]
        if len(bins) > 1:
            rows.append(["all (one strategy for every bin)", f"{e['test_problems']:g}",
                         f"{e['baseline']['accuracy']:.3f}", _flops(e["baseline"]["compute"]),
                         _saving({"median": e["compute_saving_single"], "q10": e["compute_saving_single_spread"][0],
                                  "q90": e["compute_saving_single_spread"][1]}),
                         "-" if e["reached_single"] is None else f"{e['reached_single']:.2f}"])
        lines += _table(["bin", "test problems per fold", f"best-of-N N={e['baseline']['N']} acc (held out)",
                         "its FLOPs", "compute_saving", "reached"], rows)
        lines += ["", f"## held-out curves, all problems ({kind} FLOPs)", "",
                  "Best-of-N at n on the test half, and the saving at its accuracy; the compute-optimal choice (per "
                  "bin, chosen on the other half) at budget N on the same test half.", ""]
        curve = {c["N"]: c for c in e["curve"]}
        held = {h["N"]: h for h in e["held_out"]}
        rows = []
        for N in sorted(set(curve) | set(held)):
            c, h = curve.get(N), held.get(N)
            rows.append([str(N),
                         f"{c['accuracy']:.3f}" if c else "-", _flops(c["compute"]) if c else "-",
                         _saving(c["saving"]) if c else "-",
                         f"{h['accuracy']:.3f} +- {h['accuracy_sd']:.3f}" if h else "-",
                         _flops(h["compute"]) if h else "-"])
        lines += _table(["N", "best-of-N acc", "its FLOPs", "compute_saving at that acc",
                         "compute-optimal acc (+- sd over folds)", "its FLOPs"], rows)
        lines += ["", f"## the choice per bin and budget over the folds ({kind} FLOPs)", ""]
        ns = [h["N"] for h in e["held_out"]]
        rows = []
        for N in ns:
            r = [str(N)]
            for b in bins[1:] or bins:
                h = next(x for x in k["bins"][b if len(bins) > 1 else "all"]["held_out"] if x["N"] == N) \
                    if len(bins) > 1 else next(x for x in e["held_out_single"] if x["N"] == N)
                folds = sum(h["choice"].values()) or 1
                top = list(h["choice"].items())[:2]
                r.append("; ".join(f"{s} {c / folds:.0%}" for s, c in top) + f" ({h['accuracy']:.3f})")
            rows.append(r)
        lines += _table(["N", *(bins[1:] or bins)], rows)
    lines += ["", "## every strategy (in-sample: all of a bin's problems; subsampled ones expected over n-subsets)", ""]
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
    """One PNG per compute kind: a panel per bin plus the overall one (every strategy's in-sample curve, faint; the
    held-out compute-optimal curve and best-of-N's on the test halves, bold) and a panel of the compute_saving curve
    over best-of-N's accuracies (median over folds, 10th-90th percentile band); log compute axis."""
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
        panels = len(bins) + 1
        cols = min(3, panels)
        rows = math.ceil(panels / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows + 1.2), squeeze=False)
        flat = list(axes.flat)
        for ax, b in zip(flat, bins):
            for label in data["strategies"]:
                pts = sorted((p for p in data["points"][b] if p["strategy"] == label and p.get(key)),
                             key=lambda p: p["N"])
                if pts:
                    ax.plot([p[key] for p in pts], [p["accuracy"] for p in pts], "o-", ms=2.5, lw=0.9, alpha=0.45,
                            color=colors[label], label=f"{label} (in-sample)")
            e = k["bins"][b]
            bon = [c for c in e["curve"] if not math.isnan(c["compute"])]
            ax.plot([c["compute"] for c in bon], [c["accuracy"] for c in bon], "s--", ms=5, lw=2.0, color="tab:red",
                    label="best-of-N, held out")
            held = [h for h in e["held_out"] if not math.isnan(h["compute"])]
            ax.errorbar([h["compute"] for h in held], [h["accuracy"] for h in held],
                        yerr=[h["accuracy_sd"] for h in held], fmt="*-", ms=9, lw=2.0, color="black", capsize=3,
                        label="compute-optimal per bin, held out")
            ax.set_xscale("log")
            ax.set_title(f"{b} ({data['sizes'][b]} problems), saving {_x(e['compute_saving'])}", fontsize=10)
            ax.set_xlabel(f"{kind} FLOPs per problem")
            ax.set_ylabel("accuracy")
            ax.grid(True, which="both", alpha=0.3)
        ax = flat[len(bins)]
        for b in bins:
            c = [x for x in k["bins"][b]["curve"] if x["saving"]["median"] is not None]
            if not c:
                continue
            style = dict(lw=2.2, color="black") if b == "all" else dict(lw=1.0, alpha=0.7)
            ax.plot([x["accuracy"] for x in c], [x["saving"]["median"] for x in c], "o-", ms=3.5, label=f"saving: {b}",
                    **style)
            if b == "all":
                ax.fill_between([x["accuracy"] for x in c], [x["saving"]["q10"] for x in c],
                                [x["saving"]["q90"] for x in c], color="gray", alpha=0.3)
        ax.axhline(1.0, color="tab:red", ls="--", lw=1.0)
        ax.set_yscale("symlog", linthresh=1.0)  # 0 (never reached) stays on the axis
        ax.set_ylim(bottom=0.0)
        ax.set_title("compute_saving C_bon(a) / C_opt(a), held out", fontsize=10)
        ax.set_xlabel("best-of-N's accuracy a (test half)")
        ax.set_ylabel("compute_saving (median, 10-90%)")
        ax.grid(True, alpha=0.3)
        for ax in flat[panels:]:
            ax.axis("off")
        handles, labels = [], []
        for ax in flat:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=7, frameon=False)
        fig.suptitle(f"accuracy vs {kind} compute: {Path(data['sweep']).name} ({data['cv']['folds']} held-out folds)",
                     fontsize=12)
        fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(labels) / 4), 1, 0.97))
        path = out_dir / f"frontier_{kind}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _json_safe(x: Any) -> Any:
    """NaN and inf as null (frontier.json is strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write(sweep_dir: str | Path, **options) -> tuple[dict, str, list[Path]]:
    """Build the frontier of a sweep and write frontier.json, frontier.md and the PNGs into its directory."""
    sweep_dir = Path(sweep_dir)
    data = build(sweep_dir, **options)
    text = format_tables(data)
    (sweep_dir / "frontier.json").write_text(json.dumps(_json_safe(data), indent=1, default=str) + "\n")
    (sweep_dir / "frontier.md").write_text(text)
    pngs = plot(data, sweep_dir)
    return data, text, pngs
