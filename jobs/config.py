"""`ponder config show RECIPE [key=value ...]`: print the resolved config of a recipe.

A recipe names its job in the top-level key `job` (search, tune, route, toy, or a trainer: sft, prm, dpo, ...); the job
module's `Config` class (or `config_class(job)`) validates it.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from app.config import ConfigError, apply_overrides, build_config, dump_config, read_recipe
from jobs.common import user_errors

JOB_CONFIGS = {
    "search": "jobs.search",
    "tune": "jobs.tune",
    "route": "jobs.route",
    "toy": "jobs.toy",
}


def config_class(job: str, source: str):
    from jobs.train import JOBS as TRAINERS

    if job in TRAINERS:
        return importlib.import_module("jobs.train").config_class(job)
    if job not in JOB_CONFIGS:
        raise ConfigError(f"{source}: key 'job': unknown job {job!r} (one of: {', '.join(JOB_CONFIGS)})")
    module = importlib.import_module(JOB_CONFIGS[job])
    return module.config_class(job) if hasattr(module, "config_class") else module.Config


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ponder config")
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print the resolved config")
    show.add_argument("recipe")
    show.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    data, path = read_recipe(args.recipe)
    data = apply_overrides(data, args.overrides)
    job = data.get("job")
    if job is None:
        raise ConfigError(f"{path}: missing required key 'job' (e.g. job: search)")
    cfg = build_config(config_class(job, str(path)), data, str(path))
    print(f"# {path}")
    print(dump_config(cfg), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
