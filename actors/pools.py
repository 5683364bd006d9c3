"""The pools every job (and, later, the Serve app) starts first.

    pools = start_pools(recipe.policy, recipe.prm)     # PoolConfig, PRMPoolConfig | None (app.pool_config)
    policy, prm = pools.clients()                      # PolicyHandle, RewardHandle | None: picklable
    ...
    pools.shutdown()                                   # or `with start_pools(...) as pools:`
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.policy import start_policy_pool
from actors.prm import start_prm_pool
from actors.replicas import ModelPool
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


def start_pools(policy: PoolConfig, prm: PRMPoolConfig | None = None) -> Pools:
    """Start the policy pool, then the PRM pool (if any); a failure in the second stops the first."""
    policy_pool = start_policy_pool(policy)
    try:
        prm_pool = start_prm_pool(prm) if prm is not None else None
    except BaseException:
        policy_pool.shutdown()
        raise
    return Pools(policy_pool, prm_pool)
