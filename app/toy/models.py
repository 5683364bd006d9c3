"""Shapes of the toy models: a Qwen2 causal LM and a Qwen2.5-Math-PRM-layout PRM, head size 64.

Both shapes are served by transformers and by vLLM (CPU and GPU), so every toy feature runs on either engine.
"""
from __future__ import annotations

SIZES = {
    # name: (hidden, layers, heads, intermediate)
    "tiny": (128, 2, 2, 256),
    "small": (256, 4, 4, 768),
}


def _qwen2_kwargs(tokenizer, size: str, max_positions: int) -> dict:
    if size not in SIZES:
        raise ValueError(f"unknown toy model size {size!r}; one of {sorted(SIZES)}")
    hidden, layers, heads, inter = SIZES[size]
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=inter,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        rope_theta=10000.0,
        use_sliding_window=False,
    )


def policy_config(tokenizer, size: str = "small", max_positions: int = 1024):
    from transformers import Qwen2Config

    cfg = Qwen2Config(**_qwen2_kwargs(tokenizer, size, max_positions))
    cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def prm_config(tokenizer, size: str = "tiny", max_positions: int = 1024):
    from transformers import Qwen2Config

    from app.toy.tokenizer import STEP_TAG

    cfg = Qwen2Config(**_qwen2_kwargs(tokenizer, size, max_positions), num_labels=2)
    cfg.tie_word_embeddings = False
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    cfg.step_tag_id = tokenizer.convert_tokens_to_ids(STEP_TAG)
    return cfg
