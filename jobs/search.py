"""`ponder search --config RECIPE [key=value ...]` (= `python -m jobs.search`): solve a data set with a search method.

The job starts the policy (and PRM) pools, keeps a bounded window of per-problem Ray tasks in flight (`ray.wait`;
DVTS: one task per subtree plus a small task that joins them), writes each finished problem's record to its own
append-only shard under `output_dir`, and ends with the accuracy table per selection rule and n, plus compute per
problem. Started again with the same recipe, it skips the problems already written (a killed run resumes).

A recipe (see configs/toy/*.yaml):

    job: search
    data: {source: toy:test, limit: 200}
    prompt: {template: toy}
    method: beam_search
    search: {n: 16, beam_width: 4}          # the method's config (app.search.<method>), validated on load
    policy: {engine: hf, model: toy:policy} # actors.pool.PoolConfig, validated when the job starts
    prm: {engine: hf, model: toy:prm, format: qwen}
    output_dir: results/toy/beam_search
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Sequence

from pydantic import Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from app.config import Config as BaseConfig
from app.config import ConfigError
from app.search.methods import METHODS
from jobs.common import init_ray, parse_config, recipe_parser, user_errors

CHAT_TEMPLATES = ("qwen-math", "llama-cot")


class DataConfig(BaseConfig):
    source: str = Field("toy:test", description="a file, a data set folder, a Hub name (NAME[:SUBSET]:SPLIT) or toy:test")
    split: str | None = None
    subset: str | None = None
    limit: int | None = Field(None, ge=0, description="the first `limit` problems (after shuffling)")
    shuffle_seed: int | None = None
    shard: str | None = Field(None, description="INDEX/COUNT: this job solves every COUNT-th problem from INDEX")


class PromptConfig(BaseConfig):
    template: str = Field("plain", description="plain, toy, qwen-math or llama-cot (the last two use a chat template)")
    tokenizer: str | None = Field(None, description="tokenizer for chat templates (default: the policy model)")
    system_prompt: str | None = None


class SelectionConfig(BaseConfig):
    exact_grouping: bool = Field(False, description="group answers by exact string (OpenR) instead of equivalence")


class Config(BaseConfig):
    job: str = "search"
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    method: str = Field("best_of_n", description=f"one of: {', '.join(METHODS)}")
    search: Any = Field(default_factory=dict, validate_default=True, description="the method's config section")
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    policy: dict[str, Any] = Field(default_factory=lambda: {"engine": "hf", "model": "toy:policy"})
    prm: dict[str, Any] | None = None
    output_dir: str = "results/search"
    max_in_flight: int = Field(16, ge=1, description="problems in flight at once")
    task_cpus: float = Field(0.0, ge=0.0, description="CPUs reserved per problem task (they mostly wait on actors)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray cluster (default: this machine's)")
    progress: bool = True

    @field_validator("job")
    @classmethod
    def _job(cls, v: str) -> str:
        if v != "search":
            raise ValueError(f"this is the search job's config, not {v!r}")
        return v

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown search method {v!r} (one of: {', '.join(METHODS)})")
        return v

    @field_validator("search", mode="before")
    @classmethod
    def _search(cls, v: Any, info) -> Any:
        method = info.data.get("method")
        if method is None:
            return v  # the method's own error is reported
        mcls = METHODS[method].config
        if isinstance(v, mcls):
            return v
        if isinstance(v, BaseConfig):
            v = v.model_dump()
        try:
            return mcls.model_validate(v or {})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                msg = f"unknown key 'search.{loc}' for method {method} (valid: {', '.join(mcls.model_fields)})"
            else:
                msg = f"search{'.' + loc if loc else ''}: {err['msg'].removeprefix('Value error, ')}"
            raise PydanticCustomError("search_config", "{msg}", {"msg": msg}) from None


def pool_configs(cfg: Config) -> tuple[Any, Any | None]:
    """The policy and PRM pool sections, validated by the actor layer's config classes (imported here, lazily)."""
    from actors.pool import PoolConfig

    from app.config import build_config

    policy = build_config(PoolConfig, dict(cfg.policy), "policy")
    prm = None
    if cfg.prm is not None and cfg.search.needs_prm:
        import actors.prm as prm_mod

        prm_cls = getattr(prm_mod, "PRMPoolConfig", None) or PoolConfig
        prm = build_config(prm_cls, dict(cfg.prm), "prm")
        if getattr(prm, "format", None) == "toy-checker" and not cfg.data.source.startswith("toy:"):
            raise ConfigError(f"prm.format: toy-checker judges toy questions only, and data.source is "
                              f"{cfg.data.source!r}; give the prm a model and its format (qwen, math-shepherd, rlhflow)")
    elif cfg.search.needs_prm:
        raise ConfigError(f"method {cfg.method} needs a PRM: give the recipe a `prm:` section (engine, model, format)")
    return policy, prm


def identity(cfg: Config) -> dict:
    """What must match for a run to resume into an output directory (it changes the results)."""
    d = cfg.model_dump(mode="json")
    data = {k: v for k, v in d["data"].items() if k not in ("limit", "shard")}  # a run may grow, or run in shards
    return {
        "data": data, "prompt": d["prompt"], "method": d["method"], "search": d["search"],
        "selection": d["selection"], "policy_model": d["policy"].get("model"),
        "prm_model": _prm_identity(d["prm"] or {}) if cfg.search.needs_prm else None,
    }


def _prm_identity(prm: dict) -> str | None:
    """The PRM's model, or the checker when it stands in for one (so the two never share an output directory)."""
    return "toy-checker" if prm.get("format") == "toy-checker" else prm.get("model")


def load_tokenizer(cfg: Config):
    if cfg.prompt.template not in CHAT_TEMPLATES:
        return None
    from actors.engines.hf import load_tokenizer as load
    from app.toy import resolve_model

    name = cfg.prompt.tokenizer or cfg.policy.get("model")
    return load(resolve_model(str(name)))


def make_prompt(problem: Any, cfg: Config, tokenizer: Any) -> str:
    from app.problems import build_prompt

    return build_prompt(problem, tokenizer=tokenizer, template=cfg.prompt.template, system_prompt=cfg.prompt.system_prompt)


# ---------------------------------------------------------------- Ray tasks (defined lazily: importing this module needs no Ray)

_TASKS: dict[str, Any] = {}


def _tasks() -> dict[str, Any]:
    if _TASKS:
        return _TASKS
    import ray

    @ray.remote
    def solve_task(problem, prompt, method, search, policy_pool, prm_pool, exact):
        from app.search.run import record_from_parts, solve_part

        policy = policy_pool.client()
        prm = prm_pool.client() if prm_pool is not None else None
        part = solve_part(prompt, problem.question, method, search, policy, prm, None)
        return record_from_parts(problem, method, search, [part], exact_grouping=exact)

    @ray.remote
    def part_task(prompt, question, method, search, policy_pool, prm_pool, index):
        from app.search.run import solve_part

        policy = policy_pool.client()
        prm = prm_pool.client() if prm_pool is not None else None
        return solve_part(prompt, question, method, search, policy, prm, index)

    @ray.remote
    def join_task(problem, method, search, exact, *parts):
        from app.search.run import record_from_parts

        return record_from_parts(problem, method, search, list(parts), exact_grouping=exact)

    _TASKS.update(solve=solve_task, part=part_task, join=join_task)
    return _TASKS


def submit(problem: Any, prompt: str, cfg: Config, policy_pool: Any, prm_pool: Any):
    """One problem's record as an ObjectRef: one task, or (DVTS) one task per subtree and a join."""
    from app.search.run import parts_of

    t = _tasks()
    search = cfg.search.model_dump()
    opts = {"num_cpus": cfg.task_cpus}
    parts = parts_of(cfg.method, cfg.search)
    if parts == [None]:
        return t["solve"].options(**opts).remote(problem, prompt, cfg.method, search, policy_pool, prm_pool,
                                                 cfg.selection.exact_grouping)
    refs = [t["part"].options(**opts).remote(prompt, problem.question, cfg.method, search, policy_pool, prm_pool, i)
            for i in parts]
    return t["join"].options(**opts).remote(problem, cfg.method, search, cfg.selection.exact_grouping, *refs)


def start_pools(policy_cfg: Any, prm_cfg: Any):
    from actors.policy import start_policy_pool

    policy_pool = start_policy_pool(policy_cfg)
    prm_pool = None
    if prm_cfg is not None:
        try:
            from actors.prm import start_prm_pool

            prm_pool = start_prm_pool(prm_cfg)
        except BaseException:
            policy_pool.shutdown()
            raise
    return policy_pool, prm_pool


def run(cfg: Config, out=None) -> int:
    out = out or sys.stdout
    from app.problems import load_problems
    from app.search.results import ResultsWriter, finished_ids, format_report, read_records, write_run_config

    policy_cfg, prm_cfg = pool_configs(cfg)
    problems = load_problems(cfg.data.source, limit=cfg.data.limit, shuffle_seed=cfg.data.shuffle_seed,
                             shard=cfg.data.shard, split=cfg.data.split, subset=cfg.data.subset)
    out_dir = Path(cfg.output_dir)
    write_run_config(out_dir, {**identity(cfg), "config": cfg.model_dump(mode="json")}, list(identity(cfg)))
    done = finished_ids(out_dir)
    todo = [p for p in problems if p.id not in done]
    print(f"search: {cfg.method} on {len(problems)} problems from {cfg.data.source}; {len(problems) - len(todo)} "
          f"already in {out_dir}, {len(todo)} to solve", file=out, flush=True)
    failures: list[tuple[Any, str]] = []
    if todo:
        failures = _solve_all(cfg, todo, policy_cfg, prm_cfg, out_dir, ResultsWriter)
    ids = {p.id for p in problems}
    records = [r for r in read_records(out_dir) if r["id"] in ids]
    print(format_report(records, by_level=True, title=str(out_dir)), file=out, flush=True)
    if failures:
        print(f"{len(failures)} problems failed (run the same command again to retry them):", file=out)
        for pid, err in failures[:10]:
            print(f"  {pid}: {err}", file=out)
        return 1
    return 0


def _solve_all(cfg: Config, todo: list, policy_cfg: Any, prm_cfg: Any, out_dir: Path, writer_cls) -> list:
    import ray
    from tqdm import tqdm

    init_ray(cfg.num_cpus)
    tokenizer = load_tokenizer(cfg)
    policy_pool, prm_pool = start_pools(policy_cfg, prm_cfg)
    failures: list[tuple[Any, str]] = []
    writer = writer_cls(out_dir)
    bar = tqdm(total=len(todo), unit="problem", disable=not cfg.progress, dynamic_ncols=True)
    pending: dict[Any, Any] = {}
    queue = iter(todo)
    start, tokens = time.perf_counter(), 0
    try:
        while True:
            while len(pending) < cfg.max_in_flight:
                problem = next(queue, None)
                if problem is None:
                    break
                pending[submit(problem, make_prompt(problem, cfg, tokenizer), cfg, policy_pool, prm_pool)] = problem
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                problem = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as e:  # a task that failed after the pool's retries: report, leave for a rerun
                    failures.append((problem.id, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
                    bar.update(1)
                    continue
                writer.write(record)
                tokens += int(record["compute"].get("generated_tokens", 0))
                bar.update(1)
                bar.set_postfix(tok_s=f"{tokens / max(1e-9, time.perf_counter() - start):.0f}", failed=len(failures))
    finally:
        bar.close()
        writer.close()
        for ref in pending:
            ray.cancel(ref, force=False)
        if prm_pool is not None:
            prm_pool.shutdown()
        policy_pool.shutdown()
    return failures


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    parser = recipe_parser("ponder search", "Solve a data set with a search method against a verifier.")
    args = parser.parse_args(argv)
    cfg = parse_config(Config, args)
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
