"""The latest weights a trainer pushed to its rollout pool, so that a replica Ray restarts can load them itself.

The trainer's rank 0 records each finished push here (`record(version, bucket refs)`: the object-store buckets it
already sent to the replicas, kept alive by the reference this actor holds); a `PolicyActor` started with
`weights_from=` this actor's name loads them before it serves its first batch (`PolicyActor._catch_up`). The
objects belong to the trainer's rank 0: when it dies they go too, and the restarted trainer pushes again before
its first rollout. One tiny actor per rollout pool, named `ledger_name(pool name)`.
"""
from __future__ import annotations

from typing import Any


def ledger_name(pool_name: str) -> str:
    return f"{pool_name}-weights"


class WeightLedger:
    def __init__(self):
        self.version, self.refs = -1, []

    def record(self, version: int, refs: list) -> int:
        """refs: a list of ObjectRefs (inside a list, so they arrive as references, not values)."""
        self.version, self.refs = int(version), list(refs)
        return self.version

    def latest(self) -> tuple[int, list]:
        return self.version, self.refs


def start_ledger(pool_name: str) -> Any:
    """A fresh (emptied) ledger for the pool `pool_name`; its name is `ledger_name(pool_name)`."""
    import ray

    actor = ray.remote(num_cpus=0)(WeightLedger).options(
        name=ledger_name(pool_name), get_if_exists=True).remote()
    ray.get(actor.record.remote(-1, []))
    return actor
