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
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the recipe, print the placement plan and check it against the cluster in RAY_ADDRESS "
                        "(or a local one) without loading any model: exit 0 if it fits, 2 if not")
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
        # address="local": always a new instance of this job's own, never one another run left behind or a
        # `ray start` head found by auto-detection (which fails with "Found multiple active Ray instances").
        # Ray's default starts the dashboard: Ray Train's PlacementGroupCleaner asks its State API whether the
        # controller is alive, and without it logs a warning every second of every training run.
        ray.init(address="local", num_cpus=num_cpus or max(2, os.cpu_count() or 2), **kwargs)
        shutdown_ray_on_signals()


def shutdown_ray_on_signals() -> None:
    """SIGTERM and SIGHUP end a job that started its own Ray as Ctrl-C does: an exception in the main thread, so
    `finally` blocks and Ray's atexit `ray.shutdown()` stop the local instance with it. Called after `ray.init`:
    the driver's core worker installs a native failure handler that aborts the process on SIGTERM (exit -6, no
    atexit), replacing the Python handler `ray.init` set before it, and SIGHUP's default kills Python outright;
    either way the instance would stay behind for the next run to stumble on."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _count(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _bytes(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def describe_memory(est: dict) -> str:
    """One line of `actors.placement.estimate_memory`'s figures."""
    line = (f"{_count(est['params'])} params, {est['dtype']}: weights {_bytes(est['weights_gib_per_gpu'])}/GPU, "
            f"KV {est['kv_kib_per_token_per_gpu']:.0f} KiB/token/GPU")
    if "kv_tokens_per_gpu" in est:
        line += (f", room for ~{est['kv_tokens_per_gpu']:,} KV tokens/GPU at gpu_memory_utilization "
                 f"{est['gpu_memory_utilization']:g} of {est['gpu_memory_gib']:g} GiB")
    return line


def dry_run(pools: dict, out=None, gpu_memory_gib: float | None = None,
            extra: dict[str, list[list[dict]]] | None = None, num_cpus: int | None = None) -> int:
    """The placement plan of a job's pools, with each model's estimated weight and KV memory per GPU, checked
    against the cluster's free resources; loads no model. ConfigError (exit 2, one line) when it does not fit.
    `extra`: other demand of the job by owner (e.g. {"train": [[{"CPU": 2, "GPU": 1}]] * workers}), checked with it.
    `num_cpus`: the size of the local cluster the job itself would start (without RAY_ADDRESS)."""
    from actors.placement import check_fit, cluster_gpu_memory_gib, cluster_has_gpus, estimate_memory, plan_pools

    out = out or sys.stdout
    init_ray(num_cpus)
    import ray

    plan = plan_pools(pools, gpus=cluster_has_gpus())
    for owner, groups in (extra or {}).items():
        plan.add_groups(owner, groups)
    total = ray.cluster_resources()
    print(f"cluster: {total.get('GPU', 0):g} GPUs, {total.get('CPU', 0):g} CPUs "
          f"({os.environ.get('RAY_ADDRESS') or 'local'})", file=out)
    gib = gpu_memory_gib or cluster_gpu_memory_gib()
    for name, cfg in pools.items():
        est = estimate_memory(cfg, gib) if plan.gpus else estimate_memory(cfg)
        mem = est.get("error") or describe_memory(est)
        print(f"{name}: {cfg.engine} {cfg.model}, {cfg.replicas} replica(s) x tp {cfg.tp}; {mem}", file=out)
    print(plan.table(), file=out)
    check_fit(plan, settle_s=2.0)
    print("fits: the cluster has the free resources for this plan", file=out, flush=True)
    return 0


def user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Turn a user's mistake (bad recipe, bad key, missing file) into one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        try:
            return int(main(argv) or 0)
        except (ConfigError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(f"interrupted ({e})" if str(e) else "interrupted", file=sys.stderr)  # Ctrl-C, or SIGTERM/SIGHUP
            return 130

    return wrapped
