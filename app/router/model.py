"""The router's model: an MLP from a (question, arm) feature row to the arm's probability of answering right.

    model, history = train_mlp(X_train, y_train, X_val, y_val, MLPConfig(hidden=[32, 16], epochs=40))
    p = predict(model, X)                    # numpy in, numpy out
    save_mlp(model, folder); load_mlp(folder)

Linear -> BatchNorm -> GELU per hidden layer, then Linear -> sigmoid; BCE against the soft labels; Adam. It is
validated after EVERY epoch and the best-validation weights are the ones kept (the fork validates every 200 batches,
so a short epoch never saves a checkpoint: not copied). The embeddings come in frozen (precomputed), as the fork's
PCA path does. Weights are saved as safetensors with the layer sizes in the metadata.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from pydantic import Field
from torch import nn

from app.config import Config


class MLPConfig(Config):
    hidden: list[int] = Field(default_factory=lambda: [32, 16], description="hidden layer sizes (fork README: 32, 16)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate (fork: 1e-4)")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(64, ge=2, description="(fork: 64)")
    epochs: int = Field(2, ge=1, description="(fork: 2); validated after every epoch, best-validation kept")
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads while training (a small MLP runs fastest on one)")


class MLP(nn.Module):
    def __init__(self, in_dim: int, hidden: Sequence[int]):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), nn.BatchNorm1d(h), nn.GELU()]
            d = h
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)
        self.in_dim, self.hidden = in_dim, list(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x).squeeze(-1))


def _loss(model: MLP, X: torch.Tensor, y: torch.Tensor, batch: int = 4096) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(X), batch):
            p = model(X[i:i + batch]).clamp(1e-7, 1 - 1e-7)
            total += float(nn.functional.binary_cross_entropy(p, y[i:i + batch], reduction="sum"))
    return total / max(1, len(X))


def train_mlp(X: np.ndarray, y: np.ndarray, Xv: np.ndarray, yv: np.ndarray, cfg: MLPConfig,
              log=None) -> tuple[MLP, list[dict]]:
    """Train on (X, y), validate on (Xv, yv) after every epoch; return the best-validation model and the history."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _train(X, y, Xv, yv, cfg, log)
    finally:
        torch.set_num_threads(threads)


def _train(X, y, Xv, yv, cfg: MLPConfig, log) -> tuple[MLP, list[dict]]:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    Xt, yt = torch.as_tensor(X, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    Xvt, yvt = torch.as_tensor(Xv, dtype=torch.float32), torch.as_tensor(yv, dtype=torch.float32)
    model = MLP(Xt.shape[1], cfg.hidden)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, history = float("inf"), copy.deepcopy(model.state_dict()), []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(Xt), generator=gen)
        run, seen = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            if len(b) < 2:  # BatchNorm needs two rows
                continue
            p = model(Xt[b]).clamp(1e-7, 1 - 1e-7)
            loss = nn.functional.binary_cross_entropy(p, yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            run, seen = run + loss.item() * len(b), seen + len(b)
        val = _loss(model, Xvt, yvt) if len(Xvt) else run / max(1, seen)
        history.append({"epoch": epoch, "train_bce": run / max(1, seen), "val_bce": val})
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
            history[-1]["best"] = True
        if log is not None:
            log(history[-1])
    model.load_state_dict(best_state)
    model.eval()
    return model, history


def predict(model: MLP, X: np.ndarray) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(X), dtype=torch.float32)).numpy().astype(np.float64)


def save_mlp(model: MLP, folder: str | Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(Path(folder) / "model.safetensors"),
              metadata={"in_dim": str(model.in_dim), "hidden": json.dumps(model.hidden)})


def load_mlp(folder: str | Path) -> MLP:
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(Path(folder) / "model.safetensors")
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    model = MLP(int(meta["in_dim"]), json.loads(meta["hidden"]))
    model.load_state_dict(load_file(path))
    model.eval()
    return model
