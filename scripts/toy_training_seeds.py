"""The toy training table (docs/results.md, "Policy improvement on the toy world") from its per-run eval JSON.

    python scripts/toy_training_seeds.py [--runs runs/seeds] [--out results/toy/training_seeds.json]

Reads `ponder toy eval --json` outputs under RUNS/eval: NAME.val.json (the validation split, where each recipe's
hyperparameters were chosen: the grid point with the highest greedy accuracy over its levels) and NAME.test.json
(the test split, judged only for the chosen point, one file per training seed), NAME = RECIPE-TAG-seedS, and
RUNS/choice_RECIPE.json (the choice). SFT: sft.test.json is seed 0 (the shipped policy), sft-seedS.test.json the
toy build's SFT stage retrained with train.seed=S. Writes one JSON (mean and sample standard deviation over seeds
per level and over all, the validation grid beside it) and prints the markdown table.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

RECIPES = ("dpo", "step_dpo", "latro", "ppo")


def _greedy(path: Path) -> dict[str, float] | None:
    lines = path.read_text().strip().splitlines()
    if not lines:  # a run still going (or failed): left out
        return None
    res = json.loads(lines[-1])
    return {k: v["greedy"] for k, v in res.items()} | {"problems": {k: v["problems"] for k, v in res.items()}}


def collect(runs: Path) -> dict:
    ev = runs / "eval"
    out: dict = {"metric": "greedy accuracy", "val": {}, "rows": {}}
    if (ev / "sft.val.json").exists() and (g := _greedy(ev / "sft.val.json")):
        out["val"]["sft"] = g
    sft = {"0": ev / "sft.test.json"} | {m.group(1): f for f in sorted(ev.glob("sft-seed*.test.json"))
                                          if (m := re.fullmatch(r"sft-seed(\d+)\.test\.json", f.name))}
    sft = {s: g for s, f in sft.items() if f.exists() and (g := _greedy(f))}
    if sft:  # seed 0: the shipped policy (toy:policy); seed S: its build's SFT stage retrained with train.seed=S
        out["rows"]["sft"] = {"seeds": sorted(map(int, sft)), "per_seed": dict(sorted(sft.items()))}
    for recipe in RECIPES:
        choice_file = runs / f"choice_{recipe}.json"
        grid = {m.group(1): g for f in sorted(ev.glob(f"{recipe}-*-seed0.val.json"))
                if (m := re.fullmatch(rf"{recipe}-(.+)-seed0\.val\.json", f.name)) and (g := _greedy(f))}
        tested = {m.group(1) for f in ev.glob(f"{recipe}-*-seed*.test.json")
                  if (m := re.fullmatch(rf"{recipe}-(.+)-seed\d+\.test\.json", f.name))}
        if choice_file.exists():
            chosen = json.loads(choice_file.read_text())["chosen"]
            out["val"][recipe] = {"grid": grid, "chosen": chosen}
        elif len(tested) == 1:  # one recipe, not a choice: the shipped hyperparameters, never tuned here
            chosen = tested.pop()
        else:
            continue
        if chosen:
            per_seed = {m.group(1): g for f in sorted(ev.glob(f"{recipe}-{chosen}-seed*.test.json"))
                        if (m := re.fullmatch(rf"{recipe}-{re.escape(chosen)}-seed(\d+)\.test\.json", f.name))
                        and (g := _greedy(f))}
            if per_seed:
                out["rows"][recipe] = {"chosen": chosen, "chosen_on_val": recipe in out["val"],
                                       "seeds": sorted(map(int, per_seed)), "per_seed": per_seed}
        for tag in sorted(tested - {chosen}):  # also judged on test (before the choice), kept beside it, not chosen
            per_seed = {m.group(1): g for f in sorted(ev.glob(f"{recipe}-{tag}-seed*.test.json"))
                        if (m := re.fullmatch(rf"{recipe}-{re.escape(tag)}-seed(\d+)\.test\.json", f.name))
                        and (g := _greedy(f))}
            if per_seed:
                out["rows"][f"{recipe}:{tag}"] = {"chosen": tag, "chosen_on_val": False,
                                                  "seeds": sorted(map(int, per_seed)), "per_seed": per_seed}
    for row in out["rows"].values():
        runs_ = list(row["per_seed"].values())
        keys = [k for k in runs_[0] if k != "problems"]
        row["problems"] = runs_[0]["problems"]
        row["mean"] = {k: round(statistics.mean(r[k] for r in runs_), 4) for k in keys}
        row["sd"] = {k: round(statistics.stdev(r[k] for r in runs_), 4) if len(runs_) > 1 else None for k in keys}
    return out


def table(out: dict) -> str:
    levels = sorted({k for row in out["rows"].values() for k in row["mean"]}, key=lambda k: (k == "all", k))
    lines = ["| policy (greedy, mean ± sd over seeds) | seeds | " + " | ".join(f"L{x}" if x != "all" else "all"
                                                                          for x in levels) + " |",
             "|---|---|" + "---|" * len(levels)]
    for name, row in out["rows"].items():
        cells = []
        for x in levels:
            m, s = row["mean"].get(x), row["sd"].get(x)
            cells.append("-" if m is None else f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else ""))
        label = name + (f" ({row['chosen']})" if row.get("chosen") else "")
        lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", default="runs/seeds")
    p.add_argument("--out", default="results/toy/training_seeds.json")
    a = p.parse_args()
    out = collect(Path(a.runs))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(table(out))
    for recipe, v in out["val"].items():
        if recipe != "sft":
            print(recipe, "val (L3-5 greedy, all):", {t: g["all"] for t, g in v["grid"].items()}, "chosen:", v["chosen"])


if __name__ == "__main__":
    main()
