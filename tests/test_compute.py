"""Compute, two ways, on real (tiny or toy) models: nominal (what the papers count) and computed (what the engines
ran after their prefix caches).

- the parameters FLOPs are counted with leave out untied input embeddings (a lookup is no matmul), and a PRM is
  charged for the head it applies at its score positions, not an LM head at every token;
- the HF policy and PRM engines report the prompt / path tokens their prefix caches served;
- a toy beam search through `solve_problem`, on the toy checkpoints behind in-process actors with the pool
  clients' accounting, computes strictly less than it nominally costs with the caches on, exactly as much with
  them off.
"""
from __future__ import annotations

import asyncio

import pytest

from app.contracts import GenerationRequest as R, Usage


def _numel(*modules) -> int:
    seen, n = set(), 0
    for m in modules:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory):
    from tests.tiny_models import make_tiny_policy

    return str(make_tiny_policy(tmp_path_factory.mktemp("compute") / "tiny"))


@pytest.fixture(scope="module")
def untied_policy(tmp_path_factory):
    """The tiny policy's shape with its own output head (as Llama-3-8B, Qwen2.5-7B ... ship)."""
    import torch
    from transformers import AutoModelForCausalLM

    from app.toy.models import policy_config
    from app.toy.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("compute") / "untied"
    torch.manual_seed(0)
    tok = build_tokenizer()
    cfg = policy_config(tok, "tiny")
    cfg.tie_word_embeddings = False
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_prm(tmp_path_factory):
    from tests.tiny_models import make_tiny_prm

    return str(make_tiny_prm(tmp_path_factory.mktemp("compute") / "prm", seed=1))


# ------------------------------------------------------------------------------------------------ parameters


def test_flop_parameters_leave_out_untied_input_embeddings(tiny_policy, untied_policy):
    from actors.engines.base import checkpoint_parameters
    from actors.engines.hf import HFEngine

    tied = HFEngine(tiny_policy, prefix_cache_mb=0)
    m = tied.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    # tied: the head's matmul is real, and the one matrix is counted once
    assert tied.flop_parameters == _numel(m.model.layers, m.model.norm, m.lm_head) == tied.num_parameters

    untied = HFEngine(untied_policy, prefix_cache_mb=0)
    m = untied.model
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    hand = _numel(m.model.layers, m.model.norm, m.lm_head)
    assert untied.flop_parameters == hand == untied.num_parameters - m.model.embed_tokens.weight.numel()
    assert untied.flop_parameters < untied.num_parameters

    # the same counts from the checkpoint alone (vLLM's model lives in another process)
    for eng, path in ((tied, tiny_policy), (untied, untied_policy)):
        c = checkpoint_parameters(path)
        assert (c.total, c.per_token, c.per_score) == (eng.num_parameters, eng.flop_parameters, 0)


def test_prm_is_charged_for_its_body_and_the_head_it_applies(tiny_prm, tmp_path):
    from actors.engines.base import checkpoint_parameters, load_tokenizer
    from actors.engines.hf_prm import HFPRMEngine
    from actors.prm_formats import QwenPRMFormat, make_format
    from tests.test_prm import _char_tokenizer, _tiny_causal_lm

    # the Qwen layout: a body and a classifier (Linear-ReLU-Linear) read at the step tags
    eng = HFPRMEngine(tiny_prm, QwenPRMFormat(load_tokenizer(tiny_prm)), prefix_cache_mb=0)
    m = eng.model
    assert eng.flop_parameters == _numel(m.model.layers, m.model.norm)
    assert eng.score_head_parameters == _numel(m.score)
    assert eng.num_parameters == _numel(m)
    c = checkpoint_parameters(tiny_prm, "classifier")
    assert (c.total, c.per_token, c.per_score) == (eng.num_parameters, eng.flop_parameters, eng.score_head_parameters)

    # a causal-LM PRM (Math-Shepherd): the body, and 2 rows of its LM head at the score positions
    tok = _char_tokenizer([], ["ки"], "<s>", None)
    path = str(_tiny_causal_lm(tmp_path / "shepherd", tok, seed=2))
    eng = HFPRMEngine(path, make_format("math-shepherd", load_tokenizer(path)), prefix_cache_mb=0)
    m = eng.model
    assert eng.flop_parameters == _numel(m.model.layers, m.model.norm)
    assert eng.score_head_parameters == 2 * m.config.hidden_size
    assert eng.num_parameters == _numel(m) > eng.flop_parameters + m.lm_head.weight.numel()


# ------------------------------------------------------------------------------------------------ cache hits


def test_hf_policy_reports_the_prompt_tokens_its_prefix_cache_served(tiny_policy):
    from actors.engines.hf import HFEngine
    from actors.policy import PolicyClient
    from tests.test_engines import stop_for

    prompt = "Q: 7*8?\nA:"
    for mb in (64, 0):
        eng = HFEngine(tiny_policy, prefix_cache_mb=mb)
        full = eng.generate([R(prompt, max_tokens=48, temperature=1.0, seed=5)])[0][0].text
        stop = stop_for(full)[1]
        usage = Usage()
        first = eng.generate([R(prompt, max_tokens=48, temperature=1.0, seed=5, stop=(stop,))])
        PolicyClient.account(usage, first, eng.flop_parameters)
        step = first[0][0]
        assert step.finish_reason == "stop" and step.cached_tokens == 0
        # the next step continues it: its prompt is the parent's prompt and step (as token ids: the random model
        # samples special tokens, which the text leaves out)
        ids = tuple(eng.encode(prompt)) + step.token_ids
        nxt = eng.generate([R(ids, n=3, max_tokens=8, temperature=1.0, seed=2)])
        PolicyClient.account(usage, nxt, eng.flop_parameters)
        assert usage.prompt_tokens == len(prompt) + len(ids)  # once per request, not per sample
        if mb:
            # resumed from the parent's stored KV: all but the last token of the parent's step
            assert [c.cached_tokens for c in nxt[0]] == [len(ids) - 1] * 3
            assert usage.computed_prompt_tokens == len(prompt) + 1 < usage.prompt_tokens
            assert usage.computed_policy_flops < usage.policy_flops
        else:
            assert [c.cached_tokens for c in nxt[0]] == [0] * 3
            assert usage.computed_prompt_tokens == usage.prompt_tokens
            assert usage.computed_policy_flops == usage.policy_flops > 0
        assert usage.computed_generated_tokens == usage.generated_tokens


def test_hf_prm_reports_the_path_tokens_its_prefix_cache_served(tiny_prm):
    from actors.prm import PRMActor, PRMClient

    q, steps = "What is 12 + 30?", ["12 + 30 = 42.\n\n", "So the answer is 42.\n\n", "The answer is \\boxed{42}"]
    for mb in (64, 0):
        actor = PRMActor(tiny_prm, format="qwen", engine="hf", gather_ms=1, engine_kwargs={"prefix_cache_mb": mb})
        loop = asyncio.new_event_loop()
        try:
            usage = Usage()
            a = loop.run_until_complete(actor.score(q, [steps[:1]]))
            b = loop.run_until_complete(actor.score(q, [steps[:2]]))
        finally:
            loop.close()
        for r in (a, b):
            PRMClient.account(usage, r, actor.info()["flop_parameters"])
        assert a.cached_tokens == 0
        if mb:
            assert 0 < b.cached_tokens < b.tokens
            assert usage.computed_prm_tokens == a.tokens + b.tokens - b.cached_tokens < usage.prm_tokens
            assert usage.computed_prm_flops < usage.prm_flops
        else:
            assert b.cached_tokens == 0
            assert usage.computed_prm_tokens == usage.prm_tokens
            assert usage.computed_prm_flops == usage.prm_flops > 0


# ------------------------------------------------------------------------------------------------ a search


class _InProcess:
    """A pool client over an in-process actor: the actor's call, then the client's own accounting with the
    parameters the actor's `info()` gives the pool."""

    def __init__(self, actor, client_class, loop):
        self.actor, self.account, self.loop = actor, client_class.account, loop
        self.params = actor.info()["flop_parameters"]
        self.usage = Usage()

    def _call(self, coro):
        out = self.loop.run_until_complete(coro)
        self.account(self.usage, out, self.params)
        return out

    def generate(self, requests):
        return self._call(self.actor.generate(list(requests)))

    def score(self, question, trajectories):
        return self._call(self.actor.score(question, [list(t) for t in trajectories])).scores


def _toy_beam_search(cache_mb: float) -> list[dict]:
    from actors.policy import PolicyActor, PolicyClient
    from actors.prm import PRMActor, PRMClient
    from app.datasets import load_problems
    from app.search.record import solve_problem

    kw = {"prefix_cache_mb": cache_mb}
    loop = asyncio.new_event_loop()
    try:
        policy = _InProcess(PolicyActor("hf", "toy:policy", gather_ms=1, engine_kwargs=kw), PolicyClient, loop)
        prm = _InProcess(PRMActor("toy:prm", format="qwen", engine="hf", gather_ms=1, engine_kwargs=kw), PRMClient,
                         loop)
        cfg = {"n": 4, "beam_width": 2, "num_iterations": 6, "temperature": 0.8, "max_tokens": 64,
               "filter_duplicates": True}  # no two identical prompts in one call: those share one prefill
        return [solve_problem(p, "beam_search", cfg, policy, prm, template="toy")
                for p in load_problems("toy:test", limit=2)]
    finally:
        loop.close()


def test_toy_beam_search_computes_less_than_nominal_with_caches_and_as_much_without():
    on, off = _toy_beam_search(64), _toy_beam_search(0)
    for a, b in zip(on, off):
        assert [t["steps"] for t in a["trajectories"]] == [t["steps"] for t in b["trajectories"]]  # the same search
        ca, cb = a["compute"], b["compute"]
        for k in ("prompt_tokens", "generated_tokens", "prm_tokens", "flops"):  # the same nominal cost
            assert ca[k] == cb[k] > 0, k
        assert cb["computed_flops"] == cb["flops"]
        assert cb["computed_prompt_tokens"] == cb["prompt_tokens"] and cb["computed_prm_tokens"] == cb["prm_tokens"]
        assert ca["computed_flops"] < ca["flops"]
        assert ca["computed_prompt_tokens"] < ca["prompt_tokens"] and ca["computed_prm_tokens"] < ca["prm_tokens"]
        assert ca["computed_generated_tokens"] == ca["generated_tokens"]
        assert ca["computed_flops"] == pytest.approx(ca["computed_policy_flops"] + ca["computed_prm_flops"])


# ------------------------------------------------------------------------------------------------ the report


def test_report_prints_nominal_and_computed():
    from app.search.results import format_summary, summarize

    recs = [{"id": f"p{i}", "method": "beam_search", "N": 1, "selection": {"naive": {"1": {"correct": True}}},
             "compute": {"prompt_tokens": 100, "generated_tokens": 10, "prm_tokens": 50, "flops": 20e9,
                         "computed_prompt_tokens": 20, "computed_generated_tokens": 10, "computed_prm_tokens": 30,
                         "computed_flops": 6e9, "seconds": 1.0}} for i in range(2)]
    s = summarize(recs)
    assert s["compute"]["flops"] == 20e9 and s["compute"]["computed_flops"] == 6e9
    text = format_summary(recs)
    assert "nominal 20 GFLOPs" in text and "computed 6 GFLOPs" in text
    # records written before compute was counted both ways report the nominal figures only
    old = [{**r, "compute": {k: v for k, v in r["compute"].items() if not k.startswith("computed")}} for r in recs]
    assert "computed" not in format_summary(old) and "nominal 20 GFLOPs" in format_summary(old)
