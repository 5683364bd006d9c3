"""The search job through Ray with scripted pools (no models): task window, DVTS subtree tasks, resume, report.

The pools are replaced by picklable stand-ins whose `client()` gives a scripted policy / PRM, so this runs the
real job loop (`ray.wait` window, per-problem and per-subtree tasks, shards, resume) in seconds.
"""
from __future__ import annotations

import functools
import json

import pytest

import jobs.search as job
from actors.pools import Pools
from jobs import report
from tests.scripted import ScriptedPolicy, ScriptedPool, ScriptedPRM


def world(state: str):
    depth = state.count("\n\n")
    if depth < 2:
        return [f"step{depth}-{k}\n\n" for k in range(3)]
    return [f"The answer is \\boxed{{{k}}}" for k in range(3)]


def world_prm(steps):
    return 0.2 + 0.2 * (sum(map(ord, "".join(steps))) % 4)


@pytest.fixture
def scripted_pools(monkeypatch):
    started = []

    def start_pools(policy_cfg, prm_cfg):
        started.append(1)
        policy = ScriptedPool(functools.partial(ScriptedPolicy, world, marker="Answer:\n\n"))
        prm = ScriptedPool(functools.partial(ScriptedPRM, world_prm))
        return Pools(policy, prm)

    monkeypatch.setattr(job, "start_pools", start_pools)
    monkeypatch.setattr(job, "pool_configs", lambda cfg: (None, None))
    return started


def write_recipe(tmp_path, method, search, n_problems=6):
    data = tmp_path / "problems.jsonl"
    with open(data, "w") as f:
        for i in range(n_problems):
            f.write(json.dumps({"id": f"q{i}", "question": f"What is {i} + 0?", "answer": str(i % 3), "level": 1 + i % 2}) + "\n")
    recipe = tmp_path / f"{method}.yaml"
    recipe.write_text(
        f"job: search\ndata: {{source: {data}}}\nprompt: {{template: toy}}\nmethod: {method}\nsearch: {json.dumps(search)}\n"
        f"prm: {{model: scripted}}\noutput_dir: {tmp_path / ('out-' + method)}\nmax_in_flight: 3\nprogress: false\n"
    )
    return recipe, tmp_path / ("out-" + method)


def lines(out_dir):
    """Every complete record line of every shard (duplicates included; a half-written line is no record)."""
    out = []
    for p in sorted(out_dir.glob("shard-*.jsonl")):
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def test_job_runs_resumes_and_reports(ray_cluster, tmp_path, scripted_pools, capsys):
    recipe, out = write_recipe(tmp_path, "best_of_n", {"n": 4})
    assert job.main(["--config", str(recipe)]) == 0
    recs = lines(out)
    assert sorted(r["id"] for r in recs) == [f"q{i}" for i in range(6)]
    assert all(set(r["selection"]) == {"naive", "weighted", "maj"} and set(r["selection"]["maj"]) == {"1", "2", "4"} for r in recs)
    text = capsys.readouterr().out
    assert "6 to solve" in text and "n=4" in text and "level 2" in text

    # "kill" it: drop the last two problems, leave a half-written line
    [shard] = sorted(out.glob("shard-*.jsonl"))
    kept = shard.read_text().splitlines()[:4]
    shard.write_text("\n".join(kept) + '\n{"id": "q9", "tra')
    assert job.main(["--config", str(recipe)]) == 0
    assert "4 already in" in capsys.readouterr().out
    recs = lines(out)
    assert len(recs) == 6 and len({r["id"] for r in recs}) == 6  # none twice
    # nothing left: the third run starts no pools
    n_started = len(scripted_pools)
    assert job.main(["--config", str(recipe)]) == 0
    assert len(scripted_pools) == n_started and len(lines(out)) == 6

    # the report prints the same table again
    capsys.readouterr()
    assert report.main([str(out)]) == 0
    assert "naive" in capsys.readouterr().out
    assert report.main([str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["problems"] == 6 and set(summary["accuracy"]["maj"]) == {"1", "2", "4"}

    # a different method config in the same directory is refused, not mixed in
    assert job.main(["--config", str(recipe), "search.n=8"]) == 2
    assert "differs" in capsys.readouterr().err


def test_job_runs_dvts_subtrees_as_tasks(ray_cluster, tmp_path, scripted_pools):
    recipe, out = write_recipe(tmp_path, "dvts", {"n": 4, "beam_width": 2}, n_problems=3)
    assert job.main(["--config", str(recipe)]) == 0
    recs = lines(out)
    assert len(recs) == 3
    for r in recs:
        assert [t["group"] for t in r["trajectories"]] == [0, 0, 1, 1]
        assert set(r["selection"]["naive"]) == {"2", "4"}
        assert r["compute"]["task_seconds"] >= 0 and r["compute"]["generated_tokens"] > 0


def test_config_errors_are_one_line(tmp_path, capsys):
    recipe, _ = write_recipe(tmp_path, "beam_search", {"n": 6, "beam_width": 4})
    assert job.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "multiple of beam_width" in err
    recipe, _ = write_recipe(tmp_path, "rebase", {"n": 16})
    assert job.main(["--config", str(recipe)]) == 2
    assert "unknown key 'search.n' for method rebase" in capsys.readouterr().err
    assert job.main(["--config", "toy/beam_search", "prm.format=toy-checker", f"data.source={recipe}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "prm.format: toy-checker judges toy questions only" in err


def test_bench_search_target_with_scripted_pools(ray_cluster, tmp_path, scripted_pools, monkeypatch, capsys):
    from app.pool_config import PoolConfig
    from jobs.bench import main as bench_main

    monkeypatch.setattr(job, "pool_configs", lambda cfg: (PoolConfig(model="toy:policy"), None))
    recipe, _ = write_recipe(tmp_path, "beam_search", {"n": 4, "beam_width": 2, "num_iterations": 5}, n_problems=4)
    assert bench_main(["search", "--config", str(recipe), "--problems", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["search_efficiency"] > 0 and figures["replica_scaling"] > 0
    assert len(scripted_pools) == 2  # one pool for 1 replica, one for 2


def test_search_config_defaults_and_method_sections():
    from app.config import load_config

    cfg = load_config(job.Config, None)
    assert cfg.method == "best_of_n" and cfg.search.n == 4 and cfg.search.needs_prm
    cfg = load_config(job.Config, "toy/dvts", ["search.n=32"])
    assert cfg.search.num_subtrees == 8 and cfg.prm.format == "qwen" and cfg.prompt.template == "toy"
    assert cfg.identity()["search"]["n"] == 32
    assert "limit" not in cfg.identity()["data"]  # a run may grow or be sharded into the same directory
    checker = load_config(job.Config, "toy/dvts", ["search.n=32", "prm.format=toy-checker"])
    assert checker.identity()["prm_model"] == "toy-checker" != cfg.identity()["prm_model"]
