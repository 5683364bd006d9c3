"""The pools every job (and, later, the Serve app) starts first.

    pools = start_pools(recipe.policy, recipe.prm)     # PoolConfig, PRMPoolConfig | None (app.pool_config)
                                                       # planned together, checked once, then started
    policy, prm = pools.clients()                      # PolicyHandle, RewardHandle | None: picklable
    ...
    pools.shutdown()                                   # or `with start_pools(...) as pools:`
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.placement import Plan, cluster_has_gpus, plan_pools, validate_colocation
from actors.policy import start_policy_pool, validate_policy_config
from actors.prm import start_prm_pool, validate_prm_config
from actors.replicas import ModelPool, ReplicaPool
from app.pool_config import PoolConfig, PRMPoolConfig


@dataclass
class Pools:
    """The pools a job runs against: a policy, and a PRM when the method needs one."""

    policy: ModelPool
    prm: ModelPool | None = None

    def clients(self) -> tuple[Any, Any | None]:
        return self.policy.client(), (self.prm.client() if self.prm is not None else None)

    def shutdown(self) -> None:
        if self.prm is not None:
            self.prm.shutdown()
        self.policy.shutdown()

    def __enter__(self) -> "Pools":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def plan(policy: PoolConfig, prm: PRMPoolConfig | None = None, gpus: bool | None = None) -> Plan:
    """Where the job's pools go (`actors.placement`); `gpus` defaults to whether the running cluster has any."""
    validate_colocation(policy, prm)
    pools = {"policy": policy, **({"prm": prm} if prm is not None else {})}
    return plan_pools(pools, gpus=cluster_has_gpus() if gpus is None else gpus)


def start_pools(policy: PoolConfig, prm: PRMPoolConfig | None = None) -> Pools:
    """Check both configs, plan both pools and check their COMBINED demand against the cluster's free resources
    (one line if it cannot fit, before any model loads), reserve the placement groups, then start the policy
    pool and the PRM pool on them. A failure anywhere removes what was started."""
    import ray

    from actors.placement import check_fit, reserve

    validate_policy_config(policy)
    if prm is not None:
        validate_prm_config(prm)
    if not ray.is_initialized():
        ray.init()
    p = plan(policy, prm)
    check_fit(p)
    groups = reserve(p)

    def placement(name: str) -> dict:
        return dict(slots=p.pool_slots(name), groups=groups,
                    owned_groups=[g for g, owner in zip(groups, p.owners) if owner == name])

    try:
        policy_pool = start_policy_pool(policy, placement=placement("policy"))
    except BaseException:
        ReplicaPool._remove_groups(groups)
        raise
    try:
        prm_pool = start_prm_pool(prm, placement=placement("prm")) if prm is not None else None
    except BaseException:
        policy_pool.shutdown()
        ReplicaPool._remove_groups(groups)
        raise
    return Pools(policy_pool, prm_pool)
