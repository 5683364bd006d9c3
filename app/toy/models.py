"""Shapes of the toy models: a Llama causal LM and a Qwen2.5-Math-PRM-layout PRM, head size 64.

Both shapes are served by transformers and by vLLM (CPU and GPU), so every toy feature runs on either engine.
The policy is a Llama, not a Qwen2: transformers 5 forces its byte-level Qwen2Tokenizer onto any `qwen2`
checkpoint loaded with AutoTokenizer (as vLLM does), which would silently drop the toy tokenizer's spaces and
newlines; for `llama` it keeps the saved `tokenizer.json`. The PRM must be Qwen2 (its vLLM class is), so its
tokenizer is always loaded with `app.toy.tokenizer.load_tokenizer` and fed to vLLM as token ids.
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
    from transformers import LlamaConfig

    kwargs = _qwen2_kwargs(tokenizer, size, max_positions)
    kwargs.pop("use_sliding_window")
    cfg = LlamaConfig(**kwargs, attention_bias=False, mlp_bias=False)
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


def prm_config(tokenizer, size: str = "tiny", max_positions: int = 1024):
    from transformers import Qwen2Config

    from app.toy.tokenizer import STEP_TAG

    cfg = Qwen2Config(**_qwen2_kwargs(tokenizer, size, max_positions), num_labels=2)
    cfg.tie_word_embeddings = False
    cfg.architectures = ["Qwen2ForProcessRewardModel"]
    cfg.step_tag_id = tokenizer.convert_tokens_to_ids(STEP_TAG)
    return cfg
