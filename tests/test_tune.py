"""`ponder tune` / `ponder frontier`: recipe validation (one line naming file and key, before Ray starts), a small
sweep end to end through real Ray Tune, shared pools and the toy models (its output_dir relative, as the shipped
recipes give it), and a sweep killed midway that resumes without re-running a finished trial.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.config import ConfigError, load_config
from tests.job_helpers import lines, summary_of
from tune.sweep import SweepRecipe, budget_key

REPO = Path(__file__).resolve().parents[1]

POOLS = """policy: {engine: hf, model: toy:policy}
prm: {engine: hf, model: toy:prm, format: qwen}
"""


def write(tmp_path: Path, body: str, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("grid, key, words", [
    ("[]", "grid", "grid is empty"),
    ("[{method: best_of_nn, budgets: [4]}]", "grid.0.method", "unknown search method 'best_of_nn'"),
    ("[{method: beam_search, budgets: [4, 0]}]", "grid.0.budgets", "N must be >= 1"),
    ("[{method: beam_search, budgets: [-4]}]", "grid.0.budgets", "N must be >= 1"),
    ("[{method: beam_search, budgets: [4], search: {beamwidth: 2}}]", "grid.0", "unknown key 'search.beamwidth'"),
    ("[{method: beam_search, budgets: [4], params: {beam_widht: [2]}}]", "grid.0", "unknown key 'params.beam_widht'"),
    ("[{method: beam_search, budgets: [4], params: {beam_width: [3]}}]", "grid.0", "multiple of beam_width"),
    ("[{method: beam_search, budgets: [4], search: {n: 8}}]", "grid.0", "budget N"),
    ("[{method: best_of_n, budgets: [3, 8]}]", "grid.0", "3 is not one of them"),
    ("[{method: beam_search}]", "grid.0", "budgets: missing"),
    ("[{method: greedy, budgets: [4]}]", "grid.0", "fixed N of 1"),
    ("[{method: best_of_n, budgets: [4], sarch: {}}]", "grid.0.sarch", "unknown key"),
])
def test_recipe_typo_is_one_line_naming_file_and_key(tmp_path, grid, key, words):
    path = write(tmp_path, f"job: tune\ngrid: {grid}\n{POOLS}")
    with pytest.raises(ConfigError) as e:
        load_config(SweepRecipe, path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and f"'{key}'" in msg and words in msg, msg


def test_job_refuses_typo_and_placeholder_before_ray(tmp_path, capsys):
    import ray

    from jobs import tune as job

    was = ray.is_initialized()
    bad = write(tmp_path, f"job: tune\ngrid: [{{method: best_of_n, budgets: [0]}}]\n{POOLS}")
    assert job.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "grid.0.budgets" in err
    # the cluster recipes carry the <shared> placeholder: refused, naming the file and the key
    assert job.main(["--config", "llama-3.2-1b/sweep"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "llama-3.2-1b/sweep.yaml" in err and "output_dir" in err and "<shared>" in err
    # particle filtering's default `model` aggregation cannot read a Math-Shepherd PRM: refused, naming both keys
    bad = write(tmp_path, "job: tune\ngrid: [{method: particle_filter, budgets: [2]}]\n"
                + POOLS.replace("format: qwen", "format: math-shepherd"))
    assert job.main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "grid.0: search.agg_strategy: model" in err and "math-shepherd" in err
    assert ray.is_initialized() == was  # nothing started


def test_shipped_sweep_recipes_validate():
    from app.search.registry import METHODS

    for name in ("toy/sweep", "toy/sweep_quick", "llama-3.2-1b/sweep", "qwen2.5-math-1.5b/sweep"):
        r = load_config(SweepRecipe, name)
        assert r.trials(), name
    full = load_config(SweepRecipe, "toy/sweep")
    assert {e.method for e in full.grid} == set(METHODS)  # every registered method
    assert min(min(e.budgets) for e in full.grid) == 1 and max(max(e.budgets) for e in full.grid) == 64
    assert budget_key("rebase") == "width" and budget_key("mcts") == "num_sequence" and budget_key("greedy") is None


def test_subsampled_methods_run_once_at_the_largest_budget(tmp_path):
    path = write(tmp_path, "job: tune\ngrid:\n  - {method: best_of_n, budgets: [1, 2, 4, 8]}\n"
                           "  - {method: beam_search, budgets: [4, 8], params: {beam_width: [2, 4]}}\n" + POOLS)
    trials = load_config(SweepRecipe, path).trials()
    assert [(t.name, t.budgets) for t in trials] == [
        ("best_of_n-N8", (1, 2, 4, 8)),
        ("beam_search-beam_width=2-N4", (4,)), ("beam_search-beam_width=2-N8", (8,)),
        ("beam_search-beam_width=4-N4", (4,)), ("beam_search-beam_width=4-N8", (8,))]
    assert trials[1].strategy == "beam_search(beam_width=2)" and trials[1].search["n"] == 4


# ---------------------------------------------------------------- through real Ray Tune


def sweep_recipe(tmp_path: Path, out: Path, limit: int, grid: str, extra: str = "") -> Path:
    return write(tmp_path, f"""job: tune
data: {{source: toy:test, limit: {limit}, shuffle_seed: 0}}
prompt: {{template: toy}}
grid:
{grid}
{POOLS}output_dir: {out}
{extra}""", name=f"{out.name}.yaml")


GRID = """  - {method: best_of_n, budgets: [1, 2, 4], search: {max_tokens: 256}}
  - {method: beam_search, budgets: [2, 4], search: {beam_width: 2, max_tokens: 256, max_total_tokens: 256}}"""


@pytest.mark.slow
def test_sweep_end_to_end_through_tune(ray_cluster, tmp_path, capsys, monkeypatch):
    from jobs import frontier as frontier_job
    from jobs import tune as job

    monkeypatch.chdir(tmp_path)
    out = Path("sweep")  # relative, as the shipped recipes give it: Tune runs trials in other working directories
    recipe = sweep_recipe(tmp_path, out, 4, GRID, "max_concurrent_trials: 2\nmax_in_flight: 4\n")
    assert job.main(["--config", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "held out (nominal FLOPs)" in text and "held out (computed FLOPs)" in text
    trials = sorted(p.name for p in (out / "trials").iterdir())
    assert trials == ["beam_search-N2", "beam_search-N4", "best_of_n-N4"]  # best-of-N ran once, at N=4
    for name in trials:
        recs = lines(out / "trials" / name)
        assert len(recs) == 4 and len({r["id"] for r in recs}) == 4
        assert all(set(r["selection"]) == {"naive", "weighted", "maj"} for r in recs)
    # `ponder report` reads a trial as it reads a search run
    summary = summary_of(out / "trials" / "best_of_n-N4", capsys)
    assert summary["problems"] == 4 and summary["solved"] == 4 and set(summary["accuracy"]["weighted"]) == {"1", "2", "4"}
    # Tune's results: one report per N of the best-of-N trial, accuracy overall and per level, compute both ways
    results = [json.loads(x) for x in next((out / "tune" / "sweep").glob("best_of_n-N4*/result.json")).read_text().splitlines()]
    assert [r["N"] for r in results] == [1, 2, 4]
    assert {"accuracy", "accuracy_by_rule", "accuracy_by_level", "flops", "computed_flops", "generated_tokens",
            "prm_tokens", "seconds"} <= set(results[-1])
    # the frontier files
    data = json.loads((out / "frontier.json").read_text())
    assert data["baseline"] == "best_of_n weighted" and set(data["kinds"]) == {"nominal", "computed"}
    assert {p["N"] for p in data["points"]["all"] if p["strategy"] == "best_of_n weighted"} == {1, 2, 4}
    assert data["kinds"]["nominal"]["bins"]["all"]["compute_saving"] is not None and data["cv"]["folds"] > 0
    assert (out / "frontier.md").is_file() and (out / "frontier_nominal.png").stat().st_size > 10_000
    # `ponder frontier` again, with oracle bins
    assert frontier_job.main([str(out), "--bins", "oracle", "--oracle-bins", "2", "--json"]) == 0
    saving = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(saving["nominal"]) == {"all", "oracle 1", "oracle 2"}
    # run again: every trial finished, so nothing runs and no pool starts
    assert job.main(["--config", str(recipe)]) == 0
    assert "3 finished, 0 to run" in capsys.readouterr().out
    assert all(len(lines(out / "trials" / n)) == 4 for n in trials)


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(ray_cluster, tmp_path):
    from jobs import tune as job

    out = tmp_path / "killed"
    n_problems = 4
    grid = """  - {method: best_of_n, budgets: [2], search: {max_tokens: 256}}
  - {method: majority, budgets: [2], search: {max_tokens: 256}}
  - {method: beam_search, budgets: [2], search: {beam_width: 2, max_tokens: 256, max_total_tokens: 256}}"""
    recipe = sweep_recipe(tmp_path, out, n_problems, grid, "max_concurrent_trials: 1\nmax_in_flight: 1\nnum_cpus: 3\n")
    names = ["best_of_n-N2", "majority-N2", "beam_search-N2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.tune", "--config", str(recipe)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            counts = [len(lines(out / "trials" / n)) for n in names]
            if counts[0] == n_problems and counts[1] >= 1:  # one trial finished, the next one started
                break
            time.sleep(0.2)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the job, its local Ray cluster and its trials, at once
        proc.wait(timeout=60)
        log.close()
    before = {n: lines(out / "trials" / n) for n in names}
    finished = [n for n in names if len(before[n]) == n_problems]
    assert names[0] in finished and len(finished) < len(names)

    assert job.main(["--config", str(recipe)]) == 0  # restores the Tune experiment on this session's cluster
    for n in names:
        recs = lines(out / "trials" / n)
        ids = [r["id"] for r in recs]
        assert len(ids) == n_problems and len(set(ids)) == n_problems, (n, ids)  # every problem exactly once
        assert recs[:len(before[n])] == before[n] or {r["id"] for r in before[n]} <= set(ids)
        starts = [json.loads(x) for x in (out / "trials" / n / "runs.jsonl").read_text().splitlines()]
        if n in finished:
            # not run again: no new record, and any restart (Tune had not yet saved its end) found nothing to do
            assert len(recs) == len(before[n]) and all(s["to_solve"] == 0 for s in starts[1:]), (n, starts)
        else:
            # a half-done trial kept its problems: its restart solved only the rest
            assert starts[-1]["to_solve"] == n_problems - len(before[n]), (n, starts)
