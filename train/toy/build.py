"""Make the toy world's checkpoints from a recipe: SFT policy -> MC step labels -> PRM, resumable stage by stage.

The SFT policy samples trajectories whose step prefixes are labelled by Monte-Carlo completions (through a policy
pool); with `prm.data: exact` (the shipped world) many more samples are labelled by the toy checker instead (the
k -> infinity limit of the hard MC labels, at the cost of sampling alone) and the MC labels stay the PRM's
held-out yardstick. Each stage's run is named by a hash of the settings it depends on, so a changed MC or PRM
setting reuses the finished policy and a killed build resumes its stage. Writes `policy/`, `prm/`,
`heldout_mc.jsonl` (eval's step AUC) and `build.json` into the output folder.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from train.toy.config import ToyConfig, pool_config


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def build(cfg: ToyConfig, out: Path) -> dict:
    from actors.policy import start_policy_pool
    from app.pool_config import PoolConfig
    from train.prm import PRMTrainConfig
    from train.prm import train as train_prm
    from train.sft import SFTConfig, ToyData, read_jsonl
    from train.sft import train as train_sft
    from train.synthesize.mc_labels import MCLabelConfig, run as run_mc, summarize

    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    base = {"seed": cfg.seed, "levels": cfg.levels}
    sft_tag = _hash({**base, "sft": cfg.sft.model_dump(mode="json")})
    mc_tag = _hash({"sft": sft_tag, "mc": cfg.mc.model_dump(mode="json")})
    exact_tag = _hash({"sft": sft_tag, "exact": cfg.exact.model_dump(mode="json"), "offset": cfg.mc.n_per_level})
    data_tag = mc_tag if cfg.prm.data == "mc" else _hash({"mc": mc_tag, "exact": exact_tag})
    tag = _hash({"mc": data_tag, "prm": cfg.prm.model_dump(mode="json")})
    times: dict[str, float] = {}
    summary: dict = {"runs": {"sft": sft_tag, "mc": mc_tag, "prm": tag}}
    t_all = time.time()

    # 1-2. data + SFT
    t0 = time.time()
    s = cfg.sft
    sft_train = s.train.model_copy(update=dict(name=f"toy-sft-{sft_tag}", storage_path=str(work / "ray"), seed=cfg.seed))
    sft_cfg = SFTConfig(model=f"new:toy-{s.size}", data="toy:train",
                        toy=ToyData(n_per_level=s.n_per_level, levels=s.levels, orders_per_problem=s.orders_per_problem,
                                    level_weights=s.level_weights, seed=cfg.seed),
                        max_length=s.max_length, output=str(out / "policy"), train=sft_train)
    result, policy = train_sft(sft_cfg)
    times["sft"] = time.time() - t0
    summary["sft"] = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    print(f"[toy build] policy -> {policy} ({times['sft']:.0f} s)", flush=True)

    # 3-4. sample + MC labels (train problems for the PRM, test problems held out for eval's AUC)
    t0 = time.time()
    m = cfg.mc
    pool = start_policy_pool(pool_config(PoolConfig, str(policy), m.replicas, m.max_batch))
    try:
        common = dict(samples=m.samples, k=m.k, temperature=m.temperature, max_tokens=m.max_tokens,
                      skip_after_zero=m.skip_after_zero, max_in_flight=m.max_in_flight, seed=cfg.seed,
                      levels=cfg.levels)
        train_mc = work / f"mc_train-{mc_tag}.jsonl"
        held_mc = work / f"mc_heldout-{mc_tag}.jsonl"
        st1 = run_mc(MCLabelConfig(problems="toy:train", n_per_level=m.n_per_level, output=str(train_mc), **common), pool)
        st2 = run_mc(MCLabelConfig(problems="toy:test", n_per_level=m.heldout_per_level, output=str(held_mc), **common), pool)
        if cfg.prm.data == "exact":  # more problems (after the MC ones), many samples each, labelled by the checker
            x = cfg.exact
            prm_data = work / f"exact_train-{exact_tag}.jsonl"
            run_mc(MCLabelConfig(**{**common, "samples": x.samples, "k": 0, "temperature": x.temperature,
                                    "max_tokens": x.max_tokens},
                                 problems="toy:train", n_per_level=x.n_per_level, offset=m.n_per_level,
                                 output=str(prm_data)), pool)
        else:
            prm_data = train_mc
    finally:
        pool.shutdown()
    times["mc_labels"] = time.time() - t0
    summary["mc_train"] = summarize(read_jsonl(train_mc))
    summary["mc_heldout"] = summarize(read_jsonl(held_mc))
    if prm_data != train_mc:
        summary["exact_train"] = summarize(read_jsonl(prm_data))
    print(f"[toy build] MC labels: {st1['trajectories'] + st2['trajectories']} new trajectories; PRM data: {prm_data.name} "
          f"({times['mc_labels']:.0f} s)", flush=True)

    # 5. PRM
    t0 = time.time()
    p = cfg.prm
    prm_train = p.train.model_copy(update=dict(name=f"toy-prm-{tag}", storage_path=str(work / "ray"), seed=cfg.seed))
    prm_cfg = PRMTrainConfig(format="qwen", model=f"new:toy-{p.size}", init_from=str(policy) if p.init_from_policy else None,
                             extra_layers=p.extra_layers if p.init_from_policy else 0,
                             data=str(prm_data), eval_data=str(held_mc), labels=p.labels if p.data == "mc" else "hard",
                             token_labels=p.token_labels,
                             output=str(out / "prm"),
                             train=prm_train)
    result, prm = train_prm(prm_cfg)
    times["prm"] = time.time() - t0
    summary["prm"] = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    shutil.copyfile(held_mc, out / "heldout_mc.jsonl")
    times["total"] = time.time() - t_all
    summary["seconds"] = times
    summary["sizes_mb"] = {name: round(sum(f.stat().st_size for f in (out / name).iterdir()) / 2**20, 2)
                           for name in ("policy", "prm")}
    (out / "build.json").write_text(json.dumps({"config": cfg.model_dump(mode="json"), **summary}, indent=1, default=str) + "\n")
    return summary


def build_summary(summary: dict, out: Path) -> str:
    """What `ponder toy build` prints at the end: times, sizes, final losses, and the MC labels per level."""
    sec, sft, prm = summary["seconds"], summary.get("sft", {}), summary.get("prm", {})
    lines = [f"\ntoy world built into {out} in {sec['total']:.0f} s "
             f"(sft {sec['sft']:.0f} s, MC labels {sec['mc_labels']:.0f} s, prm {sec['prm']:.0f} s)",
             f"  policy: {summary['sizes_mb']['policy']} MB, final loss {sft.get('loss', float('nan')):.4f}, "
             f"{sft.get('global_step', '?')} steps",
             f"  prm:    {summary['sizes_mb']['prm']} MB, final loss {prm.get('loss', float('nan')):.4f}, "
             f"held-out step AUC {prm.get('eval_auc', float('nan')):.3f}",
             "  level  sampled-correct  positive steps (hard)   [MC training labels]"]
    for level, d in sorted(summary["mc_train"].items(), key=lambda kv: str(kv[0])):
        lines.append(f"  {level!s:>5}  {d['correct'] / max(d['trajectories'], 1):>15.2f}  "
                     f"{d['hard_pos'] / max(d['steps'], 1):>21.2f}")
    lines.append("run `python -m jobs.toy eval` for greedy / majority / PRM best-of-N per level")
    return "\n".join(lines)
