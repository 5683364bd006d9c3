"""A compute-budget sweep on Ray Tune: methods x budgets N x method parameters, every trial a search run against
pools started once for the whole sweep.

    job: tune
    data: {source: toy:test, limit: 40, shuffle_seed: 0}
    prompt: {template: toy}
    policy: {engine: hf, model: toy:policy}
    prm: {engine: hf, model: toy:prm, format: qwen}
    grid:
      - method: best_of_n                    # one of app.search.registry.METHODS
        budgets: [1, 2, 4, 8, 16, 32, 64]    # N; best_of_n / majority run ONCE at the largest and are read at each
        search: {temperature: 0.8, max_tokens: 512}    # fixed keys of the method's section
      - method: beam_search
        budgets: [4, 16, 64]
        search: {max_tokens: 512, num_iterations: 40}
        params: {beam_width: [2, 4]}         # a grid over method keys: each combination is its own strategy
    output_dir: results/toy/sweep
    max_concurrent_trials: 2
    frontier: {bins: level}                  # tune.frontier: level or oracle difficulty bins

The recipe is validated whole on construction, so an unknown method, an N <= 0, an empty grid or a key the
method does not have is one line naming the file and the key, before Ray starts. `SweepRecipe.trials()` lists the
search runs: one per (entry, parameter combination, N), except for the methods whose smaller budgets are
subsamples of a larger run (`SUBSAMPLED`: best-of-N and majority; their selections at every n = 1, 2, 4, ... are
in each record), which run once at their largest N and report every requested N from it.

`run_sweep(recipe, pools)` runs the trials as Tune trials (`max_concurrent_trials` at once). Each trial is the
search driver (`app.search.driver`) over the data set against the shared pools, writing its records to
`output_dir/trials/<trial>/` in exactly `ponder search`'s format (`ponder report` reads a trial), then
`tune.report`s, per N, accuracy (overall, per selection rule and per level) and compute (nominal and computed
FLOPs, generated and PRM tokens, seconds). The search tasks leave the trial's placement group (the driver submits
them with the default scheduling strategy), so they never wait on the trial's bundle.

Resume, two ways: Tune's (`Tuner.restore` of `output_dir/tune/sweep`: finished trials are not run again) and the
search's own (a half-done trial's solved problems are kept; only the rest are solved). A trial in which problems
failed reports, then raises, so a rerun of the sweep retries just those problems.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.config import Config, ConfigError
from app.pool_config import PoolConfig, PRMPoolConfig
from app.search.recipe import DataConfig, PromptConfig, SearchRecipe, SelectionConfig, prm_pairing_error
from app.search.registry import METHODS, method_config
from app.search.select import RULES, budgets as reported_budgets

# Methods whose run at N holds the run at every smaller n: their n completions are independent samples and the
# records select at every n = 1, 2, 4, ... N from the first n (what a trial's Tune reports show); the frontier reads
# them as the expected accuracy over random n-subsets (`tune.frontier`). They run once, at the largest N of the entry.
SUBSAMPLED = ("best_of_n", "majority")

TRIALS_DIR = "trials"
SWEEP_FILE = "sweep.json"
TRIAL_FILE = "trial.json"
RUNS_FILE = "runs.jsonl"


def budget_key(method: str) -> str | None:
    """The key of a method's section that sets its budget N (`n`, REBASE's `width`, MCTS's `num_sequence`, ...),
    found from the config class itself; None for a method with a fixed N of 1 (greedy)."""
    cls = METHODS[method].config
    default = cls()
    for name, info in cls.model_fields.items():
        if info.annotation is not int:
            continue
        value = max(2, 2 * default.budget)
        try:
            if cls.model_validate({name: value}).budget == value:
                return name
        except ValidationError:
            continue
    return None


def _label(value: Any) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", text)


class GridEntry(Config):
    """One method of the grid: its budgets, its fixed keys, and a grid over some of its keys."""

    method: str = Field(..., description=f"one of: {', '.join(METHODS)}")
    name: str | None = Field(None, description="the strategy's label (default: the method)")
    budgets: list[int] | None = Field(None, description="the N to sweep (default [1] for a method without a budget)")
    search: dict[str, Any] = Field(default_factory=dict, description="fixed keys of the method's section")
    params: dict[str, list[Any]] = Field(default_factory=dict, description="key -> values: every combination is a "
                                                                           "strategy of its own")

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown search method {v!r} (one of: {', '.join(METHODS)})")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("no budgets: give the N to sweep, e.g. [4, 16, 64]")
        bad = [n for n in v if n <= 0]
        if bad:
            raise ValueError(f"N must be >= 1, got {bad[0]}")
        if len(set(v)) != len(v):
            raise ValueError(f"a budget is listed twice: {v}")
        return sorted(v)

    @field_validator("params")
    @classmethod
    def _params(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"params.{key}: no values (give a list of at least one)")
        return v

    @model_validator(mode="after")
    def _check(self) -> "GridEntry":
        """Every search the entry makes is a valid section of its method, or one line naming the key."""
        key = budget_key(self.method)
        mcls = METHODS[self.method].config
        if self.budgets is None:
            if key is not None:
                raise PydanticCustomError("grid", "{msg}", {"msg": f"budgets: missing; give the N to sweep for "
                                                                   f"{self.method} (its key {key!r}), e.g. [4, 16, 64]"})
            object.__setattr__(self, "budgets", [1])
        if key is None and self.budgets != [1]:
            raise PydanticCustomError("grid", "{msg}", {"msg": f"budgets: {self.method} has a fixed N of 1; give "
                                                               f"budgets: [1] (got {self.budgets})"})
        for where, keys in (("search", self.search), ("params", self.params)):
            for k in keys:
                if k not in mcls.model_fields:
                    raise PydanticCustomError("grid", "{msg}", {"msg": (
                        f"unknown key '{where}.{k}' for method {self.method} "
                        f"(valid: {', '.join(mcls.model_fields)})")})
                if k == key:
                    raise PydanticCustomError("grid", "{msg}", {"msg": (
                        f"{where}.{k}: {k} is {self.method}'s budget N; list its values in `budgets`")})
        both = set(self.search) & set(self.params)
        if both:
            raise PydanticCustomError("grid", "{msg}", {"msg": f"params.{sorted(both)[0]}: also fixed in `search`; "
                                                               "give it in one of the two"})
        if self.method in SUBSAMPLED:
            top = max(self.budgets)
            have = reported_budgets(top)
            odd = [n for n in self.budgets if n not in have]
            if odd:
                raise PydanticCustomError("grid", "{msg}", {"msg": (
                    f"budgets: {self.method} runs once at N={top} and reads smaller N from its selections at "
                    f"n = {', '.join(map(str, have))}; {odd[0]} is not one of them")})
        for combo in self.combos():
            for n in self.run_budgets():
                data = {**self.search, **combo, **({key: n} if key else {})}
                try:
                    mcls.model_validate(data)
                except ValidationError as e:
                    err = e.errors()[0]
                    loc = ".".join(str(x) for x in err["loc"])
                    where = ("params" if loc in self.params else "search") + (f".{loc}" if loc else "")
                    at = ", ".join(f"{k}={_label(v)}" for k, v in combo.items())
                    raise PydanticCustomError("grid", "{msg}", {"msg": (
                        f"{where}: {err['msg'].removeprefix('Value error, ')} (at N={n}{', ' + at if at else ''})")})
        return self

    def combos(self) -> list[dict[str, Any]]:
        keys = list(self.params)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.params[k] for k in keys))]

    def run_budgets(self) -> list[int]:
        """The N actually run: the largest alone for a subsampled method, every budget otherwise."""
        b = list(self.budgets or [1])
        return [max(b)] if self.method in SUBSAMPLED else b


class FrontierConfig(Config):
    """How `tune.frontier` bins problems and which runs it compares (also `ponder frontier` flags)."""

    bins: Literal["level", "oracle"] = Field("level", description="difficulty bins: the problems' `level` (toy, "
                                             "MATH), or `oracle`: quantiles of the policy's own pass@1 (Snell et al.)")
    oracle_bins: int = Field(5, ge=1, description="number of oracle-difficulty bins")
    rules: list[Literal["naive", "weighted", "maj"]] = Field(
        ["weighted"], min_length=1, description="selection rules drawn as curves (a method that reports none of "
        "them, e.g. majority without a PRM, draws the ones it has)")
    baseline: str = Field("best_of_n", description="the method whose lower envelope C_bon(a) compute_saving "
                                                   "divides, and whose largest-N accuracy is the summary's target")
    baseline_rule: Literal["naive", "weighted", "maj"] = "weighted"
    cv_repeats: int = Field(50, ge=1, description="repeats of the stratified two-fold split that chooses the "
                                                  "compute-optimal strategy on one half and scores it on the other")
    subset_draws: int = Field(256, ge=1, description="n-subsets per problem that a subsampled method's expected "
                                                     "accuracy at n averages over (all of them where fewer)")
    seed: int = Field(0, description="seeds the splits and the drawn subsets")


@dataclass(frozen=True)
class Trial:
    """One search run of the sweep."""

    name: str                       # its directory under output_dir/trials, and its Tune trial name
    strategy: str                   # the curve it belongs to: the entry's label and its parameter combination
    method: str
    N: int                          # the N it runs at
    budgets: tuple[int, ...]        # the N it reports (several for a subsampled method)
    search: dict = field(default_factory=dict)   # the method's full section (the budget key included)
    entry: int = 0


class SweepRecipe(Config):
    job: Literal["tune"] = "tune"
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    policy: PoolConfig = Field(default_factory=PoolConfig)
    prm: PRMPoolConfig | None = None
    grid: list[GridEntry] = Field(..., description="the methods, each with its budgets and parameters")
    output_dir: str = "results/sweep"
    max_concurrent_trials: int = Field(1, ge=1, description="Tune trials at once (each keeps max_in_flight problems "
                                                            "in flight on the shared pools)")
    max_in_flight: int = Field(8, ge=1, description="problems in flight per trial (the search driver's window)")
    task_cpus: float = Field(0.0, ge=0.0, description="CPUs reserved per search task (they mostly wait on actors)")
    trial_cpus: float = Field(0.01, gt=0.0, description="CPUs reserved per Tune trial (it only waits on its tasks)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray cluster (default: this machine's, at "
                                                         "least what the pools and trials reserve)")
    max_failures: int = Field(1, ge=0, description="Tune retries of a trial that raised (solved problems are kept)")
    frontier: FrontierConfig = Field(default_factory=FrontierConfig)

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: list[GridEntry]) -> list[GridEntry]:
        if not v:
            raise ValueError("the grid is empty: give at least one method with its budgets")
        return v

    @model_validator(mode="after")
    def _trials(self) -> "SweepRecipe":
        seen: dict[str, int] = {}
        for t in self.trials():
            if t.name in seen and seen[t.name] != t.entry:
                raise PydanticCustomError("grid", "{msg}", {"msg": (
                    f"grid.{t.entry} makes trial {t.name!r} as grid.{seen[t.name]} does: give one of them a `name`")})
            seen[t.name] = t.entry
            msg = prm_pairing_error(method_config(t.method, t.search), self.prm)
            if msg:
                raise PydanticCustomError("grid", "{msg}", {"msg": f"grid.{t.entry}: {msg}"})
        needs_prm = [t for t in self.trials() if self.search_recipe(t).search.needs_prm]
        if needs_prm and self.prm is None:
            raise PydanticCustomError("grid", "{msg}", {"msg": (
                f"prm: missing; grid method {needs_prm[0].method} needs a PRM (give a `prm:` section: engine, model, "
                "format)")})
        return self

    def trials(self) -> list[Trial]:
        out = []
        for i, entry in enumerate(self.grid):
            key = budget_key(entry.method)
            base = entry.name or entry.method
            for combo in entry.combos():
                strategy = base + (f"({', '.join(f'{k}={_label(v)}' for k, v in combo.items())})" if combo else "")
                for n in entry.run_budgets():
                    reports = tuple(entry.budgets or [1]) if entry.method in SUBSAMPLED else (n,)
                    search = {**entry.search, **combo, **({key: n} if key else {})}
                    name = _safe("-".join([base, *(f"{k}={_label(v)}" for k, v in combo.items()), f"N{n}"]))
                    out.append(Trial(name, strategy, entry.method, n, reports, search, i))
        return out

    def trial(self, name: str) -> Trial:
        for t in self.trials():
            if t.name == name:
                return t
        raise KeyError(f"no trial {name!r} in this sweep")

    def trial_dir(self, trial: Trial) -> Path:
        return Path(self.output_dir) / TRIALS_DIR / trial.name

    def search_recipe(self, trial: Trial) -> SearchRecipe:
        """The `ponder search` recipe of one trial: its records are exactly that job's."""
        return SearchRecipe.model_validate({
            "data": self.data.model_dump(), "prompt": self.prompt.model_dump(), "method": trial.method,
            "search": dict(trial.search), "selection": self.selection.model_dump(), "policy": self.policy.model_dump(),
            "prm": self.prm.model_dump() if self.prm is not None else None, "output_dir": str(self.trial_dir(trial)),
            "max_in_flight": self.max_in_flight, "task_cpus": self.task_cpus, "num_cpus": self.num_cpus,
            "progress": False,
        })

    def pool_configs(self) -> tuple[PoolConfig, PRMPoolConfig | None]:
        """The pools the whole sweep shares: the policy, and the PRM if any trial needs one."""
        prm = None
        for t in self.trials():
            _, p = self.search_recipe(t).pool_configs()
            prm = prm or p
        return self.policy, prm

    def cluster_cpus(self, available: int) -> int:
        """CPUs of a local cluster: this machine's, and at least what the pools and the trials reserve."""
        import math

        policy, prm = self.pool_configs()
        need = policy.num_cpus * policy.replicas + (prm.num_cpus * prm.replicas if prm else 0)
        need += self.max_concurrent_trials * (self.trial_cpus + self.task_cpus * self.max_in_flight)
        return self.num_cpus or max(2, available, math.ceil(need))

    def identity(self) -> dict:
        """What must match for a sweep to resume into an output directory."""
        d = self.model_dump(mode="json")
        return {"data": {k: v for k, v in d["data"].items() if k != "shard"}, "prompt": d["prompt"],
                "selection": d["selection"], "policy_model": d["policy"]["model"],
                "prm_model": (d["prm"] or {}).get("model"), "grid": d["grid"]}


# ---------------------------------------------------------------- the sweep's directory


def prepare(recipe: SweepRecipe) -> dict[str, int]:
    """Write sweep.json and each trial's trial.json (a directory of another sweep is refused), and return each
    trial's count of problems still to solve (0: finished)."""
    from app.search import driver

    out = Path(recipe.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / SWEEP_FILE
    identity = recipe.identity()
    if path.is_file():
        old = json.loads(path.read_text()).get("identity", {})
        for k, v in identity.items():
            if old.get(k) != v:
                raise ConfigError(f"{out} holds a sweep whose '{k}' differs from this recipe's; give a new output_dir, "
                                  "or the same recipe to resume")
    trials = recipe.trials()
    doc = {"identity": identity, "recipe": recipe.model_dump(mode="json"), "trials": [asdict(t) for t in trials]}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    left: dict[str, int] = {}
    for t in trials:
        d = recipe.trial_dir(t)
        d.mkdir(parents=True, exist_ok=True)
        (d / TRIAL_FILE).write_text(json.dumps({**asdict(t), "subsampled": t.method in SUBSAMPLED}, indent=1) + "\n")
        search = recipe.search_recipe(t)
        problems, everything = driver.load(search)
        left[t.name] = len(driver.pending(search, problems, everything))
    return left


def _prompt_tokenizer(recipe: SearchRecipe):
    name = recipe.tokenizer_name
    if not name:
        return None
    from actors.engines.base import load_tokenizer
    from app.toy import resolve_model

    return load_tokenizer(resolve_model(name))


def _clean(metrics: dict) -> dict:
    """Tune stores numbers: None (no computed figures) becomes NaN."""
    return {k: (_clean(v) if isinstance(v, dict) else float("nan") if v is None else v) for k, v in metrics.items()}


def run_trial(config: dict, sweep: SweepRecipe, pools: Any) -> None:
    """One Tune trial: the search driver over the data set on the shared pools, then one `tune.report` per N."""
    from ray import tune as ray_tune

    from app.search import driver
    from tune import frontier

    trial = sweep.trial(config["trial"])
    recipe = sweep.search_recipe(trial)
    out = Path(recipe.output_dir)
    problems, everything = driver.load(recipe)
    todo = driver.pending(recipe, problems, everything)
    with open(out / RUNS_FILE, "a", encoding="utf-8") as f:  # one line per start: resume is visible
        f.write(json.dumps({"time": time.time(), "problems": len(problems), "to_solve": len(todo)}) + "\n")
    t0 = time.perf_counter()
    failures = driver.solve_all(recipe, todo, pools, _prompt_tokenizer(recipe)) if todo else []
    seconds = time.perf_counter() - t0
    rule = sweep.frontier.baseline_rule
    for point in frontier.trial_points(out):
        by_rule = point["accuracy"]
        main = by_rule.get(rule, next(iter(by_rule.values()), 0.0))
        ray_tune.report(_clean({
            "N": point["N"], "run_N": trial.N, "problems": point["problems"], "solved": point["solved"],
            "failed": point["failed"], "missing": point["missing"], "accuracy": main, "accuracy_by_rule": by_rule,
            "accuracy_by_level": {str(k): v.get(rule, next(iter(v.values()), 0.0))
                                  for k, v in point["by_level"].items()},
            **point["compute"], "trial_seconds": seconds, "solved_now": len(todo) - len(failures),
        }))
    if failures:
        raise RuntimeError(f"{len(failures)} of {len(problems)} problems failed in {trial.name} (first: "
                           f"{failures[0][0]}: {failures[0][1]}); the sweep's rerun retries them")


def _trial_name(trial: Any) -> str:
    return str(trial.config["trial"])


def run_sweep(recipe: SweepRecipe, pools: Any, out=None, verbose: int = 1):
    """Run (or resume) the sweep's Tune experiment at output_dir/tune/sweep on `pools`; returns the ResultGrid."""
    from ray import tune as ray_tune

    out = out or sys.stdout
    # absolute: Tune runs each trial in its own working directory, where a relative output_dir would land
    recipe = recipe.model_copy(update={"output_dir": str(Path(recipe.output_dir).resolve())})
    storage = Path(recipe.output_dir) / "tune"
    path = storage / "sweep"
    trainable = ray_tune.with_resources(ray_tune.with_parameters(run_trial, sweep=recipe, pools=pools),
                                        {"cpu": recipe.trial_cpus})
    if ray_tune.Tuner.can_restore(str(path)):
        print(f"tune: restoring {path} (finished trials are not run again)", file=out, flush=True)
        tuner = ray_tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = ray_tune.Tuner(
            trainable,
            param_space={"trial": ray_tune.grid_search([t.name for t in recipe.trials()])},
            # reuse_actors: a trial actor runs the next trial too (the imports and the pools' unpickling once)
            tune_config=ray_tune.TuneConfig(max_concurrent_trials=recipe.max_concurrent_trials, reuse_actors=True,
                                            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=ray_tune.RunConfig(name="sweep", storage_path=str(storage), verbose=verbose,
                                          failure_config=ray_tune.FailureConfig(max_failures=recipe.max_failures)),
        )
    return tuner.fit()
