"""The toy world's character-level tokenizer, saved as a Hugging Face `tokenizer.json`.

One token per character keeps the toy models tiny and makes every step boundary ("\\n\\n") and answer digit
visible to the model, while AutoTokenizer, vLLM and TRL load it like any Hub tokenizer.
"""
from __future__ import annotations

import string

PAD, EOS, UNK, BOS = "<|pad|>", "<|eos|>", "<|unk|>", "<|bos|>"
STEP_TAG = "<extra_0>"  # the PRM's step tag, as in Qwen2.5-Math-PRM
SPECIALS = [PAD, EOS, UNK, BOS, STEP_TAG]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # letters, digits, punctuation, space, "\n"


def vocabulary() -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for c in CHARS:
        vocab[c] = len(vocab)
    return vocab


def build_tokenizer():
    """A PreTrainedTokenizerFast over single characters; specials are matched whole."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        bos_token=BOS,
        additional_special_tokens=[STEP_TAG],
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=1024,
    )
