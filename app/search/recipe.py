"""The search recipe, typed whole: data, prompt, method and its section, pools, output.

    job: search
    data: {source: toy:test, limit: 200}
    prompt: {template: toy}
    method: beam_search
    search: {n: 16, beam_width: 4}          # the method's config (app.search.<method>)
    policy: {engine: hf, model: toy:policy} # app.pool_config.PoolConfig
    prm: {engine: hf, model: toy:prm, format: qwen}
    output_dir: results/toy/beam_search

Every section is validated when the recipe is loaded, so a typo anywhere (`search.beamwidth`, `policy.modle`) is
one line naming the file and the key, before Ray starts; the validated object is what reaches the Ray tasks.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.config import Config, ConfigError
from app.pool_config import PoolConfig, PRMPoolConfig
from app.problems import CHAT_TEMPLATES, Template
from app.search.registry import METHODS
from app.search.sampling import SearchConfig


def prm_pairing_error(search: Any, prm: PRMPoolConfig | None) -> str | None:
    """Why a method's section cannot run against this PRM, in one line (None when it can).

    `agg_strategy: model` hands the PRM the whole prefix as ONE step, and the Math-Shepherd format puts its step tag
    after every blank line of what it is given: a prefix of k steps becomes k tags for one score, and every problem
    fails (docs/algorithms.md, "PRM input formats"). Refused here, before any pool starts."""
    if prm is not None and prm.format == "math-shepherd" and getattr(search, "agg_strategy", None) == "model":
        return ("search.agg_strategy: model scores the whole prefix as one step, and prm.format: math-shepherd tags "
                "every blank line in it as a step, so every problem would fail; with this PRM use agg_strategy "
                "last, min, prod or mean")
    return None


class DataConfig(Config):
    source: str = Field("toy:test", description="a .jsonl/.json/.parquet file, a folder of Parquet shards, a URI of "
                        "either (file://, s3://, gs://), a data set folder, a Hub name (NAME[:SUBSET]:SPLIT) or toy:test")
    split: str | None = None
    subset: str | None = None
    limit: int | None = Field(None, ge=0, description="the first `limit` problems (after shuffling)")
    shuffle_seed: int | None = None
    shard: str | None = Field(None, description="INDEX/COUNT: this job solves every COUNT-th problem from INDEX")


class PromptConfig(Config):
    template: Template = Field("plain", description="plain, toy, qwen-math or llama-cot (the last two "
                                                               "use the tokenizer's chat template)")
    tokenizer: str | None = Field(None, description="tokenizer for chat templates (default: the policy model)")
    system_prompt: str | None = None


class SelectionConfig(Config):
    exact_grouping: bool = Field(False, description="group answers by exact string (OpenR) instead of equivalence")


class SearchRecipe(Config):
    job: Literal["search"] = "search"
    data: DataConfig = Field(default_factory=DataConfig)
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    method: str = Field("best_of_n", description=f"one of: {', '.join(METHODS)}")
    search: SerializeAsAny[SearchConfig] = Field(default_factory=dict, validate_default=True, description="the method's section")
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    policy: PoolConfig = Field(default_factory=PoolConfig)
    prm: PRMPoolConfig | None = None
    output_dir: str = "results/search"
    max_in_flight: int = Field(16, ge=1, description="Ray tasks in flight at once: one per problem, or (DVTS) one per "
                                                      "subtree and a join; a DVTS problem takes up to n / beam_width")
    task_cpus: float = Field(0.0, ge=0.0, description="CPUs reserved per task (they mostly wait on actors)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray cluster (default: this machine's)")
    progress: bool = True

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        if v not in METHODS:
            raise ValueError(f"unknown search method {v!r} (one of: {', '.join(METHODS)})")
        return v

    @field_validator("search", mode="before")
    @classmethod
    def _search(cls, v: Any, info) -> Any:
        """The section is validated by the method's own config class, and the error names `search.KEY`."""
        method = info.data.get("method")
        if method is None:
            return v  # the method's own error is reported
        mcls = METHODS[method].config
        if isinstance(v, mcls):
            return v
        if isinstance(v, Config):
            v = v.model_dump()
        try:
            return mcls.model_validate(v or {})
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(x) for x in err["loc"])
            if err["type"] == "extra_forbidden":
                msg = f"unknown key 'search.{loc}' for method {method} (valid: {', '.join(mcls.model_fields)})"
            else:
                msg = f"search{'.' + loc if loc else ''}: {err['msg'].removeprefix('Value error, ')}"
            raise PydanticCustomError("search_config", "{msg}", {"msg": msg}) from None

    @model_validator(mode="after")
    def _prm_pairing(self) -> "SearchRecipe":
        msg = prm_pairing_error(self.search, self.prm)
        if msg:
            raise PydanticCustomError("prm_pairing", "{msg}", {"msg": msg})
        return self

    def pool_configs(self) -> tuple[PoolConfig, PRMPoolConfig | None]:
        """The pools this run needs (no PRM pool for a method that needs none); a missing one is a ConfigError."""
        if not self.search.needs_prm:
            return self.policy, None
        if self.prm is None:
            raise ConfigError(f"method {self.method} needs a PRM: give the recipe a `prm:` section (engine, model, format)")
        if self.prm.format == "toy-checker" and not self.data.source.startswith("toy:"):
            raise ConfigError(f"prm.format: toy-checker judges toy questions only, and data.source is "
                              f"{self.data.source!r}; give the prm a model and its format (qwen, math-shepherd, rlhflow)")
        return self.policy, self.prm

    @property
    def tokenizer_name(self) -> str | None:
        """The model whose tokenizer renders chat-template prompts; None when the template needs none."""
        if self.prompt.template not in CHAT_TEMPLATES:
            return None
        return self.prompt.tokenizer or self.policy.model

    def identity(self) -> dict:
        """What must match for a run to resume into an output directory (it changes the results)."""
        d = self.model_dump(mode="json")
        data = {k: v for k, v in d["data"].items() if k not in ("limit", "shard")}  # a run may grow, or run in shards
        prm = d["prm"] or {}
        return {
            "data": data, "prompt": d["prompt"], "method": d["method"], "search": d["search"],
            "selection": d["selection"], "policy_model": d["policy"]["model"],
            # the checker stands in for a model: the two never share an output directory
            "prm_model": ("toy-checker" if prm.get("format") == "toy-checker" else prm.get("model"))
            if self.search.needs_prm else None,
        }
