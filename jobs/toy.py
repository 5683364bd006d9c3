"""`ponder toy build` / `ponder toy eval`: make and judge the toy world's shipped checkpoints.

    python -m jobs.toy build [--config toy/world] [--quick] [--out DIR] [--force] [key=value ...]
    python -m jobs.toy eval  [--config toy/world] [--models DIR] [--json] [key=value ...]

build (train.toy.build): SFT the policy, label its steps, train the PRM. Without --quick it writes the shipped
checkpoints (`app/toy/checkpoints`); --quick builds a smaller world into --out (default
`runs/toy-quick/checkpoints`) and refuses to write into the shipped location unless --force. A killed build
resumes when run again with the same config. eval (train.toy.evaluate): greedy / majority / PRM best-of-N per
level, the PRM's step AUC and step-choice accuracy; --json prints one object (keys per level and "all") last.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from app.config import ConfigError, dump_config
from jobs.common import init_ray, user_errors
from train.toy.config import DEFAULT_RECIPE, ToyConfig, load

Config = ToyConfig  # what `jobs.config` (`ponder config show`) validates a `job: toy` recipe with


def config_class(job: str):
    return ToyConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ponder toy", description="build or evaluate the toy world")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="generate data, train the policy and the PRM, write the checkpoints")
    b.add_argument("--config", "-c", default=None, help=f"recipe (default {DEFAULT_RECIPE})")
    b.add_argument("--quick", action="store_true", help="a smaller world in a few minutes (into --out)")
    b.add_argument("--out", default=None, help="output folder (default: the shipped checkpoints; --quick: runs/toy-quick/checkpoints)")
    b.add_argument("--force", action="store_true", help="allow --quick to overwrite the shipped checkpoints")
    b.add_argument("overrides", nargs="*")
    ev = sub.add_parser("eval", help="greedy / majority / PRM best-of-N per level, and the PRM's step AUC")
    ev.add_argument("--config", "-c", default=None, help=f"recipe (default {DEFAULT_RECIPE})")
    ev.add_argument("--models", default=None, help="folder with policy/ and prm/ (default: the shipped checkpoints)")
    ev.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ev.add_argument("overrides", nargs="*")
    return p


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    from app.toy import CHECKPOINTS

    if args.cmd == "build":
        from train.toy.build import build, build_summary

        cfg = load(args.config, args.overrides, args.quick)
        if args.out:
            out = Path(args.out)
        elif cfg.out:
            out = Path(cfg.out)
        else:
            out = Path("runs/toy-quick/checkpoints") if args.quick else CHECKPOINTS
        out = out.resolve()
        if args.quick and out == CHECKPOINTS.resolve() and not args.force:
            raise ConfigError(f"--quick would overwrite the shipped checkpoints in {out}; give --out DIR (or --force)")
        print(f"[toy build] {'quick ' if args.quick else ''}world into {out}\n" + dump_config(cfg), flush=True)
        init_ray()
        print(build_summary(build(cfg, out), out))
        return 0

    from train.toy.evaluate import eval_table, evaluate

    cfg = load(args.config, args.overrides, quick=False)
    models = Path(args.models).resolve() if args.models else CHECKPOINTS
    init_ray()
    res = evaluate(cfg, models, progress=not args.json)
    print(eval_table(res))
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
