"""The router's data: search records -> arms, soft labels by bootstrap, measured costs, the split by question.

    runs = load_runs(["results/toy/best_of_n", "sweeps/toy"])     # search output dirs, or a sweep dir (trials/*)
    table = build_table(runs, draws=30, seed=0)                    # LabelTable: questions x arms
    split = split_questions(table.ids, test=0.1, val=0.15, seed=0)
    keep = too_hard_mask(table, split.train, ...)                   # the "too hard" filter, as a flag

Generic over `ponder search` records (`app.search.record`): anything that wrote `shard-*.jsonl` in that format,
a search run or a Ray Tune trial, is read the same way.

**Arms** are method x N x selection rule, named `METHOD/RULE@N` (e.g. `best_of_n/weighted@4`). A run of a method
whose completions are independent samples (`PARALLEL`: best-of-N, majority, greedy) gives an arm at every reported
n = 1, 2, 4, ... N (the routing fork resamples its parallel arms from one 32-sample run); any other method (beam
search, DVTS, REBASE, MCTS) gives arms at its own N only (the fork's beam arms). Where two runs give the same arm
(a sweep ran best-of-N at N=4 and at N=16), the run with that exact N wins, else the larger run. At n = 1 every
selection rule takes the one completion, so a method's n = 1 arms are one procedure and one arm, `METHOD/maj@1`
(maj needs no PRM score; `data.arms` may name it under any rule): three copies with independent bootstrap noise
would each look like a different arm and lift the oracle (the best arm per question) by noise alone.

**Soft label** of (question, arm): `draws` draws WITH replacement of min(n, completions) of the arm's run's
completions; each draw is judged by the arm's selection rule (`app.search.select`, the record's aggregation); the
label is the mean correctness of the chosen answers; where one completion is drawn (n = 1, or a record of one) the
label is exact, the share of right completions, with no bootstrap noise. Answers are grouped for the votes as the
run grouped them: every correct answer is one class (they are all equivalent to the gold answer), wrong ones by exact string (a run
with `grouping: exact` groups all of them by string). The random numbers are seeded per question and arm
(`seed`, the question's id, the arm's name), never by file order: labels do not depend on the order records are
read in (the fork runs one `default_rng(42)` through the problems in file order).

**Cost** of (question, arm), from the record's compute: `flops` (nominal), `computed_flops`, `tokens` (prompt +
generated + PRM, nominal), `computed_tokens`, `seconds` (wall). An arm resampled at n from a parallel run of N
completions is charged n / N of the run's cost (an estimate: the completions of one run cost about the same).

**Split** by question (test 10%, validation 15% of the rest, as the fork), a seeded permutation of the sorted ids.

**"Too hard" filter** (the fork's `drop_extreme_questions`): a question whose best label over the arms of one N is
~0 (<= `zero`) at >= `min_ns` values of N is eligible; a seeded random `drop` share of the eligible training and
validation questions is dropped. Test questions are never dropped, so routers trained with and without the filter
are judged on the same held-out questions.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from app.config import ConfigError
from app.search.results import SHARD_GLOB, read_records
from app.search.select import aggregate, budgets, select_majority, select_naive, select_weighted

PARALLEL = ("best_of_n", "majority", "greedy")
ONE_SAMPLE_RULE = "maj"    # the rule that names a method's single n = 1 arm (every rule picks the one completion)
COST_KEYS = ("flops", "computed_flops", "tokens", "computed_tokens", "seconds")


def cost_of(compute: dict) -> dict[str, float]:
    """One record's compute as the router's cost keys."""
    c = compute or {}
    g = lambda k: float(c.get(k, 0) or 0)  # noqa: E731
    return {
        "flops": g("flops") or g("policy_flops") + g("prm_flops"),
        "computed_flops": g("computed_flops") or g("computed_policy_flops") + g("computed_prm_flops"),
        "tokens": g("prompt_tokens") + g("generated_tokens") + g("prm_tokens"),
        "computed_tokens": g("computed_prompt_tokens") + g("computed_generated_tokens") + g("computed_prm_tokens"),
        "seconds": g("seconds"),
    }


@dataclass(frozen=True, order=True)
class Arm:
    method: str
    rule: str
    n: int

    @property
    def name(self) -> str:
        return f"{self.method}/{self.rule}@{self.n}"

    @property
    def family(self) -> str:
        """What the one-hot feature names: the method and its selection rule."""
        return f"{self.method}/{self.rule}"

    def canonical(self) -> "Arm":
        """The arm under its one name: at n = 1 every rule is the same procedure (`METHOD/maj@1`)."""
        return Arm(self.method, ONE_SAMPLE_RULE, 1) if self.n == 1 else self

    @classmethod
    def parse(cls, name: str) -> "Arm":
        try:
            fam, n = name.rsplit("@", 1)
            method, rule = fam.split("/", 1)
            return cls(method, rule, int(n))
        except ValueError:
            raise ConfigError(f"arm {name!r} is not of the form METHOD/RULE@N (e.g. best_of_n/weighted@4)") from None


@dataclass
class Run:
    """One search output directory: its method, budget N, config and records (id -> record)."""

    path: Path
    method: str
    N: int
    config: dict
    group_size: int
    records: dict[str, dict]

    @property
    def parallel(self) -> bool:
        return self.method in PARALLEL

    def arms(self) -> list[Arm]:
        rules: list[str] = []
        for rec in self.records.values():
            rules += [r for r in rec.get("selection", {}) if r not in rules]
        ns = [1] if self.method == "greedy" else (budgets(self.N, self.group_size) if self.parallel else [self.N])
        arms = [Arm(self.method, r, n).canonical() for r in rules for n in ns]
        return list(dict.fromkeys(arms))     # one n = 1 arm, not one per rule


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Every folder holding search shards under `paths`: a search output dir itself, a sweep's trials/*
    subfolders, or any folder below. A path with none is a ConfigError naming it."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if not p.exists():
            raise ConfigError(f"data.records: {p} does not exist (give search output dirs or a sweep dir)")
        found = sorted({f.parent for f in p.rglob(SHARD_GLOB)}) if p.is_dir() else []
        if not found:
            raise ConfigError(f"data.records: {p} holds no search records ({SHARD_GLOB}); run `ponder search` "
                              f"or `ponder tune` into it first")
        out += [f for f in found if f not in out]
    return out


def load_runs(paths: Iterable[str | Path]) -> list[Run]:
    runs = []
    for d in find_run_dirs(paths):
        recs = read_records(d)
        if not recs:
            continue
        first = recs[0]
        method = str(first["method"])
        cfg = dict(first.get("config") or {})
        N = int(first.get("N") or cfg.get("n") or 1)
        group = int(cfg.get("beam_width", 1)) if method == "dvts" else 1
        runs.append(Run(d, method, N, cfg, group, {str(r["id"]): r for r in recs}))
    if not runs:
        raise ConfigError("data.records: the folders given hold no finished search record")
    return runs


# ---------------------------------------------------------------- soft labels


def derive_rng(seed: int, question_id: str, arm: str) -> np.random.Generator:
    """The random numbers of one (question, arm): from the seed, the question's id and the arm's name only."""
    h = hashlib.sha256(f"{seed}|{question_id}|{arm}".encode()).digest()
    return np.random.default_rng(int.from_bytes(h[:8], "little"))


def answer_classes(trajs: Sequence[dict], exact: bool = False) -> list[int | None]:
    """Class of each completion's answer: all correct answers one class, wrong ones by string (see the module doc)."""
    keys: dict[Any, int] = {}
    out: list[int | None] = []
    for t in trajs:
        a = t.get("answer")
        if a is None:
            out.append(None)
            continue
        key = ("correct",) if (t.get("correct") and not exact) else ("answer", str(a))
        out.append(keys.setdefault(key, len(keys)))
    return out


def _aggs(trajs: Sequence[dict], agg: str) -> list[float] | None:
    out = []
    for t in trajs:
        s = t.get("scores")
        if not s:
            return None
        out.append(aggregate(s, agg))
    return out


def choose(rule: str, idx: Sequence[int], classes: Sequence[int | None], aggs: Sequence[float] | None) -> int | None:
    """The completion (an index into the record) that `rule` picks from the drawn completions `idx`."""
    c = [classes[i] for i in idx]
    m = len(idx)
    if rule == "maj":
        j = select_majority(c, m)
    elif aggs is None:
        raise ValueError(f"rule {rule} needs PRM scores, and the record has none")
    elif rule == "naive":
        j = select_naive([aggs[i] for i in idx], m)
    elif rule == "weighted":
        j = select_weighted(c, [aggs[i] for i in idx], m)
    else:
        raise ValueError(f"unknown selection rule {rule!r}")
    return None if j is None else idx[j]


def soft_label(record: dict, arm: Arm, draws: int, rng: np.random.Generator, exact: bool | None = None) -> float:
    """Mean correctness of `arm.rule`'s choice over `draws` draws with replacement of min(n, K) of the record's K
    completions."""
    trajs = record.get("trajectories") or []
    if not trajs:
        return 0.0
    size = min(arm.n, len(trajs))
    if size == 1:        # one completion drawn: every rule takes it, so the expectation is exact
        return float(np.mean([bool(t.get("correct")) and t.get("answer") is not None for t in trajs]))
    exact = record.get("grouping") == "exact" if exact is None else exact
    classes = answer_classes(trajs, exact)
    aggs = _aggs(trajs, record.get("agg_strategy") or "last") if arm.rule != "maj" else None
    idx = rng.integers(0, len(trajs), size=(draws, size))
    hits = 0
    for row in idx:
        j = choose(arm.rule, [int(i) for i in row], classes, aggs)
        hits += bool(j is not None and trajs[j].get("correct"))
    return hits / draws


@dataclass
class LabelTable:
    """Questions x arms: soft labels, the record's own correctness at that n, and per-(question, arm) costs."""

    ids: list[str]
    questions: list[str]
    levels: list[Any]
    arms: list[Arm]
    labels: np.ndarray                     # [Q, A] soft labels
    correct: np.ndarray                    # [Q, A] the record's own choice at n was right (0/1)
    costs: dict[str, np.ndarray]           # key -> [Q, A]
    configs: dict[str, dict]               # arm name -> the method config of its source run
    sources: dict[str, str]                # arm name -> the run folder it came from
    dropped: list[str] = field(default_factory=list)   # questions missing from some run

    def subset(self, rows: Sequence[int]) -> "LabelTable":
        r = list(rows)
        return LabelTable([self.ids[i] for i in r], [self.questions[i] for i in r], [self.levels[i] for i in r],
                          self.arms, self.labels[r], self.correct[r], {k: v[r] for k, v in self.costs.items()},
                          self.configs, self.sources, self.dropped)


def pick_sources(runs: Sequence[Run]) -> dict[Arm, Run]:
    """Each arm's run: the one whose N is the arm's n, else the largest."""
    best: dict[Arm, Run] = {}
    for run in runs:
        for arm in run.arms():
            cur = best.get(arm)
            if cur is None:
                best[arm] = run
            elif cur.N != arm.n and (run.N == arm.n or run.N > cur.N):
                best[arm] = run
    return dict(sorted(best.items()))


def build_table(runs: Sequence[Run], draws: int = 30, seed: int = 0, arms: Sequence[str] | None = None) -> LabelTable:
    """Soft labels and costs for every arm the runs give (or the named `arms`), over the questions every source run
    solved (the others are listed in `dropped`)."""
    sources = pick_sources(runs)
    if arms:
        wanted = list(dict.fromkeys(Arm.parse(a).canonical() for a in arms))
        missing = [a.name for a in wanted if a not in sources]
        if missing:
            raise ConfigError(f"data.arms: no run gives {', '.join(missing)} (available: "
                              f"{', '.join(a.name for a in sources)})")
        sources = {a: sources[a] for a in wanted}
    if not sources:
        raise ConfigError("data.records: the runs give no arm")
    used = list({id(r): r for r in sources.values()}.values())
    common = set.intersection(*(set(r.records) for r in used))
    every = set.union(*(set(r.records) for r in used))
    ids = sorted(common)
    if not ids:
        raise ConfigError("data.records: no question was solved by every run (are they runs of the same data set?)")
    arm_list = list(sources)
    Q, A = len(ids), len(arm_list)
    labels, correct = np.zeros((Q, A)), np.zeros((Q, A))
    costs = {k: np.zeros((Q, A)) for k in COST_KEYS}
    for a, arm in enumerate(arm_list):
        run = sources[arm]
        share = arm.n / run.N if run.parallel and run.N > 0 else 1.0
        for q, pid in enumerate(ids):
            rec = run.records[pid]
            labels[q, a] = soft_label(rec, arm, draws, derive_rng(seed, pid, arm.name))
            sel = (rec.get("selection", {}).get(arm.rule) or {}).get(str(arm.n)) or {}
            correct[q, a] = float(bool(sel.get("correct")))
            for k, v in cost_of(rec.get("compute", {})).items():
                costs[k][q, a] = v * share
    first = sources[arm_list[0]].records
    configs = {}
    for arm, run in sources.items():
        cfg = dict(run.config)
        if run.parallel and arm.method != "greedy":
            cfg["n"] = arm.n
        configs[arm.name] = cfg
    return LabelTable(ids, [first[i].get("question", "") for i in ids], [first[i].get("level") for i in ids], arm_list,
                      labels, correct, costs, configs, {a.name: str(r.path) for a, r in sources.items()},
                      sorted(every - common))


# ---------------------------------------------------------------- split and filter


@dataclass
class Split:
    train: list[int]
    val: list[int]
    test: list[int]

    def as_ids(self, ids: Sequence[str]) -> dict[str, list[str]]:
        return {k: [ids[i] for i in getattr(self, k)] for k in ("train", "val", "test")}


def split_questions(ids: Sequence[str], test: float = 0.1, val: float = 0.15, seed: int = 0) -> Split:
    """Rows of `ids` split by question: `test` of them, then `val` of the rest; seeded, independent of id order."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    perm = [order[i] for i in np.random.default_rng(seed).permutation(len(order))]
    n_test = int(round(test * len(perm)))
    n_val = int(round(val * (len(perm) - n_test)))
    if len(perm) - n_test - n_val < 1 or (test > 0 and n_test < 1):
        raise ConfigError(f"data: {len(ids)} questions are too few to split (test {test}, val {val}); solve more")
    return Split(sorted(perm[n_test + n_val:]), sorted(perm[n_test:n_test + n_val]), sorted(perm[:n_test]))


def too_hard(table: LabelTable, zero: float = 1e-6, min_ns: int = 4) -> np.ndarray:
    """[Q] bool: the best label over the arms of one N is <= `zero` at >= `min_ns` values of N."""
    ns = sorted({a.n for a in table.arms})
    hits = np.zeros(len(table.ids), dtype=int)
    for n in ns:
        cols = [j for j, a in enumerate(table.arms) if a.n == n]
        hits += table.labels[:, cols].max(axis=1) <= zero
    return hits >= min_ns


def filter_rows(table: LabelTable, rows: Sequence[int], drop: float = 0.8, zero: float = 1e-6, min_ns: int = 4,
                seed: int = 0) -> tuple[list[int], list[int]]:
    """(kept rows, dropped rows): a seeded `drop` share of the too-hard questions among `rows` is dropped."""
    hard = too_hard(table, zero, min_ns)
    out_rows = []
    for i in rows:
        if hard[i] and derive_rng(seed, table.ids[i], "too-hard").random() < drop:
            out_rows.append(i)
    gone = set(out_rows)
    return [i for i in rows if i not in gone], out_rows


def save_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
