"""Judge the toy checkpoints through the same pools and selection rules as search, so the toy numbers mean the same.

On `eval.n_per_level` held-out problems per level (`eval.split`: toy:test, or `val`, held-out toy:train problems for
choosing hyperparameters; `eval_problems`): greedy, one sample at the eval temperature, majority@N, PRM
best-of-N (by the last and by the lowest step score), PRM-weighted majority@N, pass@N; the PRM's step ROC AUC on
the held-out MC labels (hard labels, and the true step correctness); and the step-choice check: sampled next steps
of each right prefix, labelled by the checker, and the share of (right, wrong) pairs of one prefix that the PRM
(`step_choice_prm`) or the policy's log-likelihood (`step_choice_policy`) orders right: what beam search's pruning
needs, which the pooled AUC (mixing positions and problems) flatters. The policy pool is shut down before the PRM
pool starts: on a small machine the two do not fit at once. `eval.n: 0` judges greedy decoding only (no samples,
no PRM pool): the cheap check that many training seeds need.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from train.toy.config import ToyConfig, pool_config

Trajectory = tuple[str, list[str]]  # (question, steps): one PRM input


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


def _solve(client, prompt: str, seed: int, e) -> tuple[str, list[str]]:
    """A Ray task: the greedy answer and `e.n` samples of one problem."""
    from app.contracts import GenerationRequest

    requests = [GenerationRequest(prompt, n=1, max_tokens=e.max_tokens, temperature=0.0)]
    if e.n:
        requests.append(GenerationRequest(prompt, n=e.n, max_tokens=e.max_tokens, temperature=e.temperature, seed=seed))
    greedy, *samples = client.generate(requests)
    return greedy[0].text, [c.text for c in samples[0]] if samples else []


def _next_steps(client, prompts: list[str], seed: int, e) -> list[list[tuple[str, float | None]]]:
    """A Ray task: distinct sampled next steps of each prefix, with the policy's log-likelihood of each."""
    from app.contracts import GenerationRequest

    outs = client.generate([
        GenerationRequest(q, n=e.step_samples, max_tokens=e.max_tokens, temperature=e.temperature, stop=["\n\n"],
                          seed=seed + 1000 * k, logprobs=True)
        for k, q in enumerate(prompts)
    ])
    return [list({c.text: c.cumulative_logprob for c in cs if c.text.strip()}.items()) for cs in outs]


def _score(prm, question: str, trajectories: list[list[str]]) -> list[list[float]]:
    """A Ray task: one PRM call for all trajectories of one question (the PRM actor batches concurrent calls)."""
    return prm.score(question, trajectories)


def _sample(cfg: ToyConfig, models: Path, problems: list, step_problems: list[int], progress: bool):
    """Greedy + samples of every problem, and next steps of every right prefix of the step-choice problems."""
    import ray

    from actors.policy import start_policy_pool
    from app.fanout import windowed_map
    from app.pool_config import PoolConfig
    from app.toy.world import toy_prompt

    e = cfg.eval
    solve, next_steps = ray.remote(num_cpus=0)(_solve), ray.remote(num_cpus=0)(_next_steps)
    pool = start_policy_pool(pool_config(PoolConfig, str(models / "policy"), e.replicas, e.max_batch))
    client = pool.client()
    t0 = time.time()
    try:
        results = windowed_map(list(range(len(problems))), lambda i: solve.remote(
            client, toy_prompt(problems[i]), cfg.seed * 1_000_003 + i, e), e.max_in_flight,
            desc="eval: sampling", progress=progress)
        steps_out = windowed_map(step_problems, lambda i: next_steps.remote(
            client, [q for q, _ in _prefix_prompts(problems[i])], cfg.seed * 1_000_003 + 7 * i, e), e.max_in_flight,
            desc="eval: step choice", progress=progress)
    finally:
        pool.shutdown()
    return results, steps_out, time.time() - t0


def _prm_scores(cfg: ToyConfig, models: Path, items: list[Trajectory], progress: bool) -> list[list[float]]:
    """Per-step PRM scores of every (question, steps), from a PRM pool, one call per question."""
    import ray

    from actors.prm import start_prm_pool
    from app.fanout import windowed_map
    from app.pool_config import PRMPoolConfig

    e = cfg.eval
    by_question: dict[str, list[int]] = {}
    for k, (question, _) in enumerate(items):
        by_question.setdefault(question, []).append(k)
    questions = list(by_question)
    score = ray.remote(num_cpus=0)(_score)
    pool = start_prm_pool(pool_config(PRMPoolConfig, str(models / "prm"), e.replicas, e.max_batch, format="qwen"))
    prm = pool.client()
    try:
        outs = windowed_map(questions, lambda q: score.remote(prm, q, [items[k][1] for k in by_question[q]]),
                            e.max_in_flight, desc="eval: PRM", progress=progress)
    finally:
        pool.shutdown()
    flat: list[list[float]] = [[] for _ in items]
    for q, scores in zip(questions, outs):
        for k, s in zip(by_question[q], scores):
            flat[k] = list(s)
    return flat


def _problem_row(greedy: str, samples: list[str], scores: list[list[float]], gold: str) -> dict:
    """Which of the N-sample answers of one problem are right, chosen by app.search.select's rules."""
    from app.grading import extract_answer, grade
    from app.search.select import aggregate, answer_classes, select_majority, select_naive, select_weighted

    if not samples:
        return dict(greedy=grade(greedy, gold))
    n = len(samples)
    answers = [extract_answer(t) for t in samples]
    classes = answer_classes(answers)
    last = [aggregate(s or [0.0], "last") for s in scores]
    low = [aggregate(s or [0.0], "min") for s in scores]

    def voted(i: int | None) -> bool:
        return i is not None and grade(f"\\boxed{{{answers[i]}}}", gold)

    right = [grade(t, gold) for t in samples]
    return dict(greedy=grade(greedy, gold), sample=sum(right) / n, majority=voted(select_majority(classes, n)),
                prm_best=right[select_naive(last, n)], prm_best_min=right[select_naive(low, n)],
                prm_weighted=voted(select_weighted(classes, last, n)), pass_n=any(right))


def _r(x: float | None) -> float | None:
    return None if x is None or x != x else round(x, 4)


def eval_problems(cfg: ToyConfig) -> list:
    """The problems `evaluate` judges: the first `eval.n_per_level` of toy:test per level, or with `eval.split: val`
    those of toy:train after skipping `eval.val_offset` per level (disjoint from test by the split's hash, and from
    the recipes' training problems, which are the first <= 1000 per level of the same stream)."""
    from app.toy.world import toy_problems

    e = cfg.eval
    if e.split == "test":
        return toy_problems("test", e.n_per_level, levels=cfg.levels, seed=cfg.seed)
    out = []
    for level in cfg.levels:
        out += toy_problems("train", e.val_offset + e.n_per_level, levels=[level], seed=cfg.seed)[e.val_offset:]
    return out


def evaluate(cfg: ToyConfig, models: Path, progress: bool = True) -> dict:
    """The metrics per level ("1".."5") and over all ("all"), as `ponder toy eval --json` prints them."""
    from app.search.tree import split_steps
    from app.toy.checker import exact_step_labels
    from train.prm import auc
    from train.sft import read_jsonl

    e = cfg.eval
    for name in ("policy", "prm") if e.n else ("policy",):
        if not (models / name / "config.json").exists():
            raise FileNotFoundError(f"no toy {name} at {models / name}; run `ponder toy build` first")
    try:
        problems = eval_problems(cfg)
    except ValueError as err:  # a level with fewer distinct problems than split=val asks for
        from app.config import ConfigError

        raise ConfigError(f"eval: {err}; lower eval.val_offset or eval.n_per_level") from None
    step_problems = [i for level in cfg.levels  # the step-choice check needs the PRM: none when greedy only
                     for i in [j for j, p in enumerate(problems) if p.level == level][:e.step_problems_per_level]
                     ] if e.n else []
    results, steps_out, sample_s = _sample(cfg, models, problems, step_problems, progress)

    # step choice: each right prefix's sampled next steps, labelled by the checker, scored by the PRM and the policy
    choice_rows: list[tuple[int, int, float, int]] = []  # (level, prefix group, policy logprob, right)
    choice_items: list[Trajectory] = []
    groups = 0
    for i, per_prefix in zip(step_problems, steps_out):
        p = problems[i]
        for (_, pre), cands in zip(_prefix_prompts(p), per_prefix):
            for text, lp in cands:
                choice_rows.append((p.level, groups, float(lp or 0.0), exact_step_labels(p.question, pre + [text])[-1]))
                choice_items.append((p.question, pre + [text]))
            groups += 1
    held_path = models / "heldout_mc.jsonl"
    held = read_jsonl(held_path) if held_path.exists() and e.n else []
    sample_items = [(p.question, split_steps(t)) for p, (_, samples) in zip(problems, results) for t in samples]
    prm_items = sample_items + choice_items + [(r["question"], r["steps"]) for r in held]
    scores = _prm_scores(cfg, models, prm_items, progress) if prm_items else []
    sample_scores = scores[:len(sample_items)]
    choice_prm = [s[-1] for s in scores[len(sample_items):len(sample_items) + len(choice_items)]]
    held_scores = scores[len(sample_items) + len(choice_items):]

    by_level: dict[int, list[dict]] = {}
    at = 0
    for p, (greedy, samples) in zip(problems, results):
        by_level.setdefault(p.level, []).append(_problem_row(greedy, samples, sample_scores[at:at + len(samples)], p.answer))
        at += len(samples)

    def choice(level: int | None) -> dict:
        groups_prm: dict[int, list] = {}
        groups_pol: dict[int, list] = {}
        for (lv, g, lp, y), ps in zip(choice_rows, choice_prm):
            if level is None or lv == level:
                groups_prm.setdefault(g, []).append((ps, y))
                groups_pol.setdefault(g, []).append((lp, y))
        acc_prm, pairs = choice_accuracy(list(groups_prm.values()))
        acc_pol, _ = choice_accuracy(list(groups_pol.values()))
        return {"step_choice_prm": _r(acc_prm), "step_choice_policy": _r(acc_pol), "step_choice_pairs": pairs}

    n = e.n
    names = dict(greedy="greedy", sample=f"sample_t{e.temperature:g}", majority=f"majority@{n}",
                 prm_best=f"prm_best_of_{n}", prm_best_min=f"prm_min_best_of_{n}", prm_weighted=f"prm_weighted@{n}",
                 pass_n=f"pass@{n}") if n else dict(greedy="greedy")

    def table(items: list[dict], held_rows: list[int]) -> dict:
        d = {names[k]: round(sum(x[k] for x in items) / len(items), 4) for k in names} if items else {}
        d["problems"] = len(items)
        s = [v for j in held_rows for v in held_scores[j]]
        d["step_auc"] = _r(auc(s, [y for j in held_rows for y in held[j]["hard"]]))
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
    out["all"]["split"] = e.split
    return out


def eval_table(res: dict) -> str:
    """The metrics as a table, one row per level and "all"."""
    keys = [k for k in next(iter(res.values()))
            if k not in ("problems", "heldout_steps", "sampling_seconds", "step_choice_pairs")]
    lines = ["level  problems  " + "  ".join(f"{k:>14}" for k in keys)]
    for level, d in res.items():
        cells = "  ".join(f"{d.get(k):>14}" if d.get(k) is not None else f"{'-':>14}" for k in keys)
        lines.append(f"{level:>5}  {d['problems']:>8}  {cells}")
    return "\n".join(lines)
