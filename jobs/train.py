"""`python -m jobs.train --config RECIPE [key=value ...]`: SFT or PRM training on Ray Train + DeepSpeed.

The recipe's top-level `job:` picks the trainer: `sft` (train.sft.SFTConfig) or `prm` (train.prm.PRMTrainConfig).
Checkpoints go to `train.storage_path/train.name` through Ray Train; running the same recipe again resumes the
run from its latest checkpoint. `output:` also writes the final model as a plain Hugging Face folder.

    python -m jobs.train --config toy/sft train.num_workers=1 output=/tmp/toy-policy
    RAY_ADDRESS=... ray job submit --working-dir . -- python -m jobs.train --config toy/prm
"""
from __future__ import annotations

import sys
from typing import Sequence

from app.config import ConfigError, apply_overrides, build_config, read_recipe
from jobs.common import init_ray, recipe_parser, user_errors

JOBS = ("sft", "prm")


def config_class(job: str):
    if job == "sft":
        from train.sft import SFTConfig

        return SFTConfig
    if job == "prm":
        from train.prm import PRMTrainConfig

        return PRMTrainConfig
    raise ConfigError(f"jobs.train serves job sft or prm, not {job!r}")


def load(recipe: str | None, overrides: Sequence[str]):
    if recipe is None:
        raise ConfigError("jobs.train needs --config RECIPE (e.g. toy/sft or toy/prm)")
    data, path = read_recipe(recipe)
    data = apply_overrides(data, overrides)
    source = str(path) + (f" + overrides {' '.join(overrides)}" if overrides else "")
    job = data.get("job")
    if job is None:
        raise ConfigError(f"{source}: missing required key 'job' (sft or prm)")
    if job not in JOBS:
        raise ConfigError(f"{source}: key 'job': jobs.train serves sft or prm, not {job!r}")
    return absolute_paths(build_config(config_class(job), data, source))


def absolute_paths(cfg):
    """Relative file paths of the recipe, made absolute here: Ray Train workers do not run in this directory."""
    from pathlib import Path

    update = {}
    for key in ("data", "eval_data", "output", "model", "init_from"):
        value = getattr(cfg, key, None)
        if not isinstance(value, str) or ":" in value or Path(value).is_absolute():
            continue  # unset, a toy:/new: name or a Hub id with a colon, or already absolute
        if key == "output" or Path(value).exists():
            update[key] = str(Path(value).resolve())
    return cfg.model_copy(update=update) if update else cfg


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = recipe_parser("ponder train", "SFT or PRM training on Ray Train + DeepSpeed (job: sft | prm in the recipe)")
    args = p.parse_args(argv)
    cfg = load(args.config, args.overrides)
    if cfg.job == "sft":
        from train.sft import check, train
    else:
        from train.prm import check, train
    check(cfg)  # missing files fail here, before Ray starts
    init_ray()
    result, path = train(cfg)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    print(f"{cfg.job}: done; model at {path}")
    print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
