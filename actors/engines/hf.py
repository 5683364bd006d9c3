"""The transformers engine: one left-padded batch per `generate` call, decoded by hand over the KV cache.

Why a hand-written loop rather than `model.generate`: every row of the batch has its own temperature, top_p,
seed, stop strings and max_tokens (search methods mix greedy lookaheads with sampled expansions in one batch),
stop strings must end the text exactly where vLLM ends it, and a row that has finished leaves the batch (its
KV cache rows are dropped) so the rest decode faster.

Semantics, kept identical to `actors.engines.vllm.VLLMEngine` so either engine serves every search method:

- prompts are tokenized with the tokenizer's defaults (special tokens as the tokenizer adds them, as vLLM does),
  except that a text which already starts with the tokenizer's BOS token (a chat template that renders it, as
  Llama-3's does) gets no second one, unless `quirk_double_bos` (`base.encode_prompt`, shared with vLLM);
  a prompt given as token ids is used as is;
- temperature 0 is greedy; otherwise logits / temperature, then nucleus (top_p) filtering, then sampling;
- a request with `seed=s` samples its k-th continuation (k = 0..n-1) from a generator seeded with `s + k` (vLLM
  seeds the children of an n > 1 request the same way), so the result does not depend on what else is in the
  batch; a request without a seed draws fresh randomness;
- the text is detokenized with special tokens skipped; it ends at *and includes* the earliest stop string
  (finish_reason "stop", stop_reason the string; checked after every token, so the first stop string to
  complete wins, ties going to the one listed first, as in vLLM); the generated token count runs up to the token that completed
  the stop string (what vLLM reports); EOS ends a row with finish_reason "eos" (the EOS token counts as
  generated, as in vLLM); otherwise "length";
- cumulative_logprob (when asked) sums the log-probabilities of the chosen tokens under the model's raw
  distribution (before temperature and top_p), as vLLM's default `raw_logprobs` mode does.
"""
from __future__ import annotations

import os
import threading
from typing import Sequence

from actors.engines.base import count_parameters, encode_prompt, encode_prompts, load_tokenizer, torch_dtype
from app.contracts import Completion, GenerationRequest, apply_stop
from actors.engines.prefix_cache import PrefixKVCache, auto_cache_mb, batch_from_hits, row_kv

class HFEngine:
    """A transformers causal LM behind the `Engine` protocol.

    model: a Hub name, a local path or `toy:NAME` (resolved through `app.toy.resolve_model`).
    dtype: "float32" (default; what parity with vLLM is checked at), "bfloat16", "float16" or "auto".
    device: "auto" (CUDA when present, else CPU), "cpu", "cuda", "cuda:1", ...
    max_batch_rows: rows (requests x n) decoded at once; bigger calls are split into chunks of this size.
    prefix_cache_mb: memory for the KV of rows that stopped on a stop string (a step), so the next call that
        continues them prefills only the new tokens (`prefix_cache.py`); 0 turns it off; default: sized by
        the model (`prefix_cache.auto_cache_mb`: 16 rows of 2k tokens, 512 MiB at least, 2 GiB at most on CPU and
        8 GiB on GPU, off for a model whose rows would churn it). The n rows of one request always share one
        prefill. Each completion reports the prompt tokens its request did not run (`Completion.cached_tokens`).
    quirk_double_bos: reference quirk (search-and-learn): a text prompt that already starts with the tokenizer's
        BOS token (rendered by a chat template) gets the tokenizer's BOS added again, two BOS tokens; off by
        default, one BOS (`base.encode_prompt`).
    num_parameters: every parameter; flop_parameters: the matmul parameters per token (`base.count_parameters`).
    """

    engine_name = "hf"

    def __init__(self, model: str, dtype: str = "float32", device: str = "auto", max_batch_rows: int = 256,
                 num_threads: int | None = None, trust_remote_code: bool = False, prefix_cache_mb: float | None = None,
                 quirk_double_bos: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from app.toy import resolve_model

        self.model_name = model
        self.path = resolve_model(model)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if num_threads:
            torch.set_num_threads(num_threads)
        self.tokenizer = load_tokenizer(self.path, trust_remote_code)
        self.quirk_double_bos = bool(quirk_double_bos)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        counts = count_parameters(self.model)
        self.num_parameters = counts.total  # every parameter
        self.flop_parameters = counts.per_token  # what FLOPs are counted with (no untied input embeddings)
        self.max_batch_rows = max(1, int(max_batch_rows))
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.eos_token_ids = self._eos_ids()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else next(iter(self.eos_token_ids), 0))
        self._lock = threading.Lock()  # one batch at a time on the model
        self._pieces: dict[int, str] = {}
        self.prefix_cache = PrefixKVCache(int(auto_cache_mb(self.model, str(self.device), prefix_cache_mb) * 2**20))

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.model.config):
            e = getattr(src, "eos_token_id", None) if src is not None else None
            if e is None:
                continue
            ids.update([e] if isinstance(e, int) else list(e))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    def _piece(self, token: int) -> str:
        """A token's text (SentencePiece drops the leading space of a lone "▁word" when decoding: put it back)."""
        p = self._pieces.get(token)
        if p is None:
            p = self.tokenizer.decode([token], skip_special_tokens=True)
            raw = self.tokenizer.convert_ids_to_tokens(token)
            if isinstance(raw, str) and raw.startswith("\u2581") and not p.startswith(" "):
                p = " " + p
            self._pieces[token] = p
        return p

    def _tail_has_stop(self, generated: list[int], stop: Sequence[str]) -> bool:
        """Whether a stop string may have just completed. A stop string completes only with a token whose text holds
        its last character (a token that decodes to nothing or to part of a character is always checked); then
        only the last tokens are decoded (a stop string of c characters spans at most c tokens, plus a margin for
        tokens that decode to nothing), never the whole text at every token."""
        piece = self._piece(generated[-1])
        if piece and "\ufffd" not in piece and not any(s[-1] in piece for s in stop):
            return False
        window = max(len(s) for s in stop) + 8
        tail = self.tokenizer.decode(generated[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    # ----------------------------------------------------------------------------------------------------------

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.quirk_double_bos)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        """One list of `n` completions per request, in order; all rows decode in left-padded batches."""
        rows: list[tuple[int, int]] = [(i, k) for i, r in enumerate(requests) for k in range(r.n)]
        prompts = encode_prompts(self.encode, [r.prompt for r in requests], self.max_model_len)
        out: list[list[Completion | None]] = [[None] * r.n for r in requests]
        ran = [0] * len(requests)  # prompt tokens each request's prefill really ran
        with self._lock:
            for lo in range(0, len(rows), self.max_batch_rows):
                chunk = rows[lo: lo + self.max_batch_rows]
                done, prefilled = self._decode([(requests[i], prompts[i], k) for i, k in chunk])
                for (i, k), c, t in zip(chunk, done, prefilled):
                    out[i][k] = c
                    ran[i] += t
        for i, group in enumerate(out):
            # the rest of the prompt came from the prefix cache, or from an equal prompt earlier in the batch (a
            # request split over two chunks prefills twice: counted once, as the n rows of one request are)
            cached = max(0, len(prompts[i]) - ran[i])
            for c in group:
                c.cached_tokens = cached  # type: ignore[union-attr]
        return out  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------------------------------

    def _prefill(self, prompts: list[list[int]]):
        """Run the unique prompts once, each from its longest cached prefix: (last-token logits [U, V], the KV
        cache, the attention mask [U, columns], the cached prefix length of each prompt)."""
        hits = [self.prefix_cache.lookup(p)[:2] if self.prefix_cache.enabled else (0, None) for p in prompts]
        ids, mask, pos, cache, _ = batch_from_hits(prompts, hits, self.pad_token_id)
        dev = self.device
        ids, mask, pos = ids.to(dev), mask.to(dev), pos.to(dev)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
        return out.logits[:, -1, :].float(), out.past_key_values, mask, [c for c, _ in hits]

    def _remember(self, cache, j: int, cols, tokens: list[int]) -> None:
        """Store row j's keys and values (its unmasked columns) under its tokens, for the next step's call."""
        kv = row_kv(cache, j, cols)
        if kv and kv[0][0].shape[1] == len(tokens):
            self.prefix_cache.put(tokens, kv)

    def _decode(self, rows: list[tuple[GenerationRequest, list[int], int]]) -> tuple[list[Completion], list[int]]:
        """The rows' completions, and the prompt tokens each row's prefill ran (the first row of a unique prompt
        carries its prefill; the others 0)."""
        import torch

        dev = self.device
        B = len(rows)
        lens = [len(p) for _, p, _ in rows]
        # the n rows of a request (and equal prompts of different requests) share one prefill
        unique: dict[tuple[int, ...], int] = {}
        row_u = [unique.setdefault(tuple(p), len(unique)) for _, p, _ in rows]
        with torch.inference_mode():
            logits, cache, step_mask, hit_lens = self._prefill([list(p) for p in unique])
            if len(unique) < B:
                ru = torch.tensor(row_u, device=dev)
                cache.batch_select_indices(ru)
                logits, step_mask = logits[ru], step_mask[ru]
        prefilled, seen = [0] * B, set()
        for b, u in enumerate(row_u):
            if u not in seen:
                seen.add(u)
                prefilled[b] = lens[b] - hit_lens[u]

        reqs = [r for r, _, _ in rows]
        temps = torch.tensor([r.temperature for r in reqs], dtype=torch.float32, device=dev)
        top_ps = torch.tensor([r.top_p for r in reqs], dtype=torch.float32, device=dev)
        greedy = temps == 0
        any_top_p = bool((top_ps < 1).any())
        gens: list[torch.Generator | None] = []
        for r, _, k in rows:
            if r.temperature == 0:
                gens.append(None)
                continue
            g = torch.Generator(device="cpu")
            g.manual_seed((r.seed + k) & 0xFFFF_FFFF_FFFF_FFFF if r.seed is not None
                          else int.from_bytes(os.urandom(8), "little") >> 1)
            gens.append(g)
        budget = [min(r.max_tokens, self.max_model_len - n) for r, n in zip(reqs, lens)]
        want_lp = any(r.logprobs for r in reqs)

        generated: list[list[int]] = [[] for _ in range(B)]
        cum_lp = [0.0] * B
        result: list[Completion | None] = [None] * B
        texts = [""] * B
        alive = list(range(B))  # original row index of each row still in the batch
        eos = torch.tensor(sorted(self.eos_token_ids) or [-1], device=dev)

        with torch.inference_mode():
            while alive:
                sel = torch.tensor(alive, device=dev)
                tok = self._sample(logits, temps[sel], top_ps[sel], greedy[sel], any_top_p, [gens[b] for b in alive])
                lp = None
                if want_lp:
                    lp = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0].tolist()
                is_eos = torch.isin(tok, eos).tolist()
                toks = tok.tolist()

                keep: list[int] = []
                for j, b in enumerate(alive):
                    t = toks[j]
                    generated[b].append(t)
                    if lp is not None:
                        cum_lp[b] += lp[j]
                    r = reqs[b]
                    finish, stop_reason = None, None
                    if is_eos[j]:
                        finish = "eos"
                    elif r.stop and self._tail_has_stop(generated[b], r.stop):
                        text = self.tokenizer.decode(generated[b], skip_special_tokens=True)
                        cut, which = apply_stop(text, r.stop)
                        if which is not None:
                            finish, stop_reason, texts[b] = "stop", which, cut
                    if finish is None and len(generated[b]) >= budget[b]:
                        finish = "length"
                    if finish is None:
                        keep.append(j)
                        continue
                    if finish == "stop" and self.prefix_cache.enabled:
                        # a step-wise search continues this text next: keep its KV (all but the token just drawn)
                        self._remember(cache, j, step_mask[j].bool(), rows[b][1] + generated[b][:-1])
                    if finish != "stop":
                        texts[b] = self.tokenizer.decode(generated[b], skip_special_tokens=True)
                    result[b] = Completion(
                        text=texts[b],
                        prompt_tokens=lens[b],
                        generated_tokens=len(generated[b]),
                        finish_reason=finish,  # type: ignore[arg-type]
                        stop_reason=stop_reason,
                        cumulative_logprob=cum_lp[b] if r.logprobs else None,
                        token_ids=tuple(generated[b]),
                    )
                if not keep:
                    break
                if len(keep) < len(alive):  # drop finished rows from the batch and the KV cache
                    kt = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(kt)
                    step_mask = step_mask[kt]
                    tok = tok[kt]
                    alive = [alive[j] for j in keep]
                step_mask = torch.cat([step_mask, torch.ones((len(alive), 1), dtype=step_mask.dtype, device=dev)], 1)
                step_pos = torch.tensor([[lens[b] + len(generated[b]) - 1] for b in alive], device=dev)
                out = self.model(input_ids=tok[:, None], attention_mask=step_mask, position_ids=step_pos,
                                 past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[:, -1, :].float()
                del out
        return result, prefilled  # type: ignore[return-value]

    def update_weights(self, state, version: int | None = None) -> int | None:
        """Load new weights into the live model (RL weight sync: the trainer pushes them after each optimizer step).

        state: {parameter name: tensor} (the model's `state_dict` names; a subset is fine, e.g. one bucket of a
        big model), or a folder / .safetensors file to read them from. Each tensor is copied in place (cast to the
        engine's dtype and device), under the generation lock, so no batch ever decodes with half-updated weights;
        the prefix cache is cleared (its keys and values came from the old weights). Unknown names or shapes raise
        and change nothing. Returns `version`, kept as `self.weights_version`."""
        import torch

        state = read_weights(state)
        own = self.model.state_dict()
        bad = [k for k, v in state.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
        if bad:
            raise KeyError(f"update_weights: {len(bad)} tensors do not match the model, e.g. {bad[:3]}")
        with self._lock, torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v.to(device=own[k].device, dtype=own[k].dtype))
            self.prefix_cache.clear()
            self.weights_version = version
        return version

    @staticmethod
    def _sample(logits, temps, top_ps, greedy, any_top_p: bool, gens):
        """Per-row sampling: greedy rows take the argmax; the others draw one uniform from their own generator
        and invert the CDF of their (temperature-scaled, top_p-filtered) distribution."""
        import torch

        tok = logits.argmax(-1)
        if bool(greedy.all()):
            return tok
        t = torch.where(greedy, torch.ones_like(temps), temps)
        probs = torch.softmax(logits / t[:, None], dim=-1)
        sp, order = probs.sort(dim=-1, descending=True)
        if any_top_p:
            cum = sp.cumsum(-1)
            drop = (cum - sp) >= top_ps[:, None]  # tokens whose preceding mass already reaches top_p
            drop[:, 0] = False
            sp = sp.masked_fill(drop, 0.0)
        cdf = sp.cumsum(-1)
        u = torch.tensor([float(torch.rand((), generator=g)) if g is not None else 0.0 for g in gens],
                         dtype=cdf.dtype, device=cdf.device)
        u = u * cdf[:, -1]
        idx = torch.searchsorted(cdf, u[:, None], right=True).clamp(max=cdf.shape[-1] - 1)
        sampled = order.gather(1, idx)[:, 0]
        return torch.where(greedy, tok, sampled)


def read_weights(state) -> dict:
    """A state dict as given, or read from a .safetensors file or a folder of them (a `save_pretrained` export)."""
    if isinstance(state, dict):
        return state
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(state)
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"update_weights: no .safetensors weights at {path}")
    out: dict = {}
    for f in files:
        out.update(load_file(str(f)))
    return out
