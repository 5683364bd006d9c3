"""Where a job's pools go on the cluster, decided once for all of them before any model loads.

    plan = plan_pools({"policy": policy_cfg, "prm": prm_cfg}, gpus=cluster_has_gpus())
    print(plan.table())                 # the dry run shows this
    check_fit(plan)                     # ONE check of the combined demand against what the cluster has free
    groups = reserve(plan)              # the placement groups, ready; then each pool starts on its slots

A replica is a placement group: on a GPU cluster `tp` bundles `{"GPU": share, "CPU": num_cpus}`, the actor
on bundle 0 holding `num_gpus` of it for tp 1 (a fraction shares the GPU) and nothing for tp > 1 (vLLM's "ray"
executor starts one worker per bundle). A tp > 1 group is STRICT_PACK (all its ranks on one node: tensor
parallelism across nodes would run its all-reduces over the network), and the fit check refuses a group that fits
on no single node; a one-bundle group is PACK. A co-located PRM replica (`prm.colocate`) sits on bundle 0 of policy
replica i's group, which then holds both actors' shares and CPUs (OpenRLHF's hybrid placement); a policy replica
beyond `prm.replicas` has no PRM beside it and gets a GPU of its own (its engine is sized for a share of a GPU, and
two such engines on one GPU would fail vLLM's free-memory check at start). Without GPUs a replica is one CPU
bundle.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from app.config import ConfigError
from app.pool_config import PoolConfig, config_dtype

_EPS = 1e-9


@dataclass(frozen=True)
class Slot:
    """Where one replica's actor goes: its group and bundle, and the resources the actor itself takes there."""

    pool: str
    replica: int
    group: int
    bundle: int
    num_gpus: float
    num_cpus: float


@dataclass
class Plan:
    groups: list[list[dict[str, float]]] = field(default_factory=list)
    owners: list[str] = field(default_factory=list)  # the pool that removes each group at shutdown
    slots: list[Slot] = field(default_factory=list)
    gpus: bool = False

    def add_groups(self, owner: str, groups: list[list[dict[str, float]]]) -> "Plan":
        """Demand that is not a model pool (Ray Train workers, Tune trials, Serve replicas), so that the one fit
        check counts it with the pools."""
        for bundles in groups:
            self.groups.append([dict(b) for b in bundles])
            self.owners.append(owner)
        return self

    def pool_slots(self, pool: str) -> list[Slot]:
        return [s for s in self.slots if s.pool == pool]

    def demand(self) -> dict[str, float]:
        total: dict[str, float] = {}
        for bundles in self.groups:
            for b in bundles:
                for k, v in b.items():
                    total[k] = total.get(k, 0.0) + v
        return total

    def to_dict(self) -> dict[str, Any]:
        return dict(gpus=self.gpus, groups=self.groups, owners=self.owners, slots=[asdict(s) for s in self.slots],
                    demand=self.demand())

    def table(self) -> str:
        rows = [("pool", "replica", "group", "bundle", "actor GPUs", "actor CPUs", "group bundles")]
        for s in self.slots:
            rows.append((s.pool, str(s.replica), str(s.group), str(s.bundle), f"{s.num_gpus:g}", f"{s.num_cpus:g}",
                         " ".join(_fmt_bundle(b) for b in self.groups[s.group])))
        placed = {s.group for s in self.slots}
        for g, (owner, bundles) in enumerate(zip(self.owners, self.groups)):
            if g not in placed:
                gpu = sum(b.get("GPU", 0) for b in bundles)
                cpu = sum(b.get("CPU", 0) for b in bundles)
                rows.append((owner, "-", str(g), "-", f"{gpu:g}", f"{cpu:g}", " ".join(map(_fmt_bundle, bundles))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        d = self.demand()
        lines.append(f"total: {d.get('GPU', 0):g} GPUs, {d.get('CPU', 0):g} CPUs in {len(self.groups)} placement groups")
        return "\n".join(lines)


def _fmt_bundle(b: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in b.items()) + "}"


def share(cfg: PoolConfig, colocated: bool) -> float:
    """The GPU share a tp-1 replica's actor takes: `num_gpus`, else 1 alone and 0.5 co-located."""
    if cfg.num_gpus is not None:
        return float(cfg.num_gpus)
    return 0.5 if colocated else 1.0


def validate_colocation(policy: PoolConfig, prm: PoolConfig | None) -> None:
    """One-line ConfigErrors for a co-location that cannot work; none when the PRM is not co-located."""
    if prm is None or not getattr(prm, "colocate", False):
        return
    if policy.tp != 1 or prm.tp != 1:
        raise ConfigError(f"prm.colocate: co-location puts both actors on one GPU, so it needs policy.tp 1 and prm.tp 1 "
                          f"(got {policy.tp} and {prm.tp}); set prm.colocate=false for tensor-parallel pools")
    if prm.replicas > policy.replicas:
        raise ConfigError(f"prm.colocate: {prm.replicas} PRM replicas cannot sit on {policy.replicas} policy replicas; "
                          f"set prm.replicas <= policy.replicas")
    total = share(policy, True) + share(prm, True)
    if total > 1 + _EPS:
        raise ConfigError(f"prm.num_gpus: policy.num_gpus {share(policy, True):g} + prm.num_gpus {share(prm, True):g} = "
                          f"{total:g} of one GPU; co-located shares must sum to at most 1")
    for key, cfg in (("policy", policy), ("prm", prm)):
        util = cfg.engine_kwargs.get("gpu_memory_utilization")
        if cfg.engine == "vllm" and util is None:
            raise ConfigError(f"{key}.engine_kwargs.gpu_memory_utilization: a co-located vLLM engine must say its share "
                              f"of GPU memory (vLLM's default 0.9 leaves none for the other); e.g. "
                              f"{key}.engine_kwargs.gpu_memory_utilization={share(cfg, True) * 0.9:.2g}")
        if util is not None and float(util) > share(cfg, True) + _EPS:
            raise ConfigError(f"{key}.engine_kwargs.gpu_memory_utilization: {util} is more than {key}.num_gpus "
                              f"{share(cfg, True):g}, its share of the GPU it shares; lower it or raise the share")


def plan_pools(pools: dict[str, PoolConfig], gpus: bool) -> Plan:
    """The placement of every pool of a job (insertion order: the policy first). A PRM config with `colocate`
    goes onto the policy's groups; `gpus`: whether the cluster has GPUs (else one CPU bundle per replica)."""
    policy, prm = pools.get("policy"), pools.get("prm")
    if policy is not None:
        validate_colocation(policy, prm)
    plan = Plan(gpus=gpus)
    policy_groups: list[int] = []
    for name, cfg in pools.items():
        colocated = name == "prm" and getattr(cfg, "colocate", False) and policy is not None
        if gpus and cfg.tp > 1 and cfg.num_gpus is not None and cfg.num_gpus < 1:
            raise ConfigError(f"{name}.num_gpus: each rank of a tp={cfg.tp} replica takes a whole GPU; leave "
                              f"{name}.num_gpus unset (got {cfg.num_gpus:g})")
        for i in range(cfg.replicas):
            if colocated:
                g = policy_groups[i]
                bundle = plan.groups[g][0]
                gpu = share(cfg, True) if gpus else 0.0
                if gpus:
                    bundle["GPU"] = min(1.0, bundle.get("GPU", 0.0) + gpu)
                bundle["CPU"] = bundle.get("CPU", 0.0) + cfg.num_cpus
                plan.slots.append(Slot(name, i, g, 0, gpu, cfg.num_cpus))
                continue
            if gpus and cfg.tp > 1:
                bundles = [{"GPU": 1.0, "CPU": cfg.num_cpus} for _ in range(cfg.tp)]
                gpu = 0.0
            elif gpus:
                beside_prm = name == "policy" and prm is not None and getattr(prm, "colocate", False)
                gpu = share(cfg, colocated=beside_prm and i < prm.replicas)
                if beside_prm and i >= prm.replicas:
                    gpu = max(gpu, 1.0)  # no PRM beside this one: a GPU of its own, not half of one (docstring)
                bundles = [{"GPU": gpu, "CPU": cfg.num_cpus}]
            else:
                gpu = 0.0
                bundles = [{"CPU": cfg.num_cpus}]
            plan.groups.append(bundles)
            plan.owners.append(name)
            g = len(plan.groups) - 1
            if name == "policy":
                policy_groups.append(g)
            plan.slots.append(Slot(name, i, g, 0, gpu, cfg.num_cpus))
    return plan


# --- the cluster ------------------------------------------------------------------------------------------------

def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def _nodes_free() -> list[dict[str, float]]:
    """Free resources per alive node (Ray's per-node availability; the cluster total when it cannot be read)."""
    import ray

    try:
        from ray._private.state import available_resources_per_node

        per_node = available_resources_per_node()
        if per_node:
            return [dict(v) for v in per_node.values()]
    except Exception:  # pragma: no cover - private API moved: fall back to one pooled node
        pass
    return [dict(ray.available_resources())]


def strategy(bundles: list[dict[str, float]]) -> str:
    """A group's placement strategy: STRICT_PACK for several bundles (a tp > 1 replica: one node), else PACK."""
    return "STRICT_PACK" if len(bundles) > 1 else "PACK"


def _fits(groups: list[list[dict[str, float]]], nodes: list[dict[str, float]]) -> int | None:
    """First-fit-decreasing of the groups onto the nodes' free resources (`strategy`: a group of several bundles
    goes whole onto one node); the index of the first group that does not fit, or None."""
    free = [dict(n) for n in nodes]
    order = sorted(range(len(groups)), key=lambda g: -sum(b.get("GPU", 0) for b in groups[g]))
    for g in order:
        need: dict[str, float] = {}
        for b in groups[g]:
            for k, v in b.items():
                need[k] = need.get(k, 0.0) + v
        for n in free:
            if all(n.get(k, 0.0) + _EPS >= v for k, v in need.items()):
                for k, v in need.items():
                    n[k] = n.get(k, 0.0) - v
                break
        else:
            return g
    return None


def check_fit(plan: Plan, nodes: list[dict[str, float]] | None = None, settle_s: float = 15.0) -> None:
    """ONE check of every pool's combined demand against the cluster's free resources; a ConfigError (one line)
    says what does not fit and what to change. `nodes`: free resources per node (default: the cluster's, re-read
    for up to `settle_s` seconds while resources just released come back)."""
    if nodes is None:
        # Resources of pools just shut down (removed placement groups, killed actors) come back a moment later:
        # re-read for up to `settle_s` before calling the plan too big.
        import time

        deadline = time.monotonic() + settle_s
        while True:
            try:
                return check_fit(plan, _nodes_free())
            except ConfigError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)
    need = plan.demand()
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in ("GPU", "CPU")}
    per_pool: dict[str, dict[str, float]] = {}
    for owner, bundles in zip(plan.owners, plan.groups):
        p = per_pool.setdefault(owner, {})
        for b in bundles:
            for k, v in b.items():
                p[k] = p.get(k, 0.0) + v
    parts = ", ".join(f"{name}: {d.get('GPU', 0):g} GPU/{d.get('CPU', 0):g} CPU" for name, d in per_pool.items())
    for k in ("GPU", "CPU"):
        if need.get(k, 0.0) > have[k] + _EPS:
            if k == "CPU":
                hint = "lower num_cpus / train.cpus_per_worker, or replicas / train.num_workers"
            elif "train" in per_pool:  # a training job: its workers and its rollout / PRM pools do not share GPUs
                hint = ("lower train.num_workers, rollout.replicas (and prm.replicas): training workers and rollout "
                        "engines take GPUs of their own")
            else:
                hint = "set prm.colocate=true (policy and PRM share each GPU), or lower policy.replicas / prm.replicas"
            raise ConfigError(f"placement: the pools need {need[k]:g} {k}s ({parts}), the cluster has "
                              f"{have[k]:g} free; {hint}")
    bad = _fits(plan.groups, nodes)
    if bad is not None:
        raise ConfigError(f"placement: {plan.owners[bad]} group {bad} ({' '.join(map(_fmt_bundle, plan.groups[bad]))}) "
                          f"fits on no node's free resources ({parts}); a replica's tp ranks share one node: use "
                          "fewer GPUs per replica (tp) or bigger nodes")


def reserve(plan: Plan, name: str = "ponder", timeout_s: float = 600.0) -> list:
    """Create the plan's placement groups and wait until all are placed; none is left behind on failure."""
    import os

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    groups = [placement_group(b, strategy=strategy(b), name=f"{name}-{owner}-{i}-{os.getpid()}")
              for i, (b, owner) in enumerate(zip(plan.groups, plan.owners))]
    try:
        ray.get([g.ready() for g in groups], timeout=timeout_s)
    except BaseException:
        for g in groups:
            try:
                remove_placement_group(g)
            except Exception:
                pass
        raise ConfigError(f"placement: the {len(groups)} placement groups were not placed within {timeout_s:g} s "
                          f"(need {plan.demand()}, free {ray.available_resources()}); another job holds them?") from None
    return groups


# --- what a model needs ---------------------------------------------------------------------------------------

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# GPU memory by Ray's accelerator_type resource, for the KV estimate (GiB).
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100": 80, "A100-40G": 40, "A100-80G": 80, "L40S": 48, "L4": 24,
                  "A10G": 24, "T4": 16, "V100": 16, "B200": 180}


def estimate_memory(cfg: PoolConfig, gpu_memory_gib: float | None = None) -> dict[str, Any]:
    """Weights and KV cache per GPU from the model's config.json and the dtype, without loading any weights.

    Returns what it could read: params, bytes per parameter, weights_gib_per_gpu, kv_kib_per_token_per_gpu and,
    when the GPU's memory and the engine's memory share are known, kv_tokens_per_gpu. `error` when the config
    could not be read (a Hub id with no hub access)."""
    from app.toy import resolve_model

    try:
        from transformers import AutoConfig

        conf = AutoConfig.from_pretrained(resolve_model(cfg.model))
    except Exception as e:  # no hub access, unknown architecture
        return {"error": f"config not readable ({type(e).__name__})"}
    text = getattr(conf, "get_text_config", lambda: conf)()
    h, layers = text.hidden_size, text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or h // heads
    inter = getattr(text, "intermediate_size", 4 * h)
    vocab = text.vocab_size
    attn = h * heads * head_dim + 2 * h * kv_heads * head_dim + heads * head_dim * h
    params = layers * (attn + 3 * h * inter) + vocab * h * (1 if getattr(text, "tie_word_embeddings", False) else 2)
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = config_dtype(text) or "float32"
    nbytes = _DTYPE_BYTES.get(dtype, 4)
    tp = cfg.tp
    out: dict[str, Any] = dict(params=params, dtype=dtype, weights_gib_per_gpu=params * nbytes / tp / 2**30,
                               kv_kib_per_token_per_gpu=2 * layers * kv_heads * head_dim * nbytes / tp / 1024)
    util = cfg.engine_kwargs.get("gpu_memory_utilization")
    if gpu_memory_gib and cfg.engine == "vllm":
        util = 0.9 if util is None else float(util)
        free = util * gpu_memory_gib - out["weights_gib_per_gpu"]
        out["kv_tokens_per_gpu"] = max(0, math.floor(free * 2**30 / (out["kv_kib_per_token_per_gpu"] * 1024)))
        out["gpu_memory_gib"], out["gpu_memory_utilization"] = gpu_memory_gib, util
    return out


def cluster_gpu_memory_gib() -> float | None:
    """The cluster's GPU memory from Ray's `accelerator_type:X` resource, where X is a GPU we know."""
    import ray

    for key in ray.cluster_resources():
        if key.startswith("accelerator_type:"):
            kind = key.split(":", 1)[1]
            for name, gib in sorted(GPU_MEMORY_GIB.items(), key=lambda kv: -len(kv[0])):
                if name in kind:
                    return float(gib)
    return None
