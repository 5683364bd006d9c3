"""The toy world: arithmetic problems, a character tokenizer, and shipped tiny checkpoints.

Model names `toy:policy` and `toy:prm` resolve to the checkpoints shipped in `app/toy/checkpoints/`.
"""
from __future__ import annotations

from pathlib import Path

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"


def resolve_model(name: str) -> str:
    """`toy:NAME` -> the shipped checkpoint folder; anything else (Hub name, local path) unchanged."""
    if not name.startswith("toy:"):
        return name
    path = CHECKPOINTS / name[len("toy:"):]
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"toy checkpoint {name!r} not found at {path}; rebuild the toy world with `ponder toy build`"
        )
    return str(path)
