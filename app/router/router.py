"""A trained router on disk, and the two things done with one: fit it, judge it.

    folder/  model.safetensors (the MLP)   features.safetensors (PCA + scaler)   arms.json (each arm: method, rule,
             n, its run's config, its measured mean cost on the training questions)   config.yaml (the recipe)
             split.json (the questions of train / val / test, and those the filter dropped)   history.json

    router = fit(table, emb, split, recipe, filtered=True)     # emb: [Q, E] embeddings of table.questions
    router.save(folder); router = Router.load(folder)
    pred = router.predict(emb_q, questions)                    # [Q, A] predicted accuracy per arm
    result = evaluate(router, table, emb, split.test, recipe)  # curve over lambda, fixed arms, oracle, headline

Embeddings come in as numpy (the job computes them through `actors.encoder`), so this module needs no actor.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from app.router import policy
from app.router.data import Arm, LabelTable, Split, filter_rows
from app.router.features import Featurizer
from app.router.model import MLP, load_mlp, predict, save_mlp, train_mlp
from app.router.recipe import RouteRecipe


@dataclass
class Router:
    arms: list[Arm]
    table: list[dict]          # arms.json rows, in arm order
    featurizer: Featurizer
    mlp: MLP
    config: dict               # the recipe it was trained with
    split: dict | None = None
    history: list | None = None

    def predict(self, emb: np.ndarray, questions: Sequence[str]) -> np.ndarray:
        X = self.featurizer.rows(emb, questions, self.arms)
        return predict(self.mlp, X).reshape(len(questions), len(self.arms))

    def arm_cost(self, key: str | None = None) -> np.ndarray:
        key = key or self.config.get("cost", "flops")
        return np.array([row["cost"][key] for row in self.table], dtype=np.float64)

    def save(self, folder: str | Path) -> Path:
        import yaml

        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        save_mlp(self.mlp, d)
        self.featurizer.save(d)
        (d / "arms.json").write_text(json.dumps({"arms": self.table}, indent=1) + "\n")
        (d / "config.yaml").write_text(yaml.safe_dump(self.config, sort_keys=False))
        if self.split is not None:
            (d / "split.json").write_text(json.dumps(self.split) + "\n")
        if self.history is not None:
            (d / "history.json").write_text(json.dumps(self.history, indent=1) + "\n")
        return d

    @classmethod
    def load(cls, folder: str | Path) -> "Router":
        import yaml

        from app.config import ConfigError

        d = Path(folder)
        if not (d / "arms.json").is_file() or not (d / "model.safetensors").is_file():
            raise ConfigError(f"router: {d} is not a router folder (no arms.json / model.safetensors); "
                              f"train one with `ponder route train`")
        table = json.loads((d / "arms.json").read_text())["arms"]
        arms = [Arm(r["method"], r["rule"], int(r["n"])) for r in table]
        split = json.loads((d / "split.json").read_text()) if (d / "split.json").is_file() else None
        return cls(arms, table, Featurizer.load(d), load_mlp(d), yaml.safe_load((d / "config.yaml").read_text()),
                   split)


def arm_table(table: LabelTable, rows: Sequence[int]) -> list[dict]:
    r = list(rows)
    return [{"name": a.name, "method": a.method, "rule": a.rule, "n": a.n, "config": table.configs[a.name],
             "cost": {k: float(v[r, j].mean()) for k, v in table.costs.items()},
             "mean_label": float(table.labels[r, j].mean()), "source": table.sources[a.name]}
            for j, a in enumerate(table.arms)]


def fit(table: LabelTable, emb: np.ndarray, split: Split, recipe: RouteRecipe, filtered: bool, log=None) -> Router:
    """Train a router on the split's train questions (validated on its val ones), with or without the filter."""
    f = recipe.filter
    train, val, dropped = list(split.train), list(split.val), []
    if filtered:
        train, d1 = filter_rows(table, train, f.drop, f.zero, f.min_ns, recipe.data.seed)
        val, d2 = filter_rows(table, val, f.drop, f.zero, f.min_ns, recipe.data.seed)
        dropped = d1 + d2
    qs = table.questions
    feats = Featurizer.fit(emb[train], [qs[i] for i in train], table.arms, recipe.features.pca or None,
                           recipe.features.n_feature)
    X = feats.rows(emb[train], [qs[i] for i in train], table.arms)
    Xv = feats.rows(emb[val], [qs[i] for i in val], table.arms)
    model, history = train_mlp(X, table.labels[train].reshape(-1), Xv, table.labels[val].reshape(-1), recipe.mlp, log)
    config = recipe.model_dump(mode="json")
    config["filter"]["too_hard"] = filtered
    ids = table.ids
    split_ids = {"train": [ids[i] for i in train], "val": [ids[i] for i in val], "test": [ids[i] for i in split.test],
                 "dropped_too_hard": [ids[i] for i in dropped]}
    return Router(list(table.arms), arm_table(table, split.train), feats, model, config, split_ids, history)


def evaluate(router: Router, table: LabelTable, emb: np.ndarray, rows: Sequence[int], cost_key: str,
             lambdas: Sequence[float]) -> dict[str, Any]:
    """The router's accuracy vs mean cost over `lambdas` on `rows` (held-out), every fixed arm, the oracle."""
    names = [a.name for a in table.arms]
    if names != [a.name for a in router.arms]:
        raise ValueError("the router was trained on other arms than these records give; retrain it")
    r = list(rows)
    acc, cost_q = table.labels[r], table.costs[cost_key][r]
    pred = router.predict(emb[r], [table.questions[i] for i in r])
    points = policy.router_curve(pred, acc, cost_q, router.arm_cost(cost_key), lambdas)
    fixed = policy.fixed_arms(acc, cost_q, names)
    best = policy.oracle(acc, cost_q)
    return {"cost": cost_key, "questions": len(r), "curve": points, "fixed": fixed, "oracle": best,
            "headline": policy.headline(points, fixed, best)}
