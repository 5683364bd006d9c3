"""`ponder synthesize pairs --config RECIPE [key=value ...]` (= `python -m jobs.synthesize pairs ...`): training data
made by the policy (and PRM) pools.

`pairs`: preference pairs for DPO and step-DPO (`train.synthesize.pairs`: outcome, PRM best-of and step pairs, one
record each), resumable: run it again and the finished problems are skipped.

    ponder synthesize pairs --config toy/pairs
    ponder synthesize pairs --config toy/pairs kinds='[step]' problems=mc output=runs/toy/step_pairs.jsonl
"""
from __future__ import annotations

import sys
from typing import Sequence

from app.config import ConfigError, apply_overrides, build_config, read_recipe
from jobs.common import init_ray, recipe_parser, user_errors

KINDS = ("pairs",)  # LPR intermediate states and OmegaPRM's binary search are not built yet


def load(kind: str, recipe: str | None, overrides: Sequence[str]):
    from train.synthesize.pairs import PairsConfig

    if recipe is None:
        raise ConfigError(f"ponder synthesize {kind} needs --config RECIPE (e.g. toy/pairs)")
    data, path = read_recipe(recipe)
    data = apply_overrides(data, overrides)
    source = str(path) + (f" + overrides {' '.join(overrides)}" if overrides else "")
    if data.get("job", kind) != kind:
        raise ConfigError(f"{source}: key 'job' is {data.get('job')!r}, but the command asked for {kind!r}")
    return build_config(PairsConfig, data, source), source


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        got = repr(argv[0]) if argv else "nothing"
        raise ConfigError(f"ponder synthesize: give what to make first, one of {', '.join(KINDS)} (got {got})")
    kind = argv.pop(0)
    args = recipe_parser(f"ponder synthesize {kind}", "preference pairs for DPO / step-DPO").parse_args(argv)
    cfg, source = load(kind, args.config, args.overrides)
    from train.synthesize.pairs import check, run

    try:
        check(cfg)
    except (ConfigError, FileNotFoundError) as e:
        raise ConfigError(f"{source}: {e}") from None
    init_ray()
    stats = run(cfg)
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(stats["by_kind"].items())) or "none"
    print(f"pairs: {stats['pairs']} new pairs ({kinds}) from {stats['problems']} problems in {stats['seconds']:.0f} s; "
          f"{stats['skipped']} problems already done; written to {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
