"""Placement planned once for all pools, checked once against the cluster; output paths that survive a job.

Pure tests (no Ray): the plan's groups, bundles and actor shares, co-location, the combined fit check against
nodes' free resources, the memory estimate, and `app.storage.check_output_path`. The same plans on a simulated
8-GPU Ray cluster, started for real, are in tests/test_cluster_walkthrough.py.
"""
from __future__ import annotations

import pytest

from actors.placement import check_fit, estimate_memory, plan_pools, strategy, validate_colocation
from app.config import ConfigError
from app.pool_config import PoolConfig, PRMPoolConfig
from app.storage import check_output_path

NODE_8 = [{"GPU": 8.0, "CPU": 64.0}]


def recipe_pools(policy_replicas=8, prm_replicas=8, colocate=True, **prm):
    """The README's example: search-and-learn's setup (vLLM at half of each GPU, the PRM on the other half)."""
    policy = PoolConfig(engine="vllm", model="toy:policy", replicas=policy_replicas, num_gpus=0.5 if colocate else None,
                        engine_kwargs={"gpu_memory_utilization": 0.45})
    prm_cfg = PRMPoolConfig(engine="hf", model="toy:prm", replicas=prm_replicas, colocate=colocate, **prm)
    return {"policy": policy, "prm": prm_cfg}


def test_readme_example_fits_eight_gpus_with_colocation():
    plan = plan_pools(recipe_pools(), gpus=True)
    assert len(plan.groups) == 8                                  # the PRM adds no group: it sits on the policy's
    assert all(b == [{"GPU": 1.0, "CPU": 2.0}] for b in plan.groups)
    pol, prm = plan.pool_slots("policy"), plan.pool_slots("prm")
    assert [s.group for s in pol] == [s.group for s in prm] == list(range(8))
    assert all(s.num_gpus == 0.5 and s.bundle == 0 for s in pol + prm)
    assert plan.demand() == {"GPU": 8.0, "CPU": 16.0}
    check_fit(plan, NODE_8)


def test_without_colocation_the_combined_demand_fails_in_one_line_naming_the_fix():
    pools = recipe_pools(prm_replicas=1, colocate=False)
    plan = plan_pools(pools, gpus=True)
    assert plan.demand()["GPU"] == 9.0                           # 8 policy GPUs + 1 PRM GPU
    with pytest.raises(ConfigError) as e:
        check_fit(plan, NODE_8)
    msg = str(e.value)
    assert "\n" not in msg and "need 9 GPUs" in msg and "has 8 free" in msg and "prm.colocate=true" in msg


def test_fit_is_checked_against_free_resources_per_node():
    plan = plan_pools({"policy": PoolConfig(engine="vllm", replicas=2, tp=4)}, gpus=True)
    check_fit(plan, [{"GPU": 4.0, "CPU": 8.0}, {"GPU": 4.0, "CPU": 8.0}])
    with pytest.raises(ConfigError, match="need 8 GPUs .* has 6 free"):
        check_fit(plan, [{"GPU": 4.0, "CPU": 8.0}, {"GPU": 2.0, "CPU": 8.0}])   # 2 GPUs already taken
    big = plan_pools({"policy": PoolConfig(engine="hf", num_cpus=6)}, gpus=True)
    with pytest.raises(ConfigError, match="fits on no node"):
        check_fit(big, [{"GPU": 1.0, "CPU": 4.0}, {"GPU": 1.0, "CPU": 4.0}])   # 8 CPUs in all, 4 per node


def test_tensor_parallel_replicas_get_one_gpu_bundle_per_rank_and_the_actor_none():
    plan = plan_pools({"policy": PoolConfig(engine="vllm", replicas=2, tp=4, num_cpus=2)}, gpus=True)
    assert plan.groups == [[{"GPU": 1.0, "CPU": 2.0}] * 4] * 2
    assert [s.num_gpus for s in plan.slots] == [0.0, 0.0]
    with pytest.raises(ConfigError, match="policy.num_gpus: each rank"):
        plan_pools({"policy": PoolConfig(engine="vllm", tp=2, num_gpus=0.5)}, gpus=True)


def test_a_policy_replica_without_a_prm_beside_it_gets_a_gpu_of_its_own():
    """prm.replicas < policy.replicas: the replicas past the PRM's keep one engine per GPU (two half-GPU vLLM
    engines on one GPU: the second fails its free-memory check and restarts until the pool times out)."""
    plan = plan_pools(recipe_pools(policy_replicas=4, prm_replicas=2), gpus=True)
    assert [g[0]["GPU"] for g in plan.groups] == [1.0, 1.0, 1.0, 1.0]
    assert [s.num_gpus for s in plan.pool_slots("policy")] == [0.5, 0.5, 1.0, 1.0]
    assert [s.group for s in plan.pool_slots("prm")] == [0, 1]
    assert plan.demand()["GPU"] == 4.0
    with pytest.raises(ConfigError, match="need 4 GPUs"):
        check_fit(plan, [{"GPU": 3.0, "CPU": 64.0}])   # half GPUs would have packed 3 + 1 onto 3


def test_tensor_parallel_groups_go_whole_onto_one_node():
    plan = plan_pools({"policy": PoolConfig(engine="vllm", replicas=1, tp=4)}, gpus=True)
    assert strategy(plan.groups[0]) == "STRICT_PACK" and strategy([{"GPU": 1.0}]) == "PACK"
    with pytest.raises(ConfigError, match="tp ranks share one node"):  # 4 GPUs free, but 2 + 2 on two nodes
        check_fit(plan, [{"GPU": 2.0, "CPU": 8.0}, {"GPU": 2.0, "CPU": 8.0}])


def test_fractions_share_gpus_and_cpu_clusters_get_cpu_bundles():
    plan = plan_pools({"policy": PoolConfig(replicas=4, num_gpus=0.25)}, gpus=True)
    assert plan.demand()["GPU"] == 1.0
    check_fit(plan, [{"GPU": 1.0, "CPU": 4.0}])
    cpu = plan_pools(recipe_pools(policy_replicas=2, prm_replicas=2), gpus=False)
    assert cpu.groups == [[{"CPU": 2.0}], [{"CPU": 2.0}]] and all(s.num_gpus == 0 for s in cpu.slots)


@pytest.mark.parametrize("change, key", [
    (dict(prm_replicas=9), "prm.colocate: 9 PRM replicas"),
    (dict(num_gpus=0.75), "prm.num_gpus: policy.num_gpus 0.5 + prm.num_gpus 0.75"),
])
def test_bad_colocation_is_one_line(change, key):
    pools = recipe_pools(prm_replicas=change.pop("prm_replicas", 8), **change)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("+", r"\+")):
        validate_colocation(pools["policy"], pools["prm"])


def test_colocated_vllm_must_state_a_memory_share_within_its_gpu_share():
    prm = PRMPoolConfig(colocate=True)
    with pytest.raises(ConfigError, match="policy.engine_kwargs.gpu_memory_utilization: a co-located vLLM"):
        validate_colocation(PoolConfig(engine="vllm"), prm)
    with pytest.raises(ConfigError, match="0.9 is more than policy.num_gpus 0.5"):
        validate_colocation(PoolConfig(engine="vllm", engine_kwargs={"gpu_memory_utilization": 0.9}), prm)
    with pytest.raises(ConfigError, match="needs policy.tp 1"):
        validate_colocation(PoolConfig(engine="vllm", tp=2), prm)


def test_dtype_is_one_vocabulary_and_auto_by_default():
    assert PoolConfig().dtype == "auto"
    assert PoolConfig(dtype="bf16").dtype == "bfloat16" and PoolConfig(dtype="half").dtype == "float16"
    with pytest.raises(ConfigError, match="dtype"):
        PoolConfig(dtype="bf17")


def test_memory_estimate_reads_the_checkpoint_config_without_loading_weights():
    est = estimate_memory(PoolConfig(model="toy:policy", dtype="bfloat16", engine="vllm", tp=1,
                                     engine_kwargs={"gpu_memory_utilization": 0.5}), gpu_memory_gib=80)
    assert est["dtype"] == "bfloat16" and est["params"] > 0
    assert est["weights_gib_per_gpu"] == pytest.approx(est["params"] * 2 / 2**30)
    assert est["kv_tokens_per_gpu"] > 0
    auto = estimate_memory(PoolConfig(model="toy:policy"))
    assert auto["dtype"] == "float32"                           # the checkpoint's own
    assert "error" in estimate_memory(PoolConfig(model="/nonexistent/checkpoint"))


def test_output_paths_on_a_cluster_must_be_shared_storage(tmp_path):
    with pytest.raises(ConfigError, match="output_dir: .* still has the <shared> placeholder"):
        check_output_path("<shared>/ponder/runs/x", "output_dir", cluster=False)
    with pytest.raises(ConfigError, match="output_dir: 'runs/x' is relative; under `ray job submit`"):
        check_output_path("runs/x", "output_dir", cluster=True)
    assert check_output_path("runs/x", "output_dir", cluster=False) == "runs/x"      # a laptop run
    assert check_output_path(str(tmp_path), "output_dir", cluster=True) == str(tmp_path)
    assert check_output_path("s3://b/x", "train.storage_path", allow_uri=True, cluster=True) == "s3://b/x"
    with pytest.raises(ConfigError, match="is a URI, but this output is written as files"):
        check_output_path("s3://b/x", "output_dir", cluster=True)


def test_on_cluster_reads_the_job_environment(monkeypatch):
    from app.storage import on_cluster

    for k in ("RAY_JOB_CONFIG_JSON_ENV_VAR", "RAY_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    assert not on_cluster()
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert not on_cluster()
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert on_cluster()
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert on_cluster()


def test_every_shipped_real_recipe_plans_and_fits_one_8_gpu_node():
    """The real-model recipes carry bf16 and co-location that passes its checks, and their output paths are the
    <shared> placeholder the job refuses until it is set."""
    from pathlib import Path

    from app.config import load_config
    from app.search.recipe import SearchRecipe

    root = Path(__file__).resolve().parents[1] / "configs"
    recipes = [p for p in sorted(root.glob("*/*.yaml")) if p.parent.name != "toy"
               and "job: search" in p.read_text()]
    assert len(recipes) >= 6
    for path in recipes:
        recipe = load_config(SearchRecipe, str(path), ["policy.replicas=8", "prm.replicas=8"])
        assert recipe.policy.dtype == "bfloat16", path
        assert recipe.output_dir.startswith("<shared>/"), path
        with pytest.raises(ConfigError, match="placeholder"):
            check_output_path(recipe.output_dir, "output_dir", cluster=True)
        policy, prm = recipe.pool_configs()
        plan = plan_pools({"policy": policy, **({"prm": prm} if prm else {})}, gpus=True)
        check_fit(plan, NODE_8)


@pytest.mark.parametrize("job", ["ppo", "latro"])
def test_7b_rl_recipes_fit_one_8_gpu_node_and_name_the_training_knobs_when_not(job):
    """The dry run's plan of the 7B PPO and LaTRO recipes (trainers + rollout engines + PRM) fits one 8-GPU node;
    one trainer more does not, and the refusal names the training job's knobs, not search's prm.colocate."""
    from app.config import load_config
    from jobs.train import config_class
    from train.rollouts import demand

    shared = ["train.storage_path=/mnt/shared/ponder/train"]

    def plan_of(overrides):
        pools, extra = demand(load_config(config_class(job), f"qwen2.5-math-7b/{job}", shared + overrides))
        plan = plan_pools(pools, gpus=True)
        for owner, groups in extra.items():
            plan.add_groups(owner, groups)
        return plan

    plan = plan_of([])
    assert plan.demand()["GPU"] == 8.0
    check_fit(plan, NODE_8)
    workers = load_config(config_class(job), f"qwen2.5-math-7b/{job}", shared).train.num_workers
    with pytest.raises(ConfigError) as e:
        check_fit(plan_of([f"train.num_workers={workers + 1}"]), NODE_8)
    assert "need 9 GPUs" in str(e.value) and "train.num_workers" in str(e.value)
    assert "colocate" not in str(e.value)


def test_train_dry_run_counts_the_workers_with_the_pools_and_loads_nothing(tmp_path):
    """`ponder train --dry-run`: the trainer's Ray Train workers are part of the one fit check (a local cluster)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_JOB_CONFIG_JSON_ENV_VAR")}
    done = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "toy/sft", "--dry-run",
                           "train.num_workers=64", f"train.storage_path={tmp_path}"], capture_output=True, text=True,
                          timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stdout + done.stderr
    assert errors == [f"error: placement: the pools need 64 CPUs (train: 0 GPU/64 CPU), the cluster has "
                      f"{max(2, os.cpu_count() or 2)} free; lower num_cpus / train.cpus_per_worker, or replicas / "
                      f"train.num_workers"], done.stderr
    assert "train  -        63" in done.stdout and not any(tmp_path.iterdir())
