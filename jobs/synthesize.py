"""`ponder synthesize KIND --config RECIPE [key=value ...]` (= `python -m jobs.synthesize KIND ...`): training data
made by the policy (and PRM) pools, resumable (run it again and the finished problems are skipped) and sharded
(`num_shards` / `shard`: one job per shard, each with its own output). `--dry-run` prints the pools' placement
and checks it fits, loading nothing.

- `mc`: Monte-Carlo step labels (`train.synthesize.mc_labels`; `k=0`: the toy checker's exact labels), PRM data
  and the trajectories step pairs start from.
- `pairs`: preference pairs for DPO and step-DPO (`train.synthesize.pairs`: outcome, PRM best-of and step pairs).
- `states`: LPR's intermediate states with their values 0..3, PRM data for `format: lpr` (`train.synthesize.states`).
- `omega`: OmegaPRM's binary-search step labels, PRM data in the MC-label format (`train.synthesize.omega`).

    ponder synthesize mc --config toy/mc
    ponder synthesize pairs --config toy/pairs
    ponder synthesize pairs --config toy/pairs kinds='[step]' problems=mc output=runs/toy/step_pairs.jsonl
    ponder synthesize states --config toy/states
    ponder synthesize omega --config toy/omega
"""
from __future__ import annotations

import sys
from importlib import import_module
from typing import Sequence

from app.config import ConfigError, apply_overrides, build_config, read_recipe
from jobs.common import dry_run, init_ray, recipe_parser, user_errors

# kind -> (module, config class, what it makes)
KINDS = {
    "mc": ("train.synthesize.mc_labels", "MCLabelConfig", "Monte-Carlo step labels (PRM data, step pairs)"),
    "pairs": ("train.synthesize.pairs", "PairsConfig", "preference pairs for DPO / step-DPO"),
    "states": ("train.synthesize.states", "StatesConfig", "LPR's valued intermediate states (PRM data)"),
    "omega": ("train.synthesize.omega", "OmegaConfig", "OmegaPRM's binary-search step labels (PRM data)"),
}


def load(kind: str, recipe: str | None, overrides: Sequence[str]):
    """The validated config of `kind` (a one-line ConfigError naming the file and key), before Ray starts."""
    from app.storage import check_output_path

    if recipe is None:
        raise ConfigError(f"ponder synthesize {kind} needs --config RECIPE (e.g. toy/{kind})")
    data, path = read_recipe(recipe)
    data = apply_overrides(data, overrides)
    source = str(path) + (f" + overrides {' '.join(overrides)}" if overrides else "")
    if data.get("job", kind) != kind:
        raise ConfigError(f"{source}: key 'job' is {data.get('job')!r}, but the command asked for {kind!r}")
    module, name, _ = KINDS[kind]
    cfg = build_config(getattr(import_module(module), name), data, source)
    try:
        check_output_path(cfg.output, "output", writable=True, kind="file")
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg, source


def summary(kind: str, stats: dict, output: str) -> str:
    done = f"{stats['skipped']} problems already done; written to {output}"
    took = f"from {stats['problems']} problems in {stats['seconds']:.0f} s"
    if kind == "pairs":
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(stats["by_kind"].items())) or "none"
        return f"pairs: {stats['pairs']} new pairs ({kinds}) {took}; {done}"
    if kind == "mc":
        return f"mc: {stats['trajectories']} new trajectories ({stats['steps']} labelled steps) {took}; {done}"
    if kind == "states":
        values = "/".join(str(n) for _, n in sorted(stats["values"].items()))
        return (f"states: {stats['records']} new records ({stats['state']} states, values 0..3: {values}; "
                f"{stats['full']} full trajectories) {took}; {done}")
    return (f"omega: {stats['records']} new records ({stats['labelled_steps']} labelled steps; {stats['kept']} "
            f"problems kept by the filter, {stats['searches']} searches, {stats['rollouts']} rollouts) {took}; {done}")


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        got = repr(argv[0]) if argv else "nothing"
        raise ConfigError(f"ponder synthesize: give what to make first, one of {', '.join(KINDS)} (got {got})")
    kind = argv.pop(0)
    args = recipe_parser(f"ponder synthesize {kind}", KINDS[kind][2]).parse_args(argv)
    cfg, source = load(kind, args.config, args.overrides)
    module = import_module(KINDS[kind][0])
    if hasattr(module, "check"):
        try:
            module.check(cfg)
        except (ConfigError, FileNotFoundError) as e:
            raise ConfigError(f"{source}: {e}") from None
    if args.dry_run:  # the pools' placement, checked against the cluster; loads nothing
        return dry_run({"policy": cfg.policy, **({"prm": cfg.prm} if getattr(cfg, "prm", None) else {})})
    from app.run_lock import RunLock

    with RunLock(f"{cfg.output}.lock", f"synthesize {kind}", key="output"):  # one run per output file
        init_ray()
        print(summary(kind, module.run(cfg), cfg.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
