"""Run inside a Ray job (tests/test_job_submit.py): start the toy pools with the plan a recipe gives and print, as
one JSON line, the plan beside what Ray really made (placement groups' bundles, each actor's resources, group and
node), then stop the pools. Usage: python tests/placement_probe.py POLICY_REPLICAS PRM_REPLICAS COLOCATE(0/1)."""
from __future__ import annotations

import json
import sys

import ray

from actors.pools import plan, start_pools
from app.pool_config import PoolConfig, PRMPoolConfig
from jobs.common import init_ray


def main() -> None:
    n_policy, n_prm, colocate = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    policy = PoolConfig(engine="hf", model="toy:policy", replicas=n_policy, num_gpus=0.5 if colocate else None)
    prm = PRMPoolConfig(engine="hf", model="toy:prm", replicas=n_prm, colocate=colocate)
    init_ray()
    expected = plan(policy, prm)
    with start_pools(policy, prm) as pools:
        table = ray.util.placement_group_table()
        groups = {}
        for pool in (pools.policy, pools.prm):
            for pg in pool.pool.placement_groups:
                groups[pg.id.hex()] = [dict(b) for b in table[pg.id.hex()]["bundles"].values()]
        actors = {name: [dict(resources=i["resources"], placement_group=i["placement_group"], node_id=i["node_id"],
                              gpu_ids=i["gpu_ids"]) for i in pool.info]
                  for name, pool in (("policy", pools.policy), ("prm", pools.prm))}
        answer = pools.policy.client().generate
        from app.contracts import GenerationRequest

        ok = len(answer([GenerationRequest(prompt="Q: 1+1\n", n=1, max_tokens=4, temperature=0.0)])[0]) == 1
        scores = pools.prm.client().score("1+1", [["1+1=2"]])
    print("PROBE " + json.dumps(dict(plan=expected.to_dict(), groups=groups, actors=actors, generated=ok,
                                      scored=len(scores[0]) == 1)), flush=True)


if __name__ == "__main__":
    main()
