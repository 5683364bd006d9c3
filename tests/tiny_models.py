"""Random-weight tiny checkpoints for tests that need a real model but not a trained one."""
from __future__ import annotations

from pathlib import Path


def make_tiny_policy(path: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from app.toy.models import policy_config
    from app.toy.tokenizer import build_tokenizer

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = AutoModelForCausalLM.from_config(policy_config(tok, size))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny_prm(path: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    import torch

    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel
    from app.toy.models import prm_config
    from app.toy.tokenizer import build_tokenizer

    path = Path(path)
    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    tok = build_tokenizer()
    model = Qwen2ForProcessRewardModel(prm_config(tok, size))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
