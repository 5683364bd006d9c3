"""A trained router on disk, and the two things done with one: fit it, judge it.

    folder/  model.safetensors (the MLP)   features.safetensors (PCA + scaler)   arms.json (each arm: method, rule,
             n, its run's config, its measured mean cost on the training questions)   config.yaml (the recipe)
             split.json (the questions of train / val / test, those the filter dropped, and val_all: every
             validation question, the filter's drops included)   history.json

    router = fit(table, emb, split, recipe, filtered=True)     # emb: [Q, E] embeddings of table.questions
    router.save(folder); router = Router.load(folder)
    pred = router.predict(emb_q, questions)                    # [Q, A] predicted accuracy per arm
    rows = held_out_rows(router, table)                        # test / val / select (train + val) rows of table
    result = evaluate(router, table, emb, rows, "flops", lambdas)   # policy.assess's figures, lambda chosen on val

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
                 "dropped_too_hard": [ids[i] for i in dropped], "val_all": [ids[i] for i in split.val]}
    return Router(list(table.arms), arm_table(table, split.train), feats, model, config, split_ids, history)


def held_out_rows(router: Router, table: LabelTable) -> dict[str, list[int]]:
    """Rows of `table` for judging `router`: `test` (its held-out questions), `val` (its validation questions, the
    too-hard filter's drops included: lambda is chosen on them), `select` (every other question: train + val, where
    the best fixed arm is chosen). A held-out question missing from the records is a ConfigError."""
    from app.config import ConfigError

    index = {pid: i for i, pid in enumerate(table.ids)}
    split = router.split or {}
    test = split.get("test") or []
    missing = [pid for pid in test if pid not in index]
    if missing or not test:
        raise ConfigError(f"data.records: {len(missing)} held-out questions of the router are not in the records "
                          f"(e.g. {(missing or ['(no split.json)'])[0]}); evaluate on the records it was trained on")
    val = [index[pid] for pid in split.get("val_all", split.get("val", [])) if pid in index]
    if not val:
        raise ConfigError("data.records: none of the router's validation questions is in the records; lambda is "
                          "chosen on them: evaluate on the records it was trained on")
    held = {index[pid] for pid in test}
    return {"test": [index[pid] for pid in test], "val": val,
            "select": [i for i in range(len(table.ids)) if i not in held]}


def evaluate(router: Router, table: LabelTable, emb: dict[str, np.ndarray], rows: dict[str, list[int]],
             cost_key: str, lambdas: Sequence[float]) -> dict[str, Any]:
    """`policy.assess` on `rows` (from `held_out_rows`); `emb`: "test" and "val" -> embeddings of those rows."""
    from app.config import ConfigError

    names = [a.name for a in table.arms]
    if names != [a.name for a in router.arms]:
        raise ConfigError(f"router: trained on other arms than these records give ({len(router.arms)} vs "
                          f"{len(names)}); retrain it with `ponder route train` on these records")
    cost = table.costs[cost_key]

    def part(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = rows[key]
        return router.predict(emb[key], [table.questions[i] for i in r]), table.labels[r], cost[r]

    sel = rows["select"]
    out = policy.assess(names, router.arm_cost(cost_key), lambdas, part("val"), part("test"),
                        (table.labels[sel], cost[sel]))
    return {"cost": cost_key, "questions": len(rows["test"]), **out}
