"""Math-Shepherd MC labels on a scripted toy policy: soft = fraction of completions right, hard = any; resume."""
from __future__ import annotations

import json
import re

import pytest

from app.contracts import Completion, Usage
from app.search.tree import split_steps
from app.toy.checker import exact_step_labels, parse_expression
from app.toy.world import solve, toy_problems
from train.synthesize.mc_labels import MCLabelConfig, label_problem, read_done, run

K = 4
RIGHT_OF_K = 3  # an on-track prefix: 3 of 4 completions reach the answer


def _slip(solution: str) -> str:
    """The same solution with its last computation off by one (so the answer is wrong too)."""
    steps = solution.split("\n\n")
    m = re.match(r"(.*= )(\d+)\.$", steps[-2])
    wrong = int(m.group(2)) + 1
    steps[-2] = f"{m.group(1)}{wrong}."
    steps[-1] = f"The answer is \\boxed{{{wrong}}}."
    return "\n\n".join(steps)


class ScriptedToyPolicy:
    """Even samples solve the problem, odd ones slip on the last computation. A prefix that is still right is
    completed correctly by the first RIGHT_OF_K of its completions; a wrong prefix never recovers."""

    num_parameters = 1

    def __init__(self):
        self.usage = Usage()
        self.requests = 0

    def generate(self, requests):
        out = []
        for r in requests:
            self.requests += 1
            m = re.match(r"Question: (.*)\n\nAnswer:\n\n", r.prompt, re.S)
            question, prefix = m.group(1), r.prompt[m.end():]
            terms = parse_expression(question[len("What is "):-1])
            solution = "\n\n".join(solve(terms))
            if not prefix:
                texts = [solution if j % 2 == 0 else _slip(solution) for j in range(r.n)]
            else:
                steps = split_steps(prefix)
                ok = all(exact_step_labels(question, steps))
                last = steps[-1].strip()
                final = re.fullmatch(r"\d+ [+-] \d+ = (\d+)\.", last)
                if final:
                    rest = [f"The answer is \\boxed{{{final.group(1)}}}."]
                else:  # "... (a + b) ... = expression left."
                    rest = solve(parse_expression(last.rsplit(" = ", 1)[1].rstrip(".")))
                good = "\n\n".join(rest)
                texts = [good if ok and j < RIGHT_OF_K else "The answer is \\boxed{-1}." for j in range(r.n)]
            out.append([Completion(t, 10, len(t), "eos") for t in texts])
        return out


class ScriptedPool:
    def __init__(self):
        self.policy = ScriptedToyPolicy()

    def client(self):
        return self.policy

    def shutdown(self):
        pass


def _cfg(tmp_path, **kw):
    kw = {"samples": 2, "k": K, **kw}
    return MCLabelConfig(problems="toy:train", n_per_level=2, levels=[2, 4], output=str(tmp_path / "mc.jsonl"),
                         progress=False, **kw)


def test_labels_soft_is_fraction_hard_is_any(tmp_path):
    problem = toy_problems("train", n_per_level=1, levels=[4])[0]
    p = dict(id=problem.id, question=problem.question, answer=problem.answer, level=4)
    recs = label_problem(ScriptedToyPolicy(), p, _cfg(tmp_path))
    good, bad = recs
    assert good["correct"] and not bad["correct"]
    n = len(good["steps"])
    # every prefix before the answer is on track: 3/4; the answer step is graded directly
    assert good["soft"] == [RIGHT_OF_K / K] * (n - 1) + [1.0]
    assert good["hard"] == [1] * n
    # the slip is in the last computation: that prefix and the answer are wrong
    assert bad["soft"] == [RIGHT_OF_K / K] * (n - 2) + [0.0, 0.0]
    assert bad["hard"] == [1] * (n - 2) + [0, 0]
    assert bad["exact"] == [1] * (n - 2) + [0, 0]
    assert good["steps"][0].endswith("\n\n") and not good["steps"][-1].endswith("\n\n")
    assert "".join(good["steps"]) == "\n\n".join(solve(parse_expression(problem.question[8:-1])))


def test_k0_labels_with_the_checker_without_completions(tmp_path):
    problem = toy_problems("train", n_per_level=1, levels=[4])[0]
    p = dict(id=problem.id, question=problem.question, answer=problem.answer, level=4)
    policy = ScriptedToyPolicy()
    # 4 samples alternate right / slipped: two distinct trajectories, each kept once
    recs = label_problem(policy, p, _cfg(tmp_path, k=0, samples=4))
    assert policy.requests == 1  # the samples only: no completions of prefixes
    assert [r["sample"] for r in recs] == [0, 1] and all(r["n_samples"] == 2 for r in recs)
    good, bad = recs
    n = len(good["steps"])
    assert good["hard"] == good["exact"] == [1] * n and good["soft"] == [1.0] * n
    assert bad["hard"] == bad["exact"] == [1] * (n - 2) + [0, 0] and not bad["correct"]


def test_k0_needs_toy_problems(tmp_path):
    with pytest.raises(ValueError, match="k=0 .* needs toy:train or toy:test"):
        MCLabelConfig(problems="data/gsm8k.jsonl", k=0, output=str(tmp_path / "x.jsonl"))


def test_skip_after_zero_saves_completions(tmp_path):
    problem = toy_problems("train", n_per_level=1, levels=[5])[0]
    p = dict(id=problem.id, question=problem.question, answer=problem.answer, level=5)

    class Slipping(ScriptedToyPolicy):
        def generate(self, requests):
            out = super().generate(requests)
            if not requests[0].prompt.endswith("Answer:\n\n"):
                return out
            # the odd sample slips at its first step instead
            sol = out[0][0].text.split("\n\n")
            m = re.match(r"(.* = )(\d+)(.*)$", sol[0])
            sol[0] = f"{m.group(1)}{int(m.group(2)) + 1}{m.group(3)}"
            out[0][1] = Completion("\n\n".join(sol), 10, 10, "eos")
            return out

    full, fast = Slipping(), Slipping()
    a = label_problem(full, p, _cfg(tmp_path))
    b = label_problem(fast, p, _cfg(tmp_path, skip_after_zero=True))
    assert [r["soft"] for r in a] == [r["soft"] for r in b]
    assert b[1]["soft"][0] == 0.0
    assert fast.requests < full.requests


def test_run_writes_and_resumes(ray_cluster, tmp_path, pickled_by_value):
    cfg = _cfg(tmp_path)
    stats = run(cfg, pool=ScriptedPool())
    assert stats["problems"] == 4 and stats["skipped"] == 0 and stats["trajectories"] == 8
    out = tmp_path / "mc.jsonl"
    lines = out.read_text().splitlines()
    assert len(lines) == 8
    recs = [json.loads(x) for x in lines]
    assert {r["level"] for r in recs} == {2, 4}
    assert all(r["hard"] == [int(p > 0) for p in r["soft"]] for r in recs)

    # finished problems are skipped
    again = run(cfg, pool=ScriptedPool())
    assert again["problems"] == 0 and again["skipped"] == 4
    assert out.read_text().splitlines() == lines

    # a killed run: the last problem lost its second record and half of its first line's successor
    out.write_text("\n".join(lines[:7]) + "\n" + lines[7][:20])
    assert len(read_done(out)) == 3
    assert len(out.read_text().splitlines()) == 6  # the incomplete problem's record was dropped too
    redo = run(cfg, pool=ScriptedPool())
    assert redo["problems"] == 1 and redo["skipped"] == 3
    final = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted((r["problem_id"], r["sample"]) for r in final) == sorted((r["problem_id"], r["sample"]) for r in recs)


def test_defaults_are_the_published_ones_and_the_toy_world_keeps_its_own(tmp_path, monkeypatch):
    """MCLabelConfig defaults to RLHFlow's re-run of Math-Shepherd (15 solutions per problem, 16 completions per
    step, temperature 0.7); the toy world's recipe names its smaller values itself, and the build passes them."""
    from types import SimpleNamespace

    import actors.policy
    import train.sft
    import train.synthesize.mc_labels as mc
    from app.config import read_recipe
    from train.toy.build import build
    from train.toy.config import load

    c = MCLabelConfig()
    assert (c.samples, c.k, c.temperature, c.top_p) == (15, 16, 0.7, 1.0)
    raw, _ = read_recipe("toy/world")
    assert (raw["mc"]["samples"], raw["mc"]["k"], raw["mc"]["temperature"]) == (4, 8, 0.7)  # explicit in the recipe
    toy = load(None, [f"work_dir={tmp_path}"], quick=False)

    # the build's MC-label step gets the recipe's values, not MCLabelConfig's defaults
    class Stop(Exception):
        pass

    seen = []

    def run_mc(cfg, pool):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(train.sft, "train", lambda cfg: (SimpleNamespace(metrics={}), tmp_path / "policy"))
    monkeypatch.setattr(actors.policy, "start_policy_pool", lambda cfg: SimpleNamespace(shutdown=lambda: None))
    monkeypatch.setattr(mc, "run", run_mc)
    with pytest.raises(Stop):
        build(toy, tmp_path / "out")
    [got] = seen
    assert (got.samples, got.k, got.temperature) == (toy.mc.samples, toy.mc.k, toy.mc.temperature) == (4, 8, 0.7)
