"""The `policy:` and `prm:` sections of a recipe: what a pool of model replicas is, as validated data.

They live in the domain (not beside the actors that read them) so that a recipe is typed whole, and a typo under
`policy:` or `prm:` is one line naming the file and key before Ray starts. `actors.pools` starts pools from them.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator

from app.config import IN_RECIPE, Config, ConfigError, format_error

# One dtype vocabulary: every spelling a recipe may use, mapped to the one name torch and vLLM both take.
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}

def config_dtype(conf) -> str | None:
    """The dtype a model config (transformers' PretrainedConfig) says its weights are in, as a torch name
    ("bfloat16"), or None when it says none: what "auto" means for every engine and for the memory estimate."""
    own = getattr(conf, "dtype", None) or getattr(conf, "torch_dtype", None)
    return str(own).removeprefix("torch.") if own is not None else None


PRMFormatName = Literal["qwen", "math-shepherd", "rlhflow", "toy-checker", "lpr"]


def canonical_dtype(dtype: str) -> str:
    """`bf16` -> `bfloat16` and so on; a ValueError names the choices."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


class PoolConfig(Config):
    """A pool of model replicas (the `policy:` section of a recipe).

    engine: "hf" (transformers; CPU or one GPU per replica) or "vllm" (the async vLLM engine).
    model: Hub name, local path, or `toy:NAME` (a shipped toy checkpoint).
    replicas: actor replicas; calls go to the least-loaded one.
    tp: GPUs per replica (vLLM tensor parallelism); one placement-group bundle per rank. 1 for the HF engine.
    num_gpus: the GPU share of a tp-1 replica on a GPU cluster (default 1, or 0.5 when a PRM is co-located with
        it): a fraction lets replicas share a GPU, as search-and-learn runs vLLM at gpu_memory_utilization 0.5
        beside its PRM. Ranks of a tp > 1 replica each take a whole GPU. Ignored on a cluster without GPUs.
    num_cpus: CPUs reserved per replica (per bundle).
    max_batch / gather_ms: the HF engine's micro-batching (most requests per batch; how long the first call of a
        batch waits for others). vLLM batches continuously by itself and ignores them.
    dtype: model dtype: "auto" (default: the checkpoint's own, bf16 for today's published models), "bfloat16",
        "float16", "float32"; bf16/fp16/fp32/half are read as those, in this one place, for both engines.
    engine_kwargs: passed to the engine's constructor as is, e.g. for vLLM `gpu_memory_utilization`,
        `enable_prefix_caching`, `max_model_len`, `seed`; for HF `max_batch_rows`, `prefix_cache_mb`; for either
        policy engine `quirk_double_bos` (default false: a prompt whose chat template renders BOS gets no second
        one; true keeps the reference's double BOS).
    max_concurrency: concurrent calls one replica accepts (async actor).
    max_retries: how many times a call is retried when its replica dies or times out (Ray restarts it meanwhile).
    call_timeout_s: a call that has not answered after this many seconds is cancelled and retried on another
        replica, and the replica it hung on is restarted (a hung NCCL or engine step never recovers by itself).
        Size it well above the slowest honest call (a whole best-of-256 batch); None waits forever.
    """

    engine: Literal["hf", "vllm"] = "hf"
    model: str = "toy:policy"
    replicas: int = Field(1, ge=1)
    tp: int = Field(1, ge=1)
    num_gpus: float | None = Field(None, gt=0, le=1)
    num_cpus: float = Field(1.0, ge=0)
    max_batch: int = Field(64, ge=1)
    gather_ms: float = Field(5.0, ge=0)
    dtype: str = "auto"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_concurrency: int = Field(1000, ge=1)
    max_retries: int = Field(8, ge=0)
    call_timeout_s: float | None = Field(1800.0, gt=0)

    def __init__(self, **data: Any):
        # Direct construction (`PoolConfig(replicas=0)`) fails with the same one-line ConfigError as a recipe.
        if IN_RECIPE.get():
            super().__init__(**data)
            return
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(format_error(e, type(self).__name__)) from None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        return canonical_dtype(v)


class PRMPoolConfig(PoolConfig):
    """A pool of PRM replicas (the `prm:` section of a recipe): PoolConfig plus the PRM's input format.

    format: "qwen" (Qwen2.5-Math-PRM layout, ponder's own PRM; engines hf and vllm), "math-shepherd" or "rlhflow"
        (causal LMs; engine hf), or "toy-checker" (the toy world's checker, no model: `model` is ignored).
    step_delimiter: the string each step ends with, stripped before the format lays the steps out.
    colocate: place PRM replica i on the GPU of policy replica i (OpenRLHF's hybrid placement: one placement-group
        bundle holds both actors; num_gpus defaults to 0.5 each and must sum to at most 1). Needs tp 1 for both and
        no more PRM replicas than policy replicas.
    """

    model: str = "toy:prm"
    colocate: bool = False
    format: PRMFormatName = "qwen"
    step_delimiter: str = "\n\n"
