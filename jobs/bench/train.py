"""`python -m jobs.bench train [--steps S] [--micro-batch B] [--skip-rl] [--skip-sync | --sync-only]
[--skip-ingest | --ingest-only] [--json]`: what
ponder's training costs.

train_overhead = seconds per optimizer step of ponder's DPO (Ray Train, 1 worker, DeepSpeed ZeRO-0, the shared
loop's own `step_s`) / seconds per optimizer step of TRL's `DPOTrainer` run in one plain process, on the same pairs,
model, batch size, beta and lr (both with the reference's log-probs computed once before training, as ponder
does: `precompute_ref_log_probs=True`). Medians over the steps after the first two (warm-up). 1.0: Ray Train and
DeepSpeed add nothing per step.

rollout_share (LaTRO and PPO): the share of an optimizer step spent generating rollouts through the policy pool
(`train.latro.rollout_share` over the run's per-step rows), from short toy runs; `--skip-rl` leaves them out.

sync_s_per_gb: wall seconds per GB of weights pushed to a rollout pool by `train.rollouts.push_weights` (one update
session: object-store buckets of `--sync-bucket-mb`, every chunk to the replica, finish), for a random-weight
Llama of about `--sync-mb` MiB in float32 (the toy tokenizer, head size 64), on the `--sync-engine` (hf or vllm);
the median of 3 pushes after a warm-up push. CPU here: the figure for 7B over NCCL is derived in docs/design.md.

ingest_overhead: seconds per optimizer step of the toy SFT recipe (2 workers, ZeRO-2) fed through Ray Data from a
folder of Parquet shards (`train.ingest`) / the same with every worker reading the whole JSONL file (`train.ingest:
memory`), same records, seed and batches; medians after the first two steps. Beside it each run's whole `fit`
wall seconds (Ray Data's read, check, tokenisation and dealing of rows happen before the first step);
`--ingest-only` measures it alone, `--skip-ingest` leaves it out.

The pairs are the toy world's: chosen = a correct worked solution, rejected = the same solution with a wrong final
answer, so both trainers see identical tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each DPO run")
    parser.add_argument("--micro-batch", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--skip-rl", action="store_true", help="leave out the LaTRO and PPO rollout shares")
    parser.add_argument("--rl-steps", type=int, default=6, help="optimizer steps of the LaTRO and PPO runs")
    parser.add_argument("--sync-mb", type=float, default=256, help="size of the random model pushed (MiB)")
    parser.add_argument("--sync-bucket-mb", type=float, default=64, help="bucket size of the weight push (MiB)")
    parser.add_argument("--sync-engine", choices=("hf", "vllm"), default="hf", help="engine of the rollout pool")
    parser.add_argument("--skip-sync", action="store_true", help="leave out sync_s_per_gb")
    parser.add_argument("--sync-only", action="store_true", help="measure sync_s_per_gb alone")
    parser.add_argument("--ingest-steps", type=int, default=30, help="optimizer steps of each SFT ingest run")
    parser.add_argument("--skip-ingest", action="store_true", help="leave out ingest_overhead")
    parser.add_argument("--ingest-only", action="store_true", help="measure ingest_overhead alone")


def toy_pairs(n: int) -> list[dict]:
    """Whole-response pairs from toy worked solutions: the right one, and the same with its answer off by one."""
    from app.toy.world import sft_examples

    out = []
    for ex in sft_examples(max(1, n // 5 + 1), seed=7)[:n]:
        wrong = ex["completion"].rsplit(ex["answer"], 1)
        rejected = (wrong[0] + str(int(ex["answer"]) + 1) + wrong[1]) if len(wrong) == 2 else ex["completion"] + "1"
        out.append(dict(prompt=ex["prompt"], chosen=ex["completion"], rejected=rejected, kind="outcome"))
    return out


def middle(times: list[float]) -> float:
    return statistics.median(times[2:] or times)


def ponder_dpo(data: Path, steps: int, micro_batch: int, work: Path) -> list[float]:
    """Per-step seconds of ponder's DPO on Ray Train, 1 worker, ZeRO-0 (the loop's `step_s` rows)."""
    from train.dpo import DPOConfig, train
    from train.loop import TrainConfig

    cfg = DPOConfig(job="dpo", model="toy:policy", data=str(data), kinds=["outcome"], beta=0.1,
                    train=TrainConfig(name="bench-dpo", storage_path=str(work / "ray"), num_workers=1, zero_stage=0,
                                      micro_batch_size=micro_batch, lr=1e-5, warmup_steps=0, epochs=1,
                                      max_steps=steps, checkpoint_every_steps=None))
    result, _ = train(cfg)
    rows = _metrics(result.checkpoint)
    return [r["step_s"] for r in rows if "step_s" in r]


def _metrics(checkpoint) -> list[dict]:
    with checkpoint.as_directory() as d:
        path = Path(d) / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def trl_dpo(pairs: list[dict], steps: int, micro_batch: int, work: Path) -> list[float]:
    """Per-step seconds of TRL's DPOTrainer in this process (CPU), the same pairs and hyperparameters."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from actors.engines.base import load_tokenizer
    from app.toy import resolve_model

    path = resolve_model("toy:policy")
    tok = load_tokenizer(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=micro_batch, max_steps=steps,
                     learning_rate=1e-5, beta=0.1, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                     logging_steps=steps, use_cpu=True, precompute_ref_log_probs=True, dataloader_num_workers=0,
                     max_length=512)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                         callbacks=[Clock()])
    trainer.train()
    return times


def rl_share(job: str, steps: int, work: Path) -> float:
    """rollout_share of a short toy LaTRO or PPO run (1 worker)."""
    from app.config import load_config
    from jobs.train import config_class, trainer_module

    cls = config_class(job)
    cfg = load_config(cls, f"toy/{job}", [f"train.name=bench-{job}", f"train.storage_path={work / 'ray'}",
                                          "train.num_workers=1", f"train.max_steps={steps}",
                                          "train.checkpoint_every_steps=null", "output=null"])
    result, _ = trainer_module(job).train(cfg)
    from train.latro import rollout_share

    return rollout_share(_metrics(result.checkpoint), getattr(cfg.train, "grad_accum", 1))


def random_model(folder: Path, mib: float) -> Path:
    """A random-weight Llama (8 layers, head size 64, the toy tokenizer) of about `mib` MiB in float32."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from app.toy import resolve_model

    toy = Path(resolve_model("toy:policy"))
    vocab = LlamaConfig.from_pretrained(toy).vocab_size
    hidden = max(64, int((mib * 2**20 / 4 / 8 / 11) ** 0.5) // 64 * 64)  # 8 x (4 + 3 x 2.75) hidden^2 parameters
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 64 * 64,
                      num_hidden_layers=8, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      head_dim=64, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=3,
                      eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(toy / name, folder / name)
    return folder


def sync_speed(args, work: Path) -> dict:
    """Seconds per GB of `push_weights` into a one-replica rollout pool (module docstring)."""
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    from app.pool_config import PoolConfig
    from train.rollouts import push_weights, start_rollout_pool

    path = random_model(work / "sync-model", args.sync_mb)
    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    gb = sum(v.numel() * v.element_size() for v in state.values()) / 1e9
    pool = start_rollout_pool(SimpleNamespace(rollout=PoolConfig(engine=args.sync_engine, dtype="float32"),
                                              model=str(path)), "bench-sync")
    try:
        times = []
        for version in range(4):  # the first is warm-up
            t0 = time.perf_counter()
            push_weights(pool, state, version, args.sync_bucket_mb)
            times.append(time.perf_counter() - t0)
    finally:
        pool.shutdown()
    s = statistics.median(times[1:])
    return dict(sync_s_per_gb=round(s / gb, 3), sync_gb=round(gb, 3), sync_s=round(s, 3),
                sync_engine=args.sync_engine, sync_bucket_mb=args.sync_bucket_mb)


def ingest_overhead(args, work: Path) -> tuple[list[dict], dict]:
    """Toy SFT through Ray Data (Parquet shards) and in memory (JSONL): per-step and whole-fit seconds."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.toy.world import sft_examples
    from train.loop import TrainConfig, fit
    from train.sft import SFTConfig, SFTTask, check

    per_step = 2 * args.micro_batch
    records = sft_examples(args.ingest_steps * per_step // 5 + 1, seed=11)[: args.ingest_steps * per_step]
    jsonl, folder = work / "sft.jsonl", work / "sft-parquet"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    folder.mkdir()
    table = pa.Table.from_pylist(records)
    for i in range(4):
        pq.write_table(table.slice(i * len(records) // 4, len(records) // 4 + 1), folder / f"part-{i}.parquet")
    rows, figures = [], {}
    for label, data in (("memory", jsonl), ("ray_data", folder)):
        cfg = SFTConfig(model="toy:policy", data=str(data), train=TrainConfig(
            name=f"bench-ingest-{label}", storage_path=str(work / "ray"), num_workers=2, zero_stage=2,
            micro_batch_size=args.micro_batch, lr=1e-4, warmup_steps=0, epochs=1, max_steps=args.ingest_steps,
            ingest=label, progress=False))
        check(cfg)
        t0 = time.perf_counter()
        result = fit(SFTTask(cfg), cfg.train, desc=f"sft ({label})")
        wall = time.perf_counter() - t0
        if result.error:
            raise result.error
        steps = [r["step_s"] for r in _metrics(result.checkpoint) if "step_s" in r]
        rows.append(dict(run=f"toy SFT, {'Ray Data from Parquet shards' if label == 'ray_data' else 'whole JSONL in each worker'}",
                         steps=len(steps), s_per_step=round(middle(steps), 4), fit_wall_s=round(wall, 1)))
        figures[f"ingest_s_per_step_{label}"] = round(middle(steps), 4)
        figures[f"ingest_fit_wall_s_{label}"] = round(wall, 1)
    figures["ingest_overhead"] = round(figures["ingest_s_per_step_ray_data"] / figures["ingest_s_per_step_memory"], 3)
    figures["ingest_records"] = len(records)
    return rows, figures


def _sync_row(sync: dict) -> dict:
    return dict(run=f"weight push into a {sync['sync_engine']} rollout pool ({sync['sync_gb']} GB, "
                    f"{sync['sync_bucket_mb']:g} MiB buckets)", s_per_push=sync["sync_s"],
                sync_s_per_gb=sync["sync_s_per_gb"])


def run(args) -> tuple[list[dict], dict]:
    from jobs.common import init_ray

    init_ray()
    rows: list[dict] = []
    figures: dict = {}
    with tempfile.TemporaryDirectory(prefix="ponder-bench-train-") as tmp:
        work = Path(tmp)
        if args.sync_only:
            sync = sync_speed(args, work)
            rows.append(_sync_row(sync))
            return rows, dict(sync)
        if args.ingest_only:
            return ingest_overhead(args, work)
        pairs = toy_pairs(args.steps * args.micro_batch)
        data = work / "pairs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        t_trl = trl_dpo(pairs, args.steps, args.micro_batch, work)
        t_ponder = ponder_dpo(data, args.steps, args.micro_batch, work)
        a, b = middle(t_ponder), middle(t_trl)
        rows += [dict(run="ponder DPO (Ray Train, 1 worker, ZeRO-0)", steps=len(t_ponder), s_per_step=a),
                 dict(run="TRL DPOTrainer (one process)", steps=len(t_trl), s_per_step=b)]
        figures.update(train_overhead=round(a / b, 3), ponder_s_per_step=round(a, 4), trl_s_per_step=round(b, 4),
                       steps=args.steps, micro_batch=args.micro_batch)
        if not args.skip_sync:
            sync = sync_speed(args, work)
            rows.append(_sync_row(sync))
            figures.update(sync)
        if not args.skip_ingest:
            more, ingest = ingest_overhead(args, work)
            rows += more
            figures.update(ingest)
        if not args.skip_rl:
            for job in ("latro", "ppo"):
                share = rl_share(job, args.rl_steps, work)
                rows.append(dict(run=f"{job}: share of a step generating rollouts", steps=args.rl_steps,
                                 rollout_share=share))
                figures[f"rollout_share_{job}"] = round(share, 3)
    return rows, figures
