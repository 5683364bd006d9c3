"""The `ponder` command: `ponder JOB ...` is `python -m jobs.JOB ...`."""
from __future__ import annotations

import importlib
import sys

# subcommand -> module; each module has main(argv) -> int
COMMANDS = {
    "config": ("jobs.config", "print a recipe's resolved config"),
    "toy": ("jobs.toy", "build or evaluate the toy world (toy build / toy eval)"),
    "search": ("jobs.search", "solve a data set with a search method"),
    "report": ("jobs.report", "print the accuracy table of a search run again"),
    "export": ("jobs.export", "a run's records as Parquet (export RUN --parquet OUT)"),
    "train": ("jobs.train", "SFT, PRM, DPO, step-DPO, LaTRO, PPO on Ray Train + DeepSpeed (--config toy/sft)"),
    "synthesize": ("jobs.synthesize", "training data from the pools (synthesize pairs --config toy/pairs)"),
    "tune": ("jobs.tune", "sweep compute budgets on Ray Tune (--config toy/sweep_quick)"),
    "frontier": ("jobs.frontier", "the compute-optimal frontier of a sweep again"),
    "route": ("jobs.route", "train or evaluate the learned router (route train|eval --config toy/router)"),
    "serve": ("jobs.serve", "routed solving on Ray Serve (--config configs/serve/toy.yaml)"),
    "bench": ("jobs.bench", "benchmarks: grading, engine, search"),
}


def usage() -> str:
    lines = ["usage: ponder COMMAND [args]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines.append("\n`ponder COMMAND --help` for a command's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
