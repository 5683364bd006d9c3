"""A `job: toy` recipe as validated data (configs/toy/world.yaml), so a typo fails in one line before Ray starts."""
from __future__ import annotations

import json
from typing import Sequence

from pydantic import Field, field_validator, model_validator

from app.config import Config as BaseConfig
from app.config import apply_overrides, build_config, read_recipe
from app.pool_config import PoolConfig
from train.loop import TrainConfig

DEFAULT_RECIPE = "toy/world"


def _known_size(field: str, size: str) -> str:
    from app.toy.models import SIZES

    if size not in SIZES:
        shapes = ", ".join(f"{k} (hidden {h}, {n} layers)" for k, (h, n, _, _) in SIZES.items())
        raise ValueError(f"{field}: unknown toy model size {size!r}; one of {shapes} (app/toy/models.py)")
    return size


class ToySFT(BaseConfig):
    size: str = Field("tiny", description="app.toy.models size of the policy")

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        return _known_size("sft.size", v)
    n_per_level: int = 8000
    levels: list[int] = [1, 2, 3, 4, 5]
    orders_per_problem: int = 1
    level_weights: dict[int, float] = Field(default_factory=dict)
    max_length: int = 512
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="toy-sft", lr=3e-3, micro_batch_size=32))


class ToyMC(BaseConfig):
    n_per_level: int = 60
    heldout_per_level: int = 20
    samples: int = 4
    k: int = 8
    temperature: float = 0.7
    max_tokens: int = 320
    skip_after_zero: bool = False
    replicas: int = 2
    max_batch: int = 64
    max_in_flight: int = 8


class ToyExact(BaseConfig):
    """Trajectories labelled by the toy checker (mc_labels with k=0): the PRM's training data when prm.data=exact."""

    n_per_level: int = 200
    samples: int = 16
    temperature: float = 1.0
    max_tokens: int = 360


class ToyPRM(BaseConfig):
    data: str = Field("mc", pattern="^(mc|exact)$", description="mc: the MC-labelled trajectories; exact: the "
                      "exact-labelled samples of the `exact` section (hard labels)")
    labels: str = Field("soft", pattern="^(soft|hard)$", description="which MC labels (data=mc)")
    init_from_policy: bool = Field(True, description="start the PRM body from the policy's (its size, plus "
                                   "extra_layers); false: a new body of `size`, its own")
    extra_layers: int = Field(0, ge=0, description="with init_from_policy: identity-initialised layers on top")
    size: str = Field("tiny", description="app.toy.models size of the PRM's own body (init_from_policy: false)")
    token_labels: float = Field(0.0, ge=0, description="weight of train.prm's per-token loss (the toy checker "
                                "labels every token of a step); 0: step tags alone")
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="toy-prm", lr=1e-3, micro_batch_size=32))

    @field_validator("size")
    @classmethod
    def _size(cls, v: str) -> str:
        return _known_size("prm.size", v)

    @model_validator(mode="after")
    def _one_body(self):
        if not self.init_from_policy and self.extra_layers:
            raise ValueError("prm.extra_layers: layers on top of the policy's body need init_from_policy: true; "
                             "with a body of its own choose prm.size instead")
        return self


class ToyEval(BaseConfig):
    """What `ponder toy eval` judges on. `split: val` is for choosing hyperparameters: toy:train problems (seed 0)
    from `val_offset` on per level, past every offset the toy synthesis and RL recipes read, so neither the test
    split nor a recipe's training problems decide a choice."""

    split: str = Field("test", pattern="^(test|val)$", description="test: toy:test; val: held-out toy:train "
                       "problems from val_offset on (for choosing hyperparameters)")
    val_offset: int = Field(2000, ge=1000, description="split=val: problems skipped per level of toy:train "
                            "(the recipes read at most the first 1000)")
    n_per_level: int = 200
    n: int = Field(16, ge=0, description="samples per problem (0: greedy only, no PRM)")
    temperature: float = 0.7
    max_tokens: int = 320
    replicas: int = 2
    max_batch: int = 64
    max_in_flight: int = 8
    step_problems_per_level: int = Field(40, ge=0, description="problems per level for the step-choice check "
                                         "(0: skip it)")
    step_samples: int = Field(6, ge=2, description="sampled next steps per right prefix in the step-choice check")


class ToyConfig(BaseConfig):
    """A `job: toy` recipe (configs/toy/world.yaml)."""

    job: str = Field("toy", pattern="^toy$")
    seed: int = 0
    work_dir: str = "runs/toy"
    out: str | None = Field(None, description="output folder (default: the shipped app/toy/checkpoints)")
    levels: list[int] = [1, 2, 3, 4, 5]
    sft: ToySFT = Field(default_factory=ToySFT)
    mc: ToyMC = Field(default_factory=ToyMC)
    exact: ToyExact = Field(default_factory=ToyExact)
    prm: ToyPRM = Field(default_factory=ToyPRM)
    eval: ToyEval = Field(default_factory=ToyEval)
    quick: dict = Field(default_factory=dict, description="dotted overrides applied by --quick")

    @model_validator(mode="after")
    def _prm_body(self):
        if self.prm.init_from_policy and self.prm.size != self.sft.size:
            raise ValueError(f"prm.size: {self.prm.size} is a body of the PRM's own, but prm.init_from_policy: true "
                             f"starts it from the policy's ({self.sft.size}); set prm.init_from_policy: false")
        return self


def load(recipe: str | None, overrides: Sequence[str], quick: bool) -> ToyConfig:
    """The recipe (default toy/world), then its `quick:` overrides with --quick, then the command line's."""
    data, path = read_recipe(recipe or DEFAULT_RECIPE)
    source = str(path)
    if quick:
        q = data.get("quick") or {}
        data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in q.items()])
        source += " + quick"
    data = apply_overrides(data, overrides)
    if overrides:
        source += f" + overrides {' '.join(overrides)}"
    return build_config(ToyConfig, data, source)


def pool_config(cls: type[PoolConfig], model: str, replicas: int, max_batch: int, **kw) -> PoolConfig:
    """The HF pool (policy or PRM) the toy build and eval start: one CPU per replica."""
    return cls(engine="hf", model=model, replicas=replicas, num_cpus=1, max_batch=max_batch, gather_ms=20.0, **kw)
