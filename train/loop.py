"""Training on Ray Train + DeepSpeed: one loop that SFT, PRM, DPO, step-DPO, LaTRO and PPO training share.

`fit(task, cfg)` starts a Ray Train `TorchTrainer` (Train V2) whose workers each run `worker_loop`:

- DeepSpeed engine from `deepspeed_config(cfg)`: ZeRO stage 0-3 from the recipe, micro batch per worker,
  gradient accumulation, clipping, bf16 on GPU only (fp32 on CPU). The optimizer is a plain torch AdamW handed to
  `deepspeed.initialize` (DeepSpeed's own fused/CPU Adam would need a compiled op; ZeRO shards the torch one just as
  well), with a linear-warmup + cosine schedule.
- Backend: gloo on CPU (`DS_ACCELERATOR=cpu` in the worker, which DeepSpeed's CPU accelerator needs), nccl on GPU.
  No DeepSpeed op is compiled at run time, and a worker that has not finished its first step after
  `train.start_timeout_s` fails naming what it waits on (`train.startup`).
- Checkpoints go through Ray Train: every `checkpoint_every_steps` optimizer steps and at the end of each epoch,
  every worker writes its DeepSpeed shards (`engine.save_checkpoint`) into a local folder and calls
  `ray.train.report(metrics, checkpoint=...)`; Ray merges the folders of all workers into one checkpoint under
  `storage_path/name`. Rank 0 adds `train_state.json` (epoch, step in epoch, global step) and `hf/`, the model
  exported with `save_pretrained` (ZeRO-3 parameters are gathered first) plus the tokenizer, which is what
  downstream code loads.
- Resume: Train V2 restores a run's state when a new `TorchTrainer` is given the same `RunConfig(name,
  storage_path)`; `ray.train.get_checkpoint()` then returns the latest checkpoint, the engine reloads its shards
  and the loop skips the batches it has already done (batches are a pure function of seed and epoch).
  A run that already finished returns at once with its last checkpoint.
- Metrics each epoch (and at each step checkpoint): loss (mean over the epoch, averaged over workers), lr,
  epoch, global_step, samples/s, the means of whatever extra metrics the task's `loss` returns, plus whatever the
  task's `evaluate` returns. Per optimizer step: one row (step, loss, lr, the task's extras averaged over workers, step_s)
  on the tqdm bar of rank 0 and in `metrics.jsonl` inside every checkpoint (all steps so far, carried over a
  resume), so per-step curves need no extra Ray Train report (each report is a barrier across workers).
- On a cluster: `storage_path` must be storage every node sees (`app.storage.check_output_path`: a
  relative path under `ray job submit` is refused, not resolved to the head node's working dir; `<shared>` is a
  placeholder; URIs such as s3:// are fine). The exported model is read through the checkpoint's own filesystem,
  so URI storage works to the end. ZeRO-3 builds the model under `zero.Init` (transformers' `HfDeepSpeedConfig`
  is set before `build_model`, so `from_pretrained` / `from_config` create each parameter already partitioned,
  never the full fp32 model per worker) and exports through DeepSpeed's consolidated 16-bit state dict, gathered
  layer by layer onto rank 0's CPU. `gradient_checkpointing` turns on HF's non-reentrant checkpointing.

Why a plain loop and not TRL's SFTTrainer: the PRM loss (soft labels at step-tag positions of a token-classification
head) and the Math-Shepherd '+'/'-' loss have no TRL trainer (TRL 1.16 dropped its PRM trainer), and one loop for
all trainers keeps DeepSpeed config, Ray checkpoints and mid-epoch resume in one place. This is the shape of Ray's
own Train + DeepSpeed example (`deepspeed.initialize` in the worker, checkpoints through `ray.train.report`). The
SFT data follows TRL's conventions (prompt/completion records, loss on the completion only, EOS appended).

A task (`TrainTask`) is small and picklable: it builds the model and the tokenized examples inside the worker,
collates a batch and computes the loss. Data files go through Ray Data (`train.ingest`: read from any filesystem,
checked and tokenised in Ray Data's tasks, each worker given only the rows of its own micro batches, by the same
batch plan, so the losses are the in-memory path's); generated data (toy:train) is made inside each worker.
"""
from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from app.config import Config
from train.batches import epoch_batches  # noqa: F401 (the batch plan; tests and benches import it here)
from train.export import export_to, exported_model

REPO = Path(__file__).resolve().parent.parent


class TrainConfig(Config):
    """How to train, for every trainer (the `train:` section of a recipe)."""

    num_workers: int = Field(2, ge=1, description="Ray Train workers (data-parallel ranks)")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl; else CPU with gloo")
    cpus_per_worker: float = Field(1, gt=0)
    torch_threads: int | None = Field(None, description="torch intra-op threads per worker (default: cpus_per_worker)")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    micro_batch_size: int = Field(16, ge=1, description="examples per worker per forward pass")
    grad_accum: int = Field(1, ge=1, description="micro batches per optimizer step")
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(50, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float = Field(1.0, ge=0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (all epochs)")
    bf16: bool = Field(True, description="bf16 mixed precision, on GPU only (CPU trains fp32)")
    seed: int = 0
    checkpoint_every_steps: int | None = Field(None, ge=1, description="also checkpoint mid-epoch")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=0, description="restart the worker group from the latest checkpoint this many "
                              "times when a worker fails (a crash, a lost node); 0: the run fails at once")
    max_preemption_failures: int | None = Field(
        None, ge=-1, description="as max_failures, for node preemptions, which Ray Train counts apart (its own "
        "default: unlimited); None: the same as max_failures; -1: unlimited")
    name: str = Field("run", description="run name: a second fit with the same name and storage resumes it")
    storage_path: str = Field("runs/train", validate_default=True,
                              description="where Ray Train keeps checkpoints: a local path (made absolute; refused "
                              "when relative on a cluster) or a URI (s3://, gs://, ...); every node must see it")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (HF "
                                         "gradient checkpointing, non-reentrant): big models on GPU")
    bucket_size: int = Field(20_000_000, ge=1, description="ZeRO reduce/allgather bucket (elements)")
    progress: bool = True
    ingest: Literal["auto", "ray_data", "memory"] = Field(
        "auto", description="how a data file reaches the workers: ray_data (read, checked and tokenised by Ray "
        "Data, each worker given only its shard: files, folders of shards and URIs, JSONL or Parquet), memory "
        "(every worker reads the whole local JSONL file) or auto (memory for a local JSONL file, Ray Data for "
        "the rest); generated data (toy:train) is always made in memory")
    start_timeout_s: float = Field(900, gt=0, description="a worker that has not finished its first optimizer step "
                                   "after this long fails the run, naming what it waits on (a build lock, a peer "
                                   "rank, a slow model load): raise it for big models on slow storage")
    resource_wait_s: float | None = Field(600, gt=0, description="how long the run waits for the cluster to free "
                                          "its workers' CPUs/GPUs before failing, naming what holds them (in Ray "
                                          "Train's 60 s start attempts); null: no limit, for an autoscaling cluster")

    @field_validator("storage_path")
    @classmethod
    def _abs_storage(cls, v: str) -> str:
        from app.storage import check_output_path, is_uri

        check_output_path(v, "train.storage_path", allow_uri=True)  # refused before a relative path is resolved
        if is_uri(v) or "://" in v:
            return v
        return str(Path(v).expanduser().resolve())


def absolute_paths(cfg):
    """A trainer's config with the recipe's relative file paths (`data`, `eval_data`, `output`, `model`,
    `init_from`) made absolute: Ray Train workers do not run in this directory (as `TrainConfig.storage_path`)."""
    update = {}
    for key in ("data", "eval_data", "output", "model", "init_from"):
        value = getattr(cfg, key, None)
        if not isinstance(value, str) or ":" in value or Path(value).is_absolute():
            continue  # unset, a toy:/new: name or a Hub id with a colon, or already absolute
        if key == "output" or Path(value).exists():
            update[key] = str(Path(value).resolve())
    return cfg.model_copy(update=update) if update else cfg


def deepspeed_config(cfg: TrainConfig) -> dict:
    """The DeepSpeed config of a recipe's `train:` section."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage >= 1:
        zero.update(
            reduce_bucket_size=cfg.bucket_size,
            allgather_bucket_size=cfg.bucket_size,
            overlap_comm=cfg.use_gpu,
            contiguous_gradients=True,
        )
    if cfg.zero_stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=cfg.bucket_size,
            stage3_param_persistence_threshold=10_000,
            sub_group_size=cfg.bucket_size,
            stage3_gather_16bit_weights_on_model_save=True,
        )
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * cfg.num_workers,
        "gradient_clipping": cfg.grad_clip,
        "bf16": {"enabled": bool(cfg.use_gpu and cfg.bf16)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class TrainTask:
    """What a trainer supplies to the shared loop. Subclasses are plain picklable objects."""

    def build_model(self):  # -> torch.nn.Module (float32)
        raise NotImplementedError

    def build_tokenizer(self):
        raise NotImplementedError

    def load_examples(self, tokenizer) -> list[dict]:
        """Tokenized examples; each a dict with at least `input_ids` (the in-memory path: every worker makes all)."""
        raise NotImplementedError

    def source(self) -> str | None:
        """The file, folder or URI the records come from (read through Ray Data, `train.ingest`); None when the
        task makes its data itself (toy:train)."""
        return None

    def record_spec(self) -> dict:
        """`train.records.check_record`'s keyword arguments for one record of `source()` (required keys, ...)."""
        return {}

    def examples_of(self, records: list[dict], tokenizer) -> list[dict]:
        """The examples of some records (what `load_examples` does to all of them; records that make no example
        are left out): Ray Data runs it in `map_batches`, off the training workers."""
        raise NotImplementedError

    def collate(self, examples: list[dict], tokenizer) -> dict:
        raise NotImplementedError

    def loss(self, model, batch: dict):
        """The loss of one micro batch (a scalar tensor), or (loss, {name: float}) with extra metrics, which the
        loop averages per step and per epoch over micro batches and workers (every call must return the same
        names)."""
        raise NotImplementedError

    def prepare(self, engine, examples: list[dict] | dict[int, dict], tokenizer, rank: int, world: int) -> None:
        """Optional: called on every rank after `deepspeed.initialize` and before a checkpoint is loaded, so
        `engine` still holds the starting weights (DPO computes its frozen reference's log-probs here). Under
        ZeRO-3 each forward is a collective: every rank must run the same number. `examples`: every example (a list,
        the same on every rank) or, under Ray Data ingest, this rank's own by row number (a dict)."""

    def weights_changed(self, engine, global_step: int, rank: int, world: int) -> None:
        """Optional: called on every rank once the weights are in place before training (after a checkpoint
        loads; `global_step` 0 on a fresh run) and after every optimizer step: RL trainers push the new weights
        to their rollout actor here (`train.latro`). Under ZeRO-3 gathering them is a collective."""

    def lr_scale(self, name: str) -> float:
        """Optional: the learning rate of parameter `name` relative to `train.lr` (PPO's critic trains slower)."""
        return 1.0

    def evaluate(self, model, tokenizer) -> dict:
        """Optional metrics at the end of each epoch (rank 0 runs it; keep it cheap)."""
        return {}


def _lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        t = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def _export_hf(engine, tokenizer, cfg: TrainConfig, out: Path, rank: int) -> None:
    """save_pretrained of the full model into out (rank 0 writes).

    ZeRO-3: DeepSpeed's consolidated state dict (every rank takes part): parameters are gathered module by module
    and copied to rank 0's CPU in the training dtype (bf16 on GPU), each module released before the next, so no
    rank ever holds the whole model on its GPU, nor any of it in fp32 (HF Trainer exports ZeRO-3 the same way).
    """
    model = engine.module
    if cfg.zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
        if rank == 0:
            model.save_pretrained(out, state_dict=state, safe_serialization=True)
    elif rank == 0:
        model.save_pretrained(out, safe_serialization=True)
    if rank == 0:
        tokenizer.save_pretrained(out)


def worker_loop(config: dict) -> None:
    """The per-worker training function given to TorchTrainer: `_train` under a `StartWatchdog`, with DeepSpeed's
    runtime op build switched off (train.startup says why)."""
    import ray.train

    from train.startup import StartWatchdog, _Stall, skip_runtime_op_builds

    cfg: TrainConfig = config["train"]
    ctx = ray.train.get_context()
    watchdog = StartWatchdog(cfg.start_timeout_s, ctx.get_world_rank(), ctx.get_world_size())
    if not cfg.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported: its CPU accelerator
    with watchdog:
        try:
            watchdog.phase("importing DeepSpeed")
            skip_runtime_op_builds()
            _train(config, watchdog)
        except _Stall:
            raise watchdog.error() from None


def _train(config: dict, watchdog) -> None:
    import torch

    cfg: TrainConfig = config["train"]
    task: TrainTask = config["task"]
    torch.set_num_threads(max(1, int(cfg.torch_threads or cfg.cpus_per_worker)))
    import deepspeed
    import ray.train
    from tqdm import tqdm

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    watchdog.phase("reading the latest checkpoint's state")
    checkpoint = ray.train.get_checkpoint()
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / "train_state.json").read_text())
        if state["epoch"] >= cfg.epochs or (cfg.max_steps and state["global_step"] >= cfg.max_steps):
            # Nothing left to do (checked before any data is built); the run's latest checkpoint, restored from
            # storage, stays the result's checkpoint.
            if rank == 0:
                print(f"run already finished at {checkpoint.path} (global step {state['global_step']})", flush=True)
            ray.train.report(dict(state.get("metrics", {}), resumed_finished=True))
            return

    tokenizer = task.build_tokenizer()
    if config.get("lengths") is not None:  # Ray Data ingest (train.ingest): this rank's rows, by row number
        from train.ingest import shard_examples

        watchdog.phase("reading this rank's shard of the training data (Ray Data)")
        examples = shard_examples(rank)
        lengths = config["lengths"]
    else:
        watchdog.phase("reading the training data (task.load_examples)")
        examples = task.load_examples(tokenizer)
        lengths = [e.get("length", len(e["input_ids"])) for e in examples]
    if not examples:
        raise ValueError("no training examples")
    ds_config = deepspeed_config(cfg)
    hf_ds = None
    if cfg.zero_stage == 3:
        # While this object lives, transformers' from_pretrained / from_config build the model under
        # deepspeed.zero.Init: each worker allocates only its shard of every parameter (and from_pretrained loads
        # the weights into the shards), instead of the full fp32 model per worker.
        from transformers.integrations import HfDeepSpeedConfig

        watchdog.phase("in deepspeed.init_distributed (ZeRO-3's process group)")
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")  # wraps Ray Train's process
        # group, so the config sees the real world size
        hf_ds = HfDeepSpeedConfig(ds_config)
    watchdog.phase("building the model (task.build_model)")
    model = task.build_model()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False
    steps_per_epoch = len(epoch_batches(lengths, cfg.micro_batch_size, world, cfg.grad_accum, cfg.seed, 0)) // (
        world * cfg.grad_accum
    )
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(lengths)} examples make no full optimizer step of {cfg.micro_batch_size} x {cfg.grad_accum} x "
            f"{world} workers; lower train.micro_batch_size"
        )
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)

    by_group: dict[tuple[bool, float], list] = {}
    for n, p in model.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)  # under zero.Init a parameter is a flat shard: its full shape
        decayed = len(shape) >= 2 and "norm" not in n
        by_group.setdefault((decayed, float(task.lr_scale(n))), []).append(p)
    # train.lr's groups first, decayed then not (the order of the plain two groups: old checkpoints resume, and
    # the reported lr is train.lr), then any groups of a task's lr_scale
    order = sorted(by_group, key=lambda key: (key[1] != 1.0, not key[0], key[1]))
    groups = [{"params": by_group[(decayed, scale)], "weight_decay": cfg.weight_decay if decayed else 0.0,
               "lr": cfg.lr * scale} for decayed, scale in order]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],  # ZeRO drops empty groups, which would break the scheduler
        lr=cfg.lr,
        betas=tuple(cfg.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, total_steps))
    watchdog.phase("in deepspeed.initialize (the process group, runtime-built ops)")
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    device = engine.device
    watchdog.phase("preparing the task (task.prepare: e.g. DPO's reference log-probs)")
    task.prepare(engine, examples, tokenizer, rank, world)  # the starting weights, before a checkpoint loads

    history: list[dict] = []  # one row per optimizer step (rank 0 writes them into each checkpoint)
    watchdog.phase("loading the checkpoint")
    if checkpoint:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(str(Path(d) / "ds"), tag="state")
            rows = Path(d) / "metrics.jsonl"
            if rank == 0 and rows.exists():
                history = [json.loads(x) for x in rows.read_text().splitlines() if x.strip()]
                history = [r for r in history if r["step"] <= state["global_step"]]
        if rank == 0:
            print(f"resumed from {checkpoint.path}: epoch {state['epoch']}, global step {state['global_step']}", flush=True)
    watchdog.phase("pushing the starting weights (task.weights_changed: RL rollout pools)")
    task.weights_changed(engine, state["global_step"], rank, world)
    watchdog.phase("running the first optimizer step (its collectives wait on every rank)")

    bar = tqdm(total=total_steps, initial=state["global_step"], desc=config.get("desc", "train"),
               disable=rank != 0 or not cfg.progress, dynamic_ncols=True, mininterval=2.0)

    def save(metrics: dict) -> None:
        with tempfile.TemporaryDirectory(prefix=f"ponder-ckpt-r{rank}-") as tmp:
            engine.save_checkpoint(str(Path(tmp) / "ds"), tag="state", save_latest=False)
            info = dict(state, metrics=metrics)
            if rank == 0:
                (Path(tmp) / "train_state.json").write_text(json.dumps(info))
                (Path(tmp) / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
            _export_hf(engine, tokenizer, cfg, Path(tmp) / "hf", rank)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"step_{state['global_step']:07d}")

    def mean_all(value: float, count: int) -> float:
        t = torch.tensor([value, float(count)], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(t)
        return float(t[0] / max(t[1], 1.0))

    def means_all(sums: dict[str, float], count: int) -> dict[str, float]:
        """{name: sum over this rank's micro batches} -> {name: mean over all ranks' micro batches}, one reduce."""
        names = sorted(sums)
        t = torch.tensor([sums[k] for k in names] + [float(count)], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(t)
        return {k: float(t[i] / max(t[-1], 1.0)) for i, k in enumerate(names)}

    def run_loss(batch):
        out = task.loss(engine, batch)
        return out if isinstance(out, tuple) else (out, {})

    start_step = state["global_step"]
    engine.train()
    finished = False
    for epoch in range(state["epoch"], cfg.epochs):
        batches = epoch_batches(lengths, cfg.micro_batch_size, world, cfg.grad_accum, cfg.seed, epoch)
        mine = batches[rank::world]
        start_micro = state["step_in_epoch"] * cfg.grad_accum if epoch == state["epoch"] else 0
        loss_sum, loss_n, t0, seen = 0.0, 0, time.time(), 0
        epoch_sums: dict[str, float] = {}
        step_sums: dict[str, float] = {}
        step_n = 0
        t_step = time.perf_counter()
        for mi in range(start_micro, len(mine)):
            batch = task.collate([examples[i] for i in mine[mi]], tokenizer)
            batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
            lr = scheduler.get_last_lr()[0]  # the lr this step trains with
            loss, extra = run_loss(batch)
            engine.backward(loss)
            engine.step()
            value = float(loss.detach())
            loss_sum += value
            loss_n += 1
            step_n += 1
            for k, v in {"loss": value, **extra}.items():
                step_sums[k] = step_sums.get(k, 0.0) + float(v)
                if k != "loss":
                    epoch_sums[k] = epoch_sums.get(k, 0.0) + float(v)
            seen += len(mine[mi]) * world
            if (mi + 1) % cfg.grad_accum:
                continue
            state["global_step"] += 1
            watchdog.started()
            task.weights_changed(engine, state["global_step"], rank, world)
            state["step_in_epoch"] = (mi + 1) // cfg.grad_accum
            row = dict(step=state["global_step"], epoch=epoch, lr=lr, **means_all(step_sums, step_n),
                       step_s=time.perf_counter() - t_step)  # rank 0's wall seconds of this optimizer step
            step_sums, step_n = {}, 0
            if rank == 0:
                history.append(row)
                bar.set_postfix({k: f"{v:.4g}" for k, v in row.items() if k not in ("step", "epoch")}, refresh=False)
            bar.update(1)
            last = state["global_step"] >= total_steps
            at_end = state["step_in_epoch"] >= steps_per_epoch
            if cfg.checkpoint_every_steps and state["global_step"] % cfg.checkpoint_every_steps == 0 and not (last or at_end):
                save(dict(loss=mean_all(loss_sum, loss_n), epoch=epoch, global_step=state["global_step"],
                          lr=scheduler.get_last_lr()[0], start_step=start_step, partial_epoch=True,
                          **means_all(epoch_sums, loss_n)))
            t_step = time.perf_counter()  # a checkpoint's time is not the next step's
            if last:
                finished = True
                break
        metrics = dict(
            **means_all(epoch_sums, loss_n),
            loss=mean_all(loss_sum, loss_n),
            epoch=epoch,
            global_step=state["global_step"],
            lr=scheduler.get_last_lr()[0],
            samples_per_s=seen / max(time.time() - t0, 1e-9),
            start_step=start_step,
        )
        if rank == 0:
            engine.eval()
            metrics.update(task.evaluate(engine.module, tokenizer))
            engine.train()
            bar.write(f"epoch {epoch}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
        if not (finished and state["step_in_epoch"] < steps_per_epoch):
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0  # else stopped by max_steps mid-epoch: a later
            # run with more steps goes on from this batch, not from the next epoch
        save(metrics)
        if finished:
            break
    bar.close()
    del hf_ds  # kept alive until here: transformers holds it by a weak reference


def failure_config(cfg: TrainConfig):
    """Ray Train's FailureConfig: `max_failures`, preemptions (counted apart since Ray 2.60, unlimited by
    default) bounded by `max_preemption_failures`, else by the same number, and the worker group's start attempts
    that found no free resources bounded by `resource_wait_s` (`train.resources`)."""
    import ray.train

    from train.resources import controller_failure_limit

    pre = cfg.max_failures if cfg.max_preemption_failures is None else cfg.max_preemption_failures
    return ray.train.FailureConfig(max_failures=cfg.max_failures, max_preemption_failures=pre,
                                   controller_failure_limit=controller_failure_limit(cfg.resource_wait_s))


def worker_resources(cfg: TrainConfig) -> dict[str, float]:
    return {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}


def fit(task: TrainTask, cfg: TrainConfig, desc: str = "train"):
    """Run `task` under Ray Train + DeepSpeed; returns the Ray Train `Result` (result.checkpoint holds `hf/`)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    loop_config: dict[str, Any] = {"train": cfg, "task": task, "desc": desc}
    data: dict[str, Any] = {}
    from train.ingest import local_jsonl, prepare

    source = task.source()
    if source is not None and (cfg.ingest == "ray_data" or (cfg.ingest == "auto" and (
            "://" in source or not local_jsonl(source)))):
        ingest = prepare(task, cfg)
        loop_config["lengths"] = ingest.lengths
        data = dict(datasets=ingest.datasets, dataset_config=ray.train.DataConfig(datasets_to_split=[]))
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config=loop_config,
        **data,
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=cfg.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=failure_config(cfg),
        ),
    )
    from train.resources import warn_if_short

    warn_if_short(worker_resources(cfg), cfg.num_workers, cfg.resource_wait_s)
    return trainer.fit()


def fit_and_export(task: TrainTask, cfg: TrainConfig, desc: str, output: str | None = None,
                   dtype: str = "bfloat16", model_class=None) -> tuple[Any, Path | str]:
    """`fit`, raise its error if it failed, and return (result, the exported model: `output` if given, written
    compact by `save_compact`, else the checkpoint's `hf/`, a local path or a URI)."""
    from train.resources import busy_error, gave_up_waiting
    from train.startup import StalledStart, stalled_start_in

    try:
        result = fit(task, cfg, desc=desc)
        if result.error:
            raise result.error
    except Exception as e:
        stalled = stalled_start_in(e)
        if stalled:
            raise StalledStart(stalled) from None  # the one line that says what to do, not Ray's traceback
        if gave_up_waiting(e):
            raise busy_error(worker_resources(cfg), cfg.num_workers, cfg.resource_wait_s) from None
        raise
    path = exported_model(result)
    if output:
        path = export_to(result.checkpoint, output, dtype=dtype, model_class=model_class)
    return result, path
