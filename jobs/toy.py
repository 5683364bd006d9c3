"""`ponder toy build` / `ponder toy eval`: make and judge the toy world's shipped checkpoints.

    python -m jobs.toy build [--config toy/world] [--quick] [--out DIR] [--force] [key=value ...]
    python -m jobs.toy eval  [--config toy/world] [--models DIR] [--json] [key=value ...]

build: generate data -> SFT the policy (Ray Train + DeepSpeed) -> sample it and label every step prefix by
Monte-Carlo completions (through a policy pool) -> with `prm.data: exact` (the shipped world), also sample many
more trajectories and label their steps with the toy checker (mc_labels with k=0: the k -> infinity limit of the
hard MC labels, at the cost of sampling alone) -> train the PRM on them (Ray Train + DeepSpeed, body started
from the policy; the MC labels stay its held-out yardstick) -> write `policy/` and `prm/` (safetensors with bfloat16 weights + config saying float32 +
tokenizer) and `heldout_mc.jsonl` (MC labels on test problems, for eval's step AUC) into the output folder,
then print a summary. Without --quick the output is the shipped location (`app/toy/checkpoints`); --quick
builds a smaller world into --out (default `runs/toy-quick/checkpoints`) and refuses to write into the shipped
location unless --force. Intermediate files and Ray Train checkpoints go to `work_dir`; a build that is killed
resumes where it stopped when run again with the same config (each stage is named by a hash of the settings it
depends on, so changing only the MC or PRM settings reuses the finished policy).

eval: on `eval.n_per_level` held-out problems per level: greedy accuracy, accuracy of one sample at the eval
temperature, majority@N, PRM best-of-N (by the last step's score, and by the lowest step score), PRM-weighted
majority@N, pass@N; the PRM's step-level ROC AUC on the held-out MC labels (against the hard labels; against
the true step correctness too); and the step-choice check: the policy continues each right prefix of a test
problem's solution with `step_samples` sampled steps, the checker labels them, and `step_choice_prm` is the share
of (right, wrong) pairs of one prefix that the PRM orders right (what beam search's pruning needs; the pooled
AUC mixes positions and problems and flatters it), beside `step_choice_policy`, the same with the policy's own
log-likelihood of the step as the score. --json prints one object (keys "1".."5" per level and "all") as the
last line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

from pydantic import Field

from app.config import Config as BaseConfig
from app.config import ConfigError, apply_overrides, build_config, dump_config, read_recipe
from jobs.common import init_ray, user_errors
from train.loop import TrainConfig

DEFAULT_RECIPE = "toy/world"


class ToySFT(BaseConfig):
    size: str = Field("tiny", description="app.toy.models size of the policy")
    n_per_level: int = 8000
    levels: list[int] = [1, 2, 3, 4, 5]
    orders_per_problem: int = 1
    level_weights: dict[int, float] = Field(default_factory=dict)
    max_length: int = 512
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="toy-sft", lr=3e-3, micro_batch_size=32))


class ToyMC(BaseConfig):
    n_per_level: int = 60
    heldout_per_level: int = 20
    samples: int = 4
    k: int = 8
    temperature: float = 0.7
    max_tokens: int = 320
    skip_after_zero: bool = False
    replicas: int = 2
    max_batch: int = 64
    max_in_flight: int = 8


class ToyExact(BaseConfig):
    """Trajectories labelled by the toy checker (mc_labels with k=0): the PRM's training data when prm.data=exact."""

    n_per_level: int = 200
    samples: int = 16
    temperature: float = 1.0
    max_tokens: int = 360


class ToyPRM(BaseConfig):
    data: str = Field("mc", pattern="^(mc|exact)$", description="mc: the MC-labelled trajectories; exact: the "
                      "exact-labelled samples of the `exact` section (hard labels)")
    labels: str = Field("soft", pattern="^(soft|hard)$", description="which MC labels (data=mc)")
    init_from_policy: bool = True
    extra_layers: int = Field(0, ge=0, description="with init_from_policy: identity-initialised layers on top")
    size: str = "tiny"
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(name="toy-prm", lr=1e-3, micro_batch_size=32))


class ToyEval(BaseConfig):
    n_per_level: int = 200
    n: int = Field(16, ge=1)
    temperature: float = 0.7
    max_tokens: int = 320
    replicas: int = 2
    max_batch: int = 64
    max_in_flight: int = 8
    step_problems_per_level: int = Field(40, ge=0, description="problems per level for the step-choice check "
                                         "(0: skip it)")
    step_samples: int = Field(6, ge=2, description="sampled next steps per right prefix in the step-choice check")


class ToyConfig(BaseConfig):
    """A `job: toy` recipe (configs/toy/world.yaml)."""

    job: str = Field("toy", pattern="^toy$")
    seed: int = 0
    work_dir: str = "runs/toy"
    out: str | None = Field(None, description="output folder (default: the shipped app/toy/checkpoints)")
    levels: list[int] = [1, 2, 3, 4, 5]
    sft: ToySFT = Field(default_factory=ToySFT)
    mc: ToyMC = Field(default_factory=ToyMC)
    exact: ToyExact = Field(default_factory=ToyExact)
    prm: ToyPRM = Field(default_factory=ToyPRM)
    eval: ToyEval = Field(default_factory=ToyEval)
    quick: dict = Field(default_factory=dict, description="dotted overrides applied by --quick")


Config = ToyConfig  # what `jobs.config` (`ponder config show`) validates a `job: toy` recipe with


def config_class(job: str):
    return ToyConfig


def load(recipe: str | None, overrides: Sequence[str], quick: bool) -> ToyConfig:
    data, path = read_recipe(recipe or DEFAULT_RECIPE)
    source = str(path)
    if quick:
        q = data.get("quick") or {}
        data = apply_overrides(data, [f"{k}={json.dumps(v)}" for k, v in q.items()])
        source += " + quick"
    data = apply_overrides(data, overrides)
    if overrides:
        source += f" + overrides {' '.join(overrides)}"
    return build_config(ToyConfig, data, source)


def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _pool(model: str, replicas: int, max_batch: int):
    from actors.policy import start_policy_pool
    from app.pool_config import PoolConfig

    return start_policy_pool(PoolConfig(engine="hf", model=model, replicas=replicas, num_cpus=1, max_batch=max_batch,
                                        gather_ms=20.0))


def build(cfg: ToyConfig, out: Path) -> dict:
    from train.prm import PRMTrainConfig
    from train.prm import train as train_prm
    from train.sft import SFTConfig, ToyData
    from train.sft import train as train_sft
    from train.synthesize.mc_labels import MCLabelConfig, run as run_mc, summarize

    work = Path(cfg.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    # Each stage's run is named by a hash of what it depends on, so a changed MC or PRM setting reuses the
    # finished SFT run (Ray Train returns its checkpoint at once) and a killed build resumes its stage.
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
    pool = _pool(str(policy), m.replicas, m.max_batch)
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
    from train.sft import read_jsonl

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


def print_build_summary(summary: dict, out: Path) -> None:
    print(f"\ntoy world built into {out} in {summary['seconds']['total']:.0f} s "
          f"(sft {summary['seconds']['sft']:.0f} s, MC labels {summary['seconds']['mc_labels']:.0f} s, "
          f"prm {summary['seconds']['prm']:.0f} s)")
    sft, prm = summary.get("sft", {}), summary.get("prm", {})
    print(f"  policy: {summary['sizes_mb']['policy']} MB, final loss {sft.get('loss', float('nan')):.4f}, "
          f"{sft.get('global_step', '?')} steps")
    print(f"  prm:    {summary['sizes_mb']['prm']} MB, final loss {prm.get('loss', float('nan')):.4f}, "
          f"held-out step AUC {prm.get('eval_auc', float('nan')):.3f}")
    print("  level  sampled-correct  positive steps (hard)   [MC training labels]")
    for level, d in sorted(summary["mc_train"].items(), key=lambda kv: str(kv[0])):
        print(f"  {level!s:>5}  {d['correct'] / max(d['trajectories'], 1):>15.2f}  {d['hard_pos'] / max(d['steps'], 1):>21.2f}")
    print("run `python -m jobs.toy eval` for greedy / majority / PRM best-of-N per level")


# --------------------------------------------------------------------------------------------------- eval


def _majority(answers: list[str | None]) -> str | None:
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def _weighted(answers: list[str | None], scores: list[float]) -> str | None:
    tot: dict[str, float] = {}
    for a, s in zip(answers, scores):
        if a is not None:
            tot[a] = tot.get(a, 0.0) + s
    return max(tot, key=tot.get) if tot else None


def choice_accuracy(groups: Sequence[Sequence[tuple[float, int]]]) -> tuple[float | None, int]:
    """Share of (right, wrong) pairs within a group that the score orders right (ties count half), and the number
    of pairs; None when no group holds both."""
    pairs, good = 0, 0.0
    for g in groups:
        for s_right, y_right in g:
            if not y_right:
                continue
            for s_wrong, y_wrong in g:
                if not y_wrong:
                    pairs += 1
                    good += 1.0 if s_right > s_wrong else 0.5 if s_right == s_wrong else 0.0
    return (good / pairs if pairs else None), pairs


def _prefix_prompts(problem) -> list[tuple[str, list[str]]]:
    """(prompt, right steps so far) for every right prefix of the problem's solution, the empty one included."""
    from app.search.tree import split_steps
    from app.toy.world import toy_prompt

    steps = split_steps(problem.solution)
    return [(toy_prompt(problem) + "".join(steps[:k]), steps[:k]) for k in range(len(steps))]


def evaluate(cfg: ToyConfig, models: Path, progress: bool = True) -> dict:
    import ray
    from tqdm import tqdm

    from app.contracts import GenerationRequest
    from actors.prm import HFPRMEngine, load_tokenizer, make_format
    from app.grading import extract_answer
    from app.search.tree import split_steps
    from app.toy.checker import exact_step_labels
    from app.toy.world import toy_problems, toy_prompt
    from train.prm import auc
    from train.sft import read_jsonl
    from train.synthesize.mc_labels import is_correct

    e = cfg.eval
    for name in ("policy", "prm"):
        if not (models / name / "config.json").exists():
            raise FileNotFoundError(f"no toy {name} at {models / name}; run `ponder toy build` first")
    problems = toy_problems("test", e.n_per_level, levels=cfg.levels, seed=cfg.seed)
    pool = _pool(str(models / "policy"), e.replicas, e.max_batch)
    client = pool.client()

    @ray.remote(num_cpus=0)
    def solve(client, prompt: str, seed: int):
        greedy, samples = client.generate([
            GenerationRequest(prompt, n=1, max_tokens=e.max_tokens, temperature=0.0),
            GenerationRequest(prompt, n=e.n, max_tokens=e.max_tokens, temperature=e.temperature, seed=seed),
        ])
        return greedy[0].text, [c.text for c in samples]

    @ray.remote(num_cpus=0)
    def next_steps(client, prompts: list[str], seed: int):
        """Distinct sampled next steps of each prefix, with the policy's log-likelihood of each."""
        outs = client.generate([
            GenerationRequest(q, n=e.step_samples, max_tokens=e.max_tokens, temperature=e.temperature, stop=["\n\n"],
                              seed=seed + 1000 * k, logprobs=True)
            for k, q in enumerate(prompts)
        ])
        return [list({c.text: c.cumulative_logprob for c in cs if c.text.strip()}.items()) for cs in outs]

    step_problems = [i for level in cfg.levels
                     for i in [j for j, p in enumerate(problems) if p.level == level][:e.step_problems_per_level]]

    def windowed(submit, items: list, desc: str) -> list:
        """submit(item) -> ObjectRef for every item, at most `max_in_flight` at once; results in item order."""
        out: list = [None] * len(items)
        pending: dict = {}
        todo = list(enumerate(items))
        bar = tqdm(total=len(items), desc=desc, disable=not progress, dynamic_ncols=True, mininterval=2.0)
        while todo or pending:
            while todo and len(pending) < e.max_in_flight:
                j, item = todo.pop(0)
                pending[submit(item)] = j
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                out[pending.pop(ref)] = ray.get(ref)
                bar.update(1)
        bar.close()
        return out

    t0 = time.time()
    try:
        results = windowed(lambda i: solve.remote(client, toy_prompt(problems[i]), cfg.seed * 1_000_003 + i),
                           list(range(len(problems))), "eval: sampling")
        steps_out = windowed(lambda i: next_steps.remote(client, [q for q, _ in _prefix_prompts(problems[i])],
                                                         cfg.seed * 1_000_003 + 7 * i),
                             step_problems, "eval: step choice")
    finally:
        pool.shutdown()
    sample_s = time.time() - t0

    # PRM scores of every sample, and of the held-out MC-labelled trajectories
    prm_path = str(models / "prm")
    fmt = make_format("qwen", load_tokenizer(prm_path))
    engine = HFPRMEngine(prm_path, fmt)
    trajs = [(i, split_steps(t)) for i in range(len(problems)) for t in results[i][1]]
    enc = [fmt.encode(problems[i].question, steps) for i, steps in trajs]
    scores = []
    for lo in tqdm(range(0, len(enc), 256), desc="eval: PRM", disable=not progress, dynamic_ncols=True, mininterval=2.0):
        scores += engine.score(enc[lo:lo + 256])
    per_problem: dict[int, list[list[float]]] = {}
    for (i, _), s in zip(trajs, scores):
        per_problem.setdefault(i, []).append(s or [0.0])

    rows: dict[str, dict] = {}
    by_level: dict[int, list[dict]] = {}
    for i, p in enumerate(problems):
        greedy, samples = results[i]
        answers = [extract_answer(t) for t in samples]
        last = [s[-1] for s in per_problem[i]]
        low = [min(s) for s in per_problem[i]]
        maj = _majority(answers)
        wmaj = _weighted(answers, last)
        by_level.setdefault(p.level, []).append(dict(
            greedy=is_correct(greedy, p.answer),
            sample=sum(is_correct(t, p.answer) for t in samples) / len(samples),
            majority=maj is not None and is_correct(f"\\boxed{{{maj}}}", p.answer),
            prm_best=is_correct(samples[max(range(len(samples)), key=lambda j: last[j])], p.answer),
            prm_best_min=is_correct(samples[max(range(len(samples)), key=lambda j: low[j])], p.answer),
            prm_weighted=wmaj is not None and is_correct(f"\\boxed{{{wmaj}}}", p.answer),
            pass_n=any(is_correct(t, p.answer) for t in samples),
        ))

    # step choice: each right prefix's sampled next steps, labelled by the checker, scored by the PRM and the policy
    choice_rows: list[tuple[int, int, str, float, int]] = []  # (level, prefix group, step, policy logprob, right)
    groups: list[tuple[str, list[str]]] = []  # (question, right steps so far) of each prefix group
    for i, per_prefix in zip(step_problems, steps_out):
        p = problems[i]
        for (_, pre), cands in zip(_prefix_prompts(p), per_prefix):
            groups.append((p.question, pre))
            for text, lp in cands:
                choice_rows.append((p.level, len(groups) - 1, text, float(lp or 0.0),
                                    exact_step_labels(p.question, pre + [text])[-1]))
    choice_enc = [fmt.encode(groups[g][0], groups[g][1] + [text]) for _, g, text, _, _ in choice_rows]
    choice_prm: list[float] = []
    for lo in range(0, len(choice_enc), 256):
        choice_prm += [s[-1] for s in engine.score(choice_enc[lo:lo + 256])]

    def choice(level: int | None) -> dict:
        groups_prm: dict[int, list] = {}
        groups_pol: dict[int, list] = {}
        for (lv, g, _, lp, y), ps in zip(choice_rows, choice_prm):
            if level is None or lv == level:
                groups_prm.setdefault(g, []).append((ps, y))
                groups_pol.setdefault(g, []).append((lp, y))
        acc_prm, pairs = choice_accuracy(list(groups_prm.values()))
        acc_pol, _ = choice_accuracy(list(groups_pol.values()))
        return {"step_choice_prm": _r(acc_prm), "step_choice_policy": _r(acc_pol), "step_choice_pairs": pairs}

    held_path = models / "heldout_mc.jsonl"
    held = read_jsonl(held_path) if held_path.exists() else []
    held_enc = [fmt.encode(r["question"], r["steps"]) for r in held]
    held_scores = []
    for lo in range(0, len(held_enc), 256):
        held_scores += engine.score(held_enc[lo:lo + 256])

    n = e.n
    names = dict(greedy="greedy", sample=f"sample_t{e.temperature:g}", majority=f"majority@{n}",
                 prm_best=f"prm_best_of_{n}", prm_best_min=f"prm_min_best_of_{n}", prm_weighted=f"prm_weighted@{n}",
                 pass_n=f"pass@{n}")

    def table(items: list[dict], held_rows: list[int]) -> dict:
        d = {names[k]: round(sum(x[k] for x in items) / len(items), 4) for k in names} if items else {}
        d["problems"] = len(items)
        s = [v for j in held_rows for v in held_scores[j]]
        hard = [y for j in held_rows for y in held[j]["hard"]]
        d["step_auc"] = _r(auc(s, hard))
        if held_rows and "exact" in held[held_rows[0]]:
            d["step_auc_exact"] = _r(auc(s, [y for j in held_rows for y in held[j]["exact"]]))
        d["heldout_steps"] = len(s)
        return d

    out: dict = {}
    for level in sorted(by_level):
        out[str(level)] = table(by_level[level], [j for j, r in enumerate(held) if r.get("level") == level])
        out[str(level)].update(choice(level))
    out["all"] = table([x for v in by_level.values() for x in v], list(range(len(held))))
    out["all"].update(choice(None))
    out["all"]["sampling_seconds"] = round(sample_s, 1)
    return out


def _r(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 4)


def print_eval(res: dict) -> None:
    keys = [k for k in next(iter(res.values()))
            if k not in ("problems", "heldout_steps", "sampling_seconds", "step_choice_pairs")]
    print("level  problems  " + "  ".join(f"{k:>14}" for k in keys))
    for level, d in res.items():
        cells = "  ".join(f"{d.get(k):>14}" if d.get(k) is not None else f"{'-':>14}" for k in keys)
        print(f"{level:>5}  {d['problems']:>8}  {cells}")


# ---------------------------------------------------------------------------------------------------- CLI


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ponder toy", description="build or evaluate the toy world")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="generate data, train the policy and the PRM, write the checkpoints")
    b.add_argument("--config", "-c", default=None, help=f"recipe (default {DEFAULT_RECIPE})")
    b.add_argument("--quick", action="store_true", help="a smaller world in a few minutes (into --out)")
    b.add_argument("--out", default=None, help="output folder (default: the shipped checkpoints; --quick: runs/toy-quick/checkpoints)")
    b.add_argument("--force", action="store_true", help="allow --quick to overwrite the shipped checkpoints")
    b.add_argument("overrides", nargs="*")
    ev = sub.add_parser("eval", help="greedy / majority / PRM best-of-N per level, and the PRM's step AUC")
    ev.add_argument("--config", "-c", default=None, help=f"recipe (default {DEFAULT_RECIPE})")
    ev.add_argument("--models", default=None, help="folder with policy/ and prm/ (default: the shipped checkpoints)")
    ev.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    ev.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from app.toy import CHECKPOINTS

    if args.cmd == "build":
        cfg = load(args.config, args.overrides, args.quick)
        if args.out:
            out = Path(args.out)
        elif cfg.out:
            out = Path(cfg.out)
        else:
            out = Path("runs/toy-quick/checkpoints") if args.quick else CHECKPOINTS
        out = out.resolve()
        if args.quick and out == CHECKPOINTS.resolve() and not args.force:
            raise ConfigError(f"--quick would overwrite the shipped checkpoints in {out}; give --out DIR (or --force)")
        print(f"[toy build] {'quick ' if args.quick else ''}world into {out}\n" + dump_config(cfg), flush=True)
        init_ray()
        summary = build(cfg, out)
        print_build_summary(summary, out)
        return 0

    cfg = load(args.config, args.overrides, quick=False)
    models = Path(args.models).resolve() if args.models else CHECKPOINTS
    init_ray()
    res = evaluate(cfg, models, progress=not args.json)
    print_eval(res)
    if args.json:
        print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
