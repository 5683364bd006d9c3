"""One problem through one search method: the per-problem results record (docs/design.md, "Contracts").

    record = solve_problem(problem, "beam_search", {"n": 16, "beam_width": 4}, policy, prm)

A record holds: id, question, gold answer, level; the method and its full config; every trajectory the method
returned (steps, per-step scores, finished flag, extracted answer, correctness); the chosen completion under each
selection rule (naive / weighted / maj) at every n = 1, 2, 4, ... N with its answer and correctness; and the compute
spent (prompt, generated and PRM tokens, FLOPs, wall seconds), from the handles' `Usage`, two ways: the plain keys
nominal (every prompt token of every call, every PRM token of every re-scored path: what the papers count), the
`computed_` keys what the engines really ran after their prefix caches (see `app.contracts.Usage`).

A method may run in parts (DVTS: one part per subtree, each its own Ray task): `solve_part` runs one part and
returns a plain dict; `record_from_parts` joins the parts (in part order) into the record. `solve_problem` is the
one-process path: all parts in one call. The problem's id keys the request seeds (`sampling.problem_key`: without
an id, the question text), so different problems draw different numbers and every part of one problem the same.

Answer extraction and grading come from app.grading (imported lazily); both can be injected.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from app.search.registry import get_method, method_config
from app.search.select import RULES, select_all
from app.search.tree import Trajectory

# nominal figures, then the computed ones (the same less what prefix caches served and copies the engine did not run)
COMPUTE_KEYS = ("prompt_tokens", "generated_tokens", "prm_tokens", "policy_flops", "prm_flops", "policy_calls", "prm_calls",
                "computed_prompt_tokens", "computed_generated_tokens", "computed_prm_tokens", "computed_policy_flops",
                "computed_prm_flops")


def _field(problem: Any, name: str, default: Any = None) -> Any:
    if isinstance(problem, dict):
        return problem.get(name, default)
    return getattr(problem, name, default)


def usage_of(handle: Any) -> dict[str, float]:
    u = getattr(handle, "usage", None) if handle is not None else None
    d = u.as_dict() if u is not None else {}
    return {k: d.get(k, 0) for k in COMPUTE_KEYS}


def usage_delta(before: dict, after: dict) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in COMPUTE_KEYS}


def parts_of(method: str, cfg: Any) -> list[int | None]:
    """The parts a method runs in: DVTS one per subtree, every other method one (None)."""
    if method == "dvts":
        return list(range(cfg.num_subtrees))
    return [None]


def solve_part(
    problem_prompt: str, question: str, method: str, cfg: Any, policy: Any, prm: Any, part: int | None = None,
    problem_id: str | None = None,
) -> dict:
    """Run one part of a method (the whole method when part is None); return its trajectories and compute.

    `problem_id` keys the request seeds (None: the question text keys them).
    """
    cfg = method_config(method, cfg)
    pu, ru = usage_of(policy), usage_of(prm)
    start = time.time()
    t0 = time.perf_counter()
    if part is None:
        trajs = get_method(method).solve(problem_prompt, question, policy, prm, cfg, problem_id=problem_id)
    elif method == "dvts":
        from app.search.dvts import solve_subtree

        trajs = solve_subtree(problem_prompt, question, policy, prm, cfg, part, problem_id=problem_id)
    else:
        raise ValueError(f"{method} does not run in parts")
    seconds = time.perf_counter() - t0
    p, r = usage_delta(pu, usage_of(policy)), usage_delta(ru, usage_of(prm))
    usage = {k: p[k] + r[k] for k in COMPUTE_KEYS}
    return {"part": part, "trajectories": [t.to_dict() for t in trajs], "usage": usage, "start": start, "seconds": seconds}


def record_from_parts(
    problem: Any,
    method: str,
    cfg: Any,
    parts: Sequence[dict],
    *,
    equivalent: Callable[[str, str], bool] | None = None,
    exact_grouping: bool = False,
    extract_fn: Callable[[str], str | None] | None = None,
    grade_fn: Callable[[str, str], bool] | None = None,
) -> dict:
    """Join the parts of one problem (in part order) into its results record: answers, grades, selection, compute."""
    cfg = method_config(method, cfg)
    if extract_fn is None or grade_fn is None:
        from app import grading  # lazy: math-verify

        extract_fn = extract_fn or grading.extract_answer
        grade_fn = grade_fn or grading.grade
    parts = sorted(parts, key=lambda p: -1 if p.get("part") is None else p["part"])
    trajs = [Trajectory.from_dict(t) for p in parts for t in p["trajectories"]]
    gold = _field(problem, "answer")
    for t in trajs:
        t.answer = extract_fn(t.text)
        t.correct = bool(grade_fn(t.text, gold)) if gold is not None else None
    answers = [t.answer for t in trajs]
    chosen = select_all(
        answers, [t.scores for t in trajs], cfg.selection_agg, N=cfg.budget, group_size=cfg.group_size,
        equivalent=equivalent, exact=exact_grouping,
    )
    if getattr(cfg, "drawn_answer", False) and trajs and chosen.get("naive"):
        chosen["naive"][max(chosen["naive"])] = 0  # final_selection: sample: the drawn particle, output first
    selection: dict[str, dict[str, dict]] = {}
    for rule in RULES:
        if rule not in chosen:
            continue
        selection[rule] = {
            str(n): {
                "index": i,
                "answer": None if i is None else answers[i],
                "correct": False if i is None else bool(trajs[i].correct),
            }
            for n, i in chosen[rule].items()
        }
    usage = {k: sum(p["usage"].get(k, 0) for p in parts) for k in COMPUTE_KEYS}
    usage["flops"] = usage["policy_flops"] + usage["prm_flops"]  # nominal
    usage["computed_flops"] = usage["computed_policy_flops"] + usage["computed_prm_flops"]
    if parts:
        usage["seconds"] = max(p["start"] + p["seconds"] for p in parts) - min(p["start"] for p in parts)
        usage["task_seconds"] = sum(p["seconds"] for p in parts)
    else:
        usage["seconds"] = usage["task_seconds"] = 0.0
    return {
        "id": _field(problem, "id"),
        "question": _field(problem, "question"),
        "gold": gold,
        "level": _field(problem, "level"),
        "method": method,
        "config": cfg.model_dump(mode="json"),
        "N": cfg.budget,
        "agg_strategy": cfg.selection_agg,
        "grouping": "exact" if exact_grouping else "equivalence",
        "trajectories": [t.to_dict() for t in trajs],
        "selection": selection,
        "compute": usage,
    }


def build_prompt_for(problem: Any, template: str = "plain", tokenizer: Any = None) -> str:
    from app.problems import build_prompt  # lazy: written beside this module

    return build_prompt(problem, tokenizer=tokenizer, template=template)


def solve_problem(
    problem: Any,
    method: str,
    method_cfg: Any,
    policy: Any,
    prm: Any = None,
    *,
    prompt: str | None = None,
    template: str = "plain",
    tokenizer: Any = None,
    equivalent: Callable[[str, str], bool] | None = None,
    exact_grouping: bool = False,
    extract_fn: Callable[[str], str | None] | None = None,
    grade_fn: Callable[[str, str], bool] | None = None,
) -> dict:
    """Solve one problem with one method in this process and return its results record."""
    cfg = method_config(method, method_cfg)
    if prompt is None:
        prompt = build_prompt_for(problem, template, tokenizer)
    pid = _field(problem, "id")
    part = solve_part(prompt, _field(problem, "question"), method, cfg, policy, prm, None,
                      problem_id=None if pid is None else str(pid))
    return record_from_parts(
        problem, method, cfg, [part], equivalent=equivalent, exact_grouping=exact_grouping,
        extract_fn=extract_fn, grade_fn=grade_fn,
    )
