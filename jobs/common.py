"""What every job shares: argument parsing for `--config RECIPE key=value ...`, Ray start-up, clean errors."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Callable, Sequence, TypeVar

from app.config import Config, ConfigError, load_config

C = TypeVar("C", bound=Config)


def recipe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", "-c", default=None, help="recipe: a YAML path or a name under configs/ (e.g. toy/beam_search)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys (e.g. search.n=16)")
    return p


def parse_config(cls: type[C], args: argparse.Namespace) -> C:
    return load_config(cls, args.config, args.overrides)


def init_ray(num_cpus: int | None = None, **kwargs) -> None:
    """Connect to the cluster in RAY_ADDRESS (as `ray job submit` sets it), else start a local one sized to this machine."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        # Ray's default starts the dashboard: Ray Train's PlacementGroupCleaner asks its State API whether the
        # controller is alive, and without it logs a warning every second of every training run.
        ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), **kwargs)


def user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Turn a user's mistake (bad recipe, bad key, missing file) into one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except (ConfigError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped
