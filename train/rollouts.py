"""What the RL trainers (`train.latro`, `train.ppo`) share: the rollout pool, the weight push after every optimizer
step, the rollout timing, and the frozen reference.

- `start_rollout_pool(cfg, name)`: a `PolicyActor` pool of the recipe's `rollout:` section (default: one HF
  replica, float32), always serving `cfg.model`, with its `WeightLedger` (actors.weight_ledger).
- `RolloutTask.weights_changed` (the loop's hook, on every rank, once before training and after every optimizer
  step): the full state dict is gathered (ZeRO 0-2: the module's on rank 0; ZeRO-3: DeepSpeed's consolidated 16-bit
  state dict, a collective), rank 0 pushes it to every replica as ONE weight-update session (`push_weights`:
  `start_weight_update`, a `load_weights_chunk` per bucket of `sync_bucket_mb` through the object store,
  `finish_weight_update(global_step)`; vLLM rebuilds each layer once it holds all its tensors, so a bucket may
  split a fused layer) and records it in the ledger, and all ranks wait at a barrier. The first call of a run
  pushes too (version = the start step): a fresh run, a resume, or Ray Train's restart of a run that crashed
  before its first checkpoint, whose replicas still serve the crashed attempt's weights.
- Weight versions: every replica reports the version it serves (`PolicyActor.served_version`, `stats()`), and
  `RolloutTask.generate` asks for `self.step`'s: a replica at another version refuses (`StaleWeights`), so no
  rollout is sampled from other weights; a replica Ray restarts loads the ledger's version before its first batch.
- `RolloutTask.generate(requests)`: the pool's completions and the seconds they took (`rollout_s`);
  `last_step_s` is the wall time of the previous optimizer step, weight sync included; `rollout_share(rows)` turns
  a run's per-step rows into the share of a step spent generating rollouts.
- `RolloutTask.frozen_reference(engine, build, part)`: the frozen reference (the starting policy) in the policy's
  dtype. ZeRO 0-2: a copy of the engine's module (its `part`); ZeRO-3: `build()` (partitioned by `zero.Init`, the
  loop's `HfDeepSpeedConfig` being alive) wrapped in its own DeepSpeed engine with no optimizer, as OpenRLHF does
  for its reference model: each rank holds a shard, and every forward gathers the layers it runs.
- `demand(cfg)`: what a training job asks of the cluster, for the dry run.
"""
from __future__ import annotations

import time

from app.pool_config import PoolConfig
from train.loop import TrainTask, deepspeed_config


def start_rollout_pool(cfg, name: str):
    """The rollout actors of a LaTRO / PPO recipe (`cfg.rollout`, `cfg.model`): a started `ModelPool`, with the
    `WeightLedger` its pushes are recorded in (`pool.weights_ledger`: the handle keeps the actor alive), which a
    restarted replica loads."""
    from actors.policy import start_policy_pool
    from actors.weight_ledger import ledger_name, start_ledger

    pool_cfg = (cfg.rollout or PoolConfig(engine="hf", dtype="float32")).model_copy(update={"model": cfg.model})
    ledger = start_ledger(name)
    pool = start_policy_pool(pool_cfg, name=name, weights_from=ledger_name(name))
    pool.weights_ledger = ledger
    return pool


def gather_state(engine, zero_stage: int, rank: int) -> dict | None:
    """The full state dict on rank 0 (None elsewhere); under ZeRO-3 every rank takes part."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        return state if rank == 0 else None
    return engine.module.state_dict() if rank == 0 else None


def buckets(state: dict, bucket_mb: float) -> list[dict]:
    """`state` cut into dicts of about `bucket_mb` MiB at tensor boundaries, in state-dict order (a bucket may
    split a layer's tensors: q from k and v, gate from up; the update session puts them back together)."""
    out, cur, size = [], {}, 0
    for k, v in state.items():
        cur[k] = v.detach().cpu()
        size += v.numel() * v.element_size()
        if size >= bucket_mb * 2**20:
            out.append(cur)
            cur, size = {}, 0
    if cur:
        out.append(cur)
    return out


def push_weights(pool, state: dict, version: int, bucket_mb: float) -> None:
    """Send `state` to every replica of the rollout pool as ONE weight-update session: `start_weight_update`,
    one `load_weights_chunk` per bucket of about `bucket_mb` MiB (one object-store object each, shared by the
    replicas), `finish_weight_update(version)`. A replica serves nothing in between, and answers the version."""
    import ray

    refs = [ray.put(b) for b in buckets(state, bucket_mb)]
    pool.pool.broadcast("start_weight_update")
    for ref in refs:
        pool.pool.broadcast("load_weights_chunk", ref)
    got = pool.pool.broadcast("finish_weight_update", version)
    assert all(g == version for g in got), got
    ledger = getattr(pool, "weights_ledger", None)
    if ledger:  # what a replica that Ray restarts loads before it serves (actors.weight_ledger)
        ray.get(ledger.record.remote(version, refs))


def rollout_share(rows: list[dict], grad_accum: int = 1) -> float:
    """The share of an optimizer step spent generating rollouts, from a run's metrics.jsonl rows: row i's
    `last_step_s` is step i-1's wall time, whose generation took grad_accum x row i-1's `rollout_s` (a mean over
    micro batches). Step 1 (it includes warm-up) is left out when there are more."""
    pairs = [(rows[i - 1]["rollout_s"] * grad_accum, rows[i]["last_step_s"]) for i in range(1, len(rows))]
    pairs = pairs[1:] or pairs
    return sum(a for a, _ in pairs) / max(sum(b for _, b in pairs), 1e-9)


STALE_RETRIES = 3  # a rollout refused for another weights version is asked again this often, 1 s apart


class RolloutTask(TrainTask):
    """A task whose rollouts come from `self.pool` (a `ModelPool` of PolicyActors, picklable: the actors are
    shared). Subclasses set `self.cfg` (with `train` and `sync_bucket_mb`) and `self.pool`, and call
    `start_rollouts()` in their `prepare`."""

    cfg = None
    pool = None
    step = 0  # the global step the current weights belong to (seeds the rollouts)

    def start_rollouts(self) -> None:
        self._t_step: float | None = None  # set by the first weights_changed (before training starts)
        self._last_step_s = 0.0

    def rollout_state(self, state: dict | None) -> dict | None:
        """The part of the gathered state dict the rollout actors serve (PPO: the actor without the critic)."""
        return state

    def weights_changed(self, engine, global_step, rank, world):
        """Push the weights to the rollout actors (rank 0), then every rank waits for them; also times the steps.
        The first call of a run pushes too, fresh or resumed (the actors may hold a crashed attempt's weights)."""
        import torch

        state = self.rollout_state(gather_state(engine, self.cfg.train.zero_stage, rank))
        if rank == 0 and self.pool is not None:
            push_weights(self.pool, state, global_step, self.cfg.sync_bucket_mb)
        del state
        if world > 1:
            torch.distributed.barrier()  # nobody samples before the actors have the new weights
        self.step = global_step
        now = time.perf_counter()
        if self._t_step is not None:
            self._last_step_s = now - self._t_step
        self._t_step = now

    def rollout_seed(self, idx: int) -> int:
        """The seed of example `idx`'s rollouts at the current step: keyed by the example, so ranks (which hold
        different examples) never sample with the same seeds, and a resumed step samples as it did."""
        return (self.cfg.train.seed * 1_000_003 + self.step * 10_007 + int(idx)) * 1000

    @property
    def last_step_s(self) -> float:
        return self._last_step_s

    def generate(self, requests) -> tuple[list, float]:
        """The rollout pool's completions of `requests`, sampled from the weights of `self.step` (a replica that
        serves another version refuses; tried again a few times, then an error), and the seconds they took."""
        from actors.policy import StaleWeights

        t0 = time.perf_counter()
        for attempt in range(STALE_RETRIES + 1):
            try:
                out = self.pool.client().generate_at(requests, self.step)
                break
            except StaleWeights as e:
                if attempt == STALE_RETRIES:
                    raise RuntimeError(f"rollouts at step {self.step}: {e}; the push of this version did not reach "
                                       "every rollout replica") from e
                time.sleep(1.0)
        return out, time.perf_counter() - t0

    def frozen_reference(self, engine, build, part=lambda module: module):
        """The frozen starting policy, in the policy's dtype, eval mode, no gradients (module docstring). `build()`
        makes the policy afresh (ZeRO-3); `part(engine.module)` is the policy inside the engine (ZeRO 0-2)."""
        import copy

        if self.cfg.train.zero_stage == 3:
            import deepspeed

            ref, *_ = deepspeed.initialize(model=build(), config=deepspeed_config(self.cfg.train))
        else:
            ref = copy.deepcopy(part(engine.module))
            ref.to(next(engine.module.parameters()).dtype)
        for p in ref.parameters():
            p.requires_grad_(False)
        ref.eval()
        return ref


def demand(cfg) -> tuple[dict, dict]:
    """What a training job asks of the cluster: its rollout / PRM pools (LaTRO, PPO) and one bundle per Ray Train
    worker, for `jobs.common.dry_run` (pools, extra)."""
    pools = {}
    if cfg.job in ("latro", "ppo"):
        pools["policy"] = (getattr(cfg, "rollout", None) or PoolConfig(engine="hf")).model_copy(
            update={"model": cfg.model})
    if cfg.job == "ppo":
        pools["prm"] = cfg.prm
    t = cfg.train
    worker = {"CPU": float(t.cpus_per_worker), **({"GPU": 1.0} if t.use_gpu else {})}
    return pools, {"train": [[worker]] * t.num_workers}
