"""`ponder route train|eval --config RECIPE [key=value ...]` (= `python -m jobs.route`): the learned router.

train: search records (`data.records`: search output dirs or sweep dirs) -> soft labels per (question, arm) ->
question embeddings (through an encoder actor, in batches) -> the MLP; writes the router folder `router_dir`
(app.router.router: weights, PCA + scaler, arm table with measured costs, the recipe, the split). With
`filter.report_both` the router trained the other way (with / without the "too hard" filter) goes to
`router_dir/other/`.
eval: both routers on the held-out (test) questions at the lambda chosen on the validation questions, against the
best fixed arm (chosen on train + val), the fixed arms' lower envelope at the same accuracy, greedy and the oracle
(`app.router.policy.assess` defines each figure); a table on stdout, eval.json, eval.txt and router.png in
`eval_dir` (default router_dir/eval), and the main router's figures as one JSON object on the last line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from app.router.recipe import RouteRecipe
from app.storage import check_output_path
from jobs.common import init_ray, parse_config, user_errors

Config = RouteRecipe


def _table(recipe: RouteRecipe):
    from app.router.data import build_table, load_runs

    runs = load_runs(recipe.data.records)
    table = build_table(runs, recipe.data.draws, recipe.data.seed, recipe.data.arms)
    return runs, table


def _embed(recipe: RouteRecipe, questions: list[str]):
    from actors.encoder import embed_questions

    e = recipe.encoder
    init_ray(recipe.num_cpus)
    return embed_questions(questions, e.name, e.pooling, e.max_length, e.sha256, e.batch_size, e.num_gpus)


def train(recipe: RouteRecipe, out=None) -> int:
    out = out or sys.stdout  # looked up per call: a stream bound at import time may be closed by now
    from app.router.data import split_questions
    from app.router.features import resolve_encoder
    from app.router.router import fit

    out_dir = Path(check_output_path(recipe.router_dir, "router_dir", writable=True))
    resolve_encoder(recipe.encoder.name, recipe.encoder.sha256)  # a bad encoder is one line before any work
    runs, table = _table(recipe)
    split = split_questions(table.ids, recipe.data.test, recipe.data.val, recipe.data.seed)
    print(f"route train: {len(runs)} runs, {len(table.arms)} arms, {len(table.ids)} questions "
          f"({len(table.dropped)} missing from some run, left out); split {len(split.train)} / {len(split.val)} / "
          f"{len(split.test)}", file=out, flush=True)
    emb = _embed(recipe, table.questions)
    variants = [recipe.filter.too_hard] + ([not recipe.filter.too_hard] if recipe.filter.report_both else [])
    for k, filtered in enumerate(variants):
        router = fit(table, emb, split, recipe, filtered)
        folder = router.save(out_dir if k == 0 else out_dir / "other")
        best = min(router.history, key=lambda h: h["val_bce"])
        print(f"  {'filtered' if filtered else 'unfiltered'}: {len(router.split['train'])} train questions "
              f"({len(router.split['dropped_too_hard'])} too-hard dropped), best val BCE {best['val_bce']:.4f} at epoch "
              f"{best['epoch']} -> {folder}", file=out, flush=True)
    return 0


def evaluate(recipe: RouteRecipe, out=None) -> int:
    out = out or sys.stdout
    from app.router import policy
    from app.router.report import figures, write_eval
    from app.router.router import Router, held_out_rows
    from app.router.router import evaluate as judge

    d = Path(recipe.router_dir)
    routers = [Router.load(d)] + ([Router.load(d / "other")] if (d / "other" / "arms.json").is_file() else [])
    _, table = _table(recipe)
    rows = held_out_rows(routers[0], table)
    emb_rows = rows["test"] + rows["val"]                    # only the questions the routers are run on
    emb_all = _embed(recipe, [table.questions[i] for i in emb_rows])
    lambdas = policy.default_lambdas(recipe.lambdas.num, recipe.lambdas.low, recipe.lambdas.high)
    results = {}
    for r in routers:
        rr = held_out_rows(r, table)
        emb = {k: emb_all[[emb_rows.index(i) for i in rr[k]]] for k in ("test", "val")}
        results["filtered" if r.config["filter"]["too_hard"] else "unfiltered"] = judge(r, table, emb, rr, recipe.cost,
                                                                                        lambdas)
    main_name = "filtered" if recipe.filter.too_hard else "unfiltered"
    fig = figures(results, main_name, recipe.cost)
    eval_dir = Path(check_output_path(recipe.eval_dir or d / "eval", "eval_dir"))
    paths = write_eval(results, fig, eval_dir, f"router on {len(rows['test'])} held-out questions ({recipe.cost})")
    print((eval_dir / "eval.txt").read_text(), file=out)
    print(f"wrote {paths['table']}, {paths['json']}, {paths['png']}", file=out)
    print(json.dumps(fig, sort_keys=True), file=out)
    return 0


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ponder route", description="Train or evaluate the learned router.")
    p.add_argument("action", choices=["train", "eval"])
    p.add_argument("--config", "-c", default=None, help="recipe: a YAML path or a name under configs/ (e.g. toy/router)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, dotted for nested keys")
    args = p.parse_intermixed_args(argv)
    recipe = parse_config(RouteRecipe, args)
    return train(recipe) if args.action == "train" else evaluate(recipe)


if __name__ == "__main__":
    sys.exit(main())
