"""`python -m jobs.train --config RECIPE [key=value ...]`: SFT, PRM, DPO, step-DPO, LaTRO or step-PPO training on
Ray Train + DeepSpeed.

The recipe's top-level `job:` picks the trainer: `sft` (train.sft.SFTConfig), `prm` (train.prm.PRMTrainConfig),
`dpo` or `step-dpo` (train.dpo.DPOConfig), `latro` (train.latro.LaTROConfig), `ppo` (train.ppo.PPOConfig).
`ponder train dpo --config RECIPE` names the trainer too (it must match the recipe's `job:`).
Checkpoints go to `train.storage_path/train.name` through Ray Train; running the same recipe again resumes the
run from its latest checkpoint. `output:` also writes the final model as a plain Hugging Face folder.

    python -m jobs.train --config toy/sft train.num_workers=1 output=/tmp/toy-policy
    RAY_ADDRESS=... ray job submit --working-dir . -- python -m jobs.train --config toy/prm
"""
from __future__ import annotations

import sys
from typing import Sequence

from app.config import ConfigError, apply_overrides, build_config, read_recipe
from jobs.common import dry_run, init_ray, recipe_parser, user_errors

JOBS = ("sft", "prm", "dpo", "step-dpo", "latro", "ppo")


def config_class(job: str):
    if job == "sft":
        from train.sft import SFTConfig

        return SFTConfig
    if job == "prm":
        from train.prm import PRMTrainConfig

        return PRMTrainConfig
    if job in ("dpo", "step-dpo"):
        from train.dpo import DPOConfig

        return DPOConfig
    if job == "latro":
        from train.latro import LaTROConfig

        return LaTROConfig
    if job == "ppo":
        from train.ppo import PPOConfig

        return PPOConfig
    raise ConfigError(f"jobs.train serves job {', '.join(JOBS)}, not {job!r}")


def trainer_module(job: str):
    import importlib

    modules = {"sft": "train.sft", "prm": "train.prm", "latro": "train.latro", "ppo": "train.ppo"}
    return importlib.import_module(modules.get(job, "train.dpo"))


def load(recipe: str | None, overrides: Sequence[str], trainer: str | None = None):
    return load_with_source(recipe, overrides, trainer)[0]


def load_with_source(recipe: str | None, overrides: Sequence[str], trainer: str | None = None):
    """(the validated config, the recipe's name for error messages)."""
    if recipe is None:
        raise ConfigError("jobs.train needs --config RECIPE (e.g. toy/sft, toy/prm, toy/dpo)")
    data, path = read_recipe(recipe)
    data = apply_overrides(data, overrides)
    source = str(path) + (f" + overrides {' '.join(overrides)}" if overrides else "")
    job = data.get("job")
    if job is None:
        raise ConfigError(f"{source}: missing required key 'job' ({' | '.join(JOBS)})")
    if job not in JOBS:
        raise ConfigError(f"{source}: key 'job': jobs.train serves {', '.join(JOBS)}, not {job!r}")
    if trainer is not None and trainer != job:
        raise ConfigError(f"{source}: key 'job' is {job!r}, but the command asked for {trainer!r}")
    cfg = build_config(config_class(job), data, source)  # train.storage_path is checked here (train.loop)
    if getattr(cfg, "output", None):
        from app.storage import check_output_path

        try:
            check_output_path(cfg.output, "output", writable=True)  # before it is made absolute: a relative one on
            # a cluster
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    from app.storage import check_writable, is_uri
    from train.loop import absolute_paths

    if not is_uri(cfg.train.storage_path):
        try:
            check_writable(cfg.train.storage_path, "train.storage_path")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return absolute_paths(cfg), source


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    trainer = argv.pop(0) if argv and not argv[0].startswith("-") and "=" not in argv[0] else None
    if trainer is not None and trainer not in JOBS:
        raise ConfigError(f"ponder train: unknown trainer {trainer!r} (one of {', '.join(JOBS)})")
    p = recipe_parser("ponder train", "SFT, PRM, DPO, step-DPO, LaTRO or step-PPO training on Ray Train + DeepSpeed: "
                      "ponder train [sft|prm|dpo|step-dpo|latro|ppo] --config RECIPE (the recipe's job: picks it)")
    args = p.parse_args(argv)
    cfg, source = load_with_source(args.config, args.overrides, trainer)
    mod = trainer_module(cfg.job)
    try:
        mod.check(cfg)  # missing or malformed data fail here, in one line, before Ray starts
    except (ConfigError, FileNotFoundError) as e:
        raise ConfigError(f"{source}: {e}") from None
    if args.dry_run:
        from train.rollouts import demand

        pools, extra = demand(cfg)
        return dry_run(pools, extra=extra)
    from train.resources import ClusterBusy
    from train.startup import StalledStart

    init_ray()
    try:
        result, path = mod.train(cfg)
    except (StalledStart, ClusterBusy) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    print(f"{cfg.job}: done; model at {path}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
