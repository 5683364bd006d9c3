"""The transformers PRM engine: scores encoded trajectories (any `actors.prm_formats` layout) in padded batches."""
from __future__ import annotations

from typing import Sequence

from actors.engines.base import StepScores, count_parameters, torch_dtype
from actors.engines.prefix_cache import PrefixKVCache, auto_cache_mb, batch_from_hits, row_kv
from actors.prm_formats import EncodedTrajectory, PRMFormat


class HFPRMEngine:
    """Scores encoded trajectories with transformers.

    Rows are sorted by length and cut into sub-batches of at most `max_batch_tokens` padded tokens. A causal LM
    is run through its body only, and the output embedding is applied at the score positions to the two label
    rows: the same logits as the full LM head, without a [batch, length, vocabulary] tensor.
    Search scores each path again with one more step; with a prefix cache (`prefix_cache_mb`, default sized by the
    model as `prefix_cache.auto_cache_mb`; 0 turns it off) the keys, values and step scores
    of every scored path are kept (`prefix_cache.py`), so a path that extends one runs only its new tokens; each
    trajectory's scores (`StepScores`) say how many of its tokens and scores the cache served.
    num_parameters: every parameter; flop_parameters: the body's matmul parameters per token;
    score_head_parameters: the head's, per score (`base.count_parameters`).
    """

    def __init__(self, path: str, fmt: PRMFormat, dtype: str = "float32", device: str | None = None,
                 max_batch_tokens: int = 16384, pad_token_id: int | None = None, prefix_cache_mb: float | None = None):
        import torch

        self.fmt = fmt
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if fmt.head == "classifier":
            from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel

            model = Qwen2ForProcessRewardModel.from_pretrained(path, dtype=torch_dtype(dtype))
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
        self.model = model.to(self.device).eval()
        counts = count_parameters(self.model, fmt.head)
        self.num_parameters = counts.total
        self.flop_parameters = counts.per_token
        self.score_head_parameters = counts.per_score
        self.max_batch_tokens = max_batch_tokens
        tok = fmt.tokenizer
        pad = pad_token_id if pad_token_id is not None else tok.pad_token_id
        if pad is None:
            pad = tok.eos_token_id if tok.eos_token_id is not None else 0
        self.pad_token_id = pad
        self.max_length = getattr(self.model.config, "max_position_embeddings", None)
        self.prefix_cache = PrefixKVCache(int(auto_cache_mb(self.model, str(self.device), prefix_cache_mb) * 2**20))

    def _chunks(self, order: list[int], lengths: list[int]) -> list[list[int]]:
        chunks, cur, longest = [], [], 0
        for i in order:
            L = max(longest, lengths[i])
            if cur and L * (len(cur) + 1) > self.max_batch_tokens:
                chunks.append(cur)
                cur, L = [], lengths[i]
            cur.append(i)
            longest = L
        if cur:
            chunks.append(cur)
        return chunks

    def score(self, items: Sequence[EncodedTrajectory]) -> list[list[float]]:
        import torch

        out: list[list[float]] = [[] for _ in items]
        todo = [i for i, it in enumerate(items) if it.positions]
        lengths = [len(it.input_ids) for it in items]
        order = sorted(todo, key=lambda i: -lengths[i])
        for chunk in self._chunks(order, lengths):
            seqs = [items[i].input_ids for i in chunk]
            hits = [self._lookup(items[i]) for i in chunk]
            ids, mask, pos, cache, offs = batch_from_hits(seqs, [(c, kv) for c, kv, _ in hits], self.pad_token_id)
            rows, cols = [], []
            for r, i in enumerate(chunk):
                c = hits[r][0]
                for p in items[i].positions:
                    if p >= c:
                        rows.append(r)
                        cols.append(offs[r] + p - c)
            dev = self.device
            with torch.inference_mode():
                probs, kv_cache = self._probs(ids.to(dev), mask.to(dev), pos.to(dev), cache,
                                              torch.tensor(rows, dtype=torch.long, device=dev),
                                              torch.tensor(cols, dtype=torch.long, device=dev))
                probs = probs.tolist()
                k = 0
                for r, i in enumerate(chunk):
                    c, _, known = hits[r]
                    got = {}
                    for p in items[i].positions:
                        if p >= c:
                            got[p] = probs[k]
                            k += 1
                        else:
                            got[p] = known[p]
                    out[i] = StepScores([got[p] for p in items[i].positions], cached_tokens=c,
                                        cached_scores=sum(1 for p in items[i].positions if p < c))
                    if self.prefix_cache.enabled:
                        # the next call scores this path with one more step: keep its KV and its scores
                        self.prefix_cache.put(seqs[r], row_kv(kv_cache, r, mask[r].bool().to(dev)), got)
        return out

    def _lookup(self, item: EncodedTrajectory) -> tuple[int, list | None, dict]:
        """The longest cached prefix whose scores cover every step tag inside it; else none."""
        if not self.prefix_cache.enabled:
            return 0, None, {}
        c, kv, known = self.prefix_cache.lookup(item.input_ids)
        if kv is None or not all(p in known for p in item.positions if p < c):
            return 0, None, {}
        return c, kv, known

    def _probs(self, ids, mask, pos, cache, rows, cols):
        """P(good) at (rows, cols) of this batch, and the batch's KV cache (None when the prefix cache is off)."""
        use_cache = self.prefix_cache.enabled
        body = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                                     past_key_values=cache if use_cache else None, use_cache=use_cache)
        hidden = body.last_hidden_state[rows, cols]
        kv = body.past_key_values if use_cache else None
        if self.fmt.head == "classifier":
            return self.model.score(hidden).float().softmax(-1)[:, self.fmt.good_label], kv
        head = self.model.get_output_embeddings()
        label_ids = list(self.fmt.label_ids)
        logits = hidden @ head.weight[label_ids].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[label_ids]
        return logits.float().softmax(-1)[:, 0], kv
