"""A KV store keyed by token prefixes, so the transformers engines prefill only what is new.

Step-wise search sends the same text back again and again: beam search, DVTS and REBASE continue each parent
with prompt = the parent's prompt + the step it just generated, and the PRM scores each beam's path again with
one more step. Without a cache every call recomputes the whole prefix; in beam search on the toy world that was
a third of the policy's time. vLLM does this itself (automatic prefix caching, `enable_prefix_caching`); this
is the same idea for the HF engines, whole entries rather than blocks: an entry is the keys and values of one
row's tokens, a lookup finds the longest stored entry that is a prefix of the new tokens.

Entries are evicted least-recently-used beyond `max_bytes`. Lookup hashes every prefix of the query once
(polynomial hash) and checks the stored lengths, so it costs O(len(query) + stored lengths), not a scan of
every entry. A hit is only an exact token match: with a BPE tokenizer, re-encoding a decoded step can split
tokens differently at the seam, and that row then finds a shorter prefix or none, never a wrong one.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Sequence

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def prefix_hashes(tokens: Sequence[int]) -> list[int]:
    """h[i] = hash of tokens[:i] (h[0] is the empty prefix)."""
    h, out = 0, [0]
    for t in tokens:
        h = (h * _BASE + int(t) + 1) % _MOD
        out.append(h)
    return out


AUTO_ROW_TOKENS = 2048   # a long step-wise row
AUTO_ROWS = 16           # rows the automatic size holds
AUTO_MIN_ROWS = 4        # fewer than this and the cache only churns: off
AUTO_FLOOR_MB = 512.0    # small models: plenty of short rows
AUTO_CAP_MB = {"cpu": 2048.0, "cuda": 8192.0}


def kv_bytes_per_token(model) -> int:
    """Keys and values of one token over all layers, in the model's own dtype."""
    c = getattr(model.config, "get_text_config", lambda: model.config)()
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def auto_cache_mb(model, device: str, requested_mb: float | None) -> float:
    """The prefix cache's size: `requested_mb` when given; else sized by the model, room for AUTO_ROWS rows of
    AUTO_ROW_TOKENS tokens (at least 512 MiB) up to a cap per device (2 GiB CPU, 8 GiB GPU), and off (0) when the
    cap holds fewer than AUTO_MIN_ROWS rows: a 2k-token row of an 8B model is ~256 MiB, and a cache of two such rows evicts
    every entry before it is hit again."""
    if requested_mb is not None:
        return float(requested_mb)
    row_mb = kv_bytes_per_token(model) * AUTO_ROW_TOKENS / 2**20
    cap = AUTO_CAP_MB["cuda" if str(device).startswith("cuda") else "cpu"]
    size = min(cap, max(AUTO_FLOOR_MB, AUTO_ROWS * row_mb))
    return size if size >= AUTO_MIN_ROWS * row_mb else 0.0


class PrefixKVCache:
    """LRU map token-prefix -> per-layer (keys, values), each [heads, length, head_dim] without padding, plus what
    the engine computed at those tokens and wants back (`extra`: the PRM keeps its step scores there)."""

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"prefix_cache_mb must be >= 0 (0 turns the prefix cache off), got {max_bytes / 2**20:g}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[int, int], tuple[tuple[int, ...], list, object, int]] = OrderedDict()  # tokens, kv, extra, bytes
        self._lengths: Counter[int] = Counter()
        self.bytes = 0
        self.reset_counters()

    def reset_counters(self) -> None:
        self.lookups = self.hits = self.query_tokens = self.hit_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def lookup(self, tokens: Sequence[int]) -> tuple[int, list | None, object]:
        """(length, kv, extra) of the longest stored prefix shorter than `tokens` (one token is always left to run);
        (0, None, None) on a miss."""
        self.lookups += 1
        self.query_tokens += len(tokens)
        if not self._entries:
            return 0, None, None
        hs = prefix_hashes(tokens)
        for L in sorted((L for L in self._lengths if L < len(tokens)), reverse=True):
            key = (L, hs[L])
            hit = self._entries.get(key)
            if hit is not None and hit[0] == tuple(tokens[:L]):
                self._entries.move_to_end(key)
                self.hits += 1
                self.hit_tokens += L
                return L, hit[1], hit[2]
        return 0, None, None

    def put(self, tokens: Sequence[int], kv: list, extra: object = None) -> None:
        if not self.enabled or not tokens:
            return
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)
        if size > self.max_bytes:
            return
        key = (len(tokens), prefix_hashes(tokens)[-1])
        old = self._entries.pop(key, None)
        if old is not None:
            self._forget(key, old)
        self._entries[key] = (tuple(tokens), kv, extra, size)
        self._lengths[len(tokens)] += 1
        self.bytes += size
        while self.bytes > self.max_bytes and self._entries:
            k, e = self._entries.popitem(last=False)
            self._forget(k, e)

    def _forget(self, key: tuple[int, int], entry: tuple) -> None:
        self._lengths[key[0]] -= 1
        if self._lengths[key[0]] <= 0:
            del self._lengths[key[0]]
        self.bytes -= entry[3]

    def clear(self) -> None:
        self._entries.clear()
        self._lengths.clear()
        self.bytes = 0

    def stats(self) -> dict:
        """hit_share: the share of looked-up tokens that came from the cache (prefill the engine did not redo)."""
        return {"entries": len(self._entries), "bytes": self.bytes, "lookups": self.lookups, "hits": self.hits,
                "query_tokens": self.query_tokens, "hit_tokens": self.hit_tokens,
                "hit_share": self.hit_tokens / self.query_tokens if self.query_tokens else 0.0}


def batch_from_hits(seqs: Sequence[Sequence[int]], hits: Sequence[tuple[int, list | None]], pad_token_id: int):
    """One batch that resumes each sequence from its cached prefix.

    Row u is laid out [pad, cached prefix (c_u), pad, new tokens (s_u)]: the cached keys and values are left-padded
    to the longest prefix P, the new tokens to the longest rest S, the holes masked out and positions given
    explicitly, so attention sees exactly what one pass over the whole sequence would. Returns (input_ids [U, S],
    attention_mask [U, P + S], position_ids [U, S], a `kv_cache.growing_cache` holding the prefixes (empty without
    hits), offsets) where the new token at position c_u + i of row u sits at column offsets[u] + i of input_ids
    (and of the model's outputs).
    """
    import torch

    U = len(seqs)
    P = max((c for c, _ in hits), default=0)
    S = max(len(p) - c for p, (c, _) in zip(seqs, hits))
    ids = torch.full((U, S), pad_token_id, dtype=torch.long)
    mask = torch.zeros((U, P + S), dtype=torch.long)
    pos = torch.zeros((U, S), dtype=torch.long)
    offsets = []
    for u, (p, (c, _)) in enumerate(zip(seqs, hits)):
        s = len(p) - c
        ids[u, S - s:] = torch.tensor(list(p[c:]), dtype=torch.long)
        mask[u, P - c: P] = 1
        mask[u, P + S - s:] = 1
        pos[u, S - s:] = torch.arange(c, len(p))
        offsets.append(S - s)
    layers = []
    if P:
        first = next(kv for _, kv in hits if kv is not None)
        for li, (k0, v0) in enumerate(first):
            K = k0.new_zeros((U, k0.shape[0], P, k0.shape[2]))
            V = v0.new_zeros((U, v0.shape[0], P, v0.shape[2]))
            for u, (c, kv) in enumerate(hits):
                if kv is not None:
                    K[u, :, P - c:] = kv[li][0]
                    V[u, :, P - c:] = kv[li][1]
            layers.append((K, V))
    from actors.engines.kv_cache import growing_cache

    cache = growing_cache(layers)
    return ids, mask, pos, cache, offsets


def row_kv(cache, row: int, cols) -> list:
    """Row `row`'s keys and values at the unmasked columns `cols` (a bool mask over the cache's length), copied."""
    return [(layer.keys[row][:, cols].clone(), layer.values[row][:, cols].clone()) for layer in cache.layers]
