"""The search job through Ray with scripted pools (no models): task window, DVTS subtree tasks, resume, report.

The pools are replaced by picklable stand-ins whose `client()` gives a scripted policy / PRM, so this runs the
real job loop (`ray.wait` window, per-problem and per-subtree tasks, shards, resume) in seconds.
"""
from __future__ import annotations

import functools
import json

import pytest
import yaml

import jobs.search as job
from actors.pools import Pools
from app.config import build_config
from app.search.recipe import SearchRecipe
from jobs import report
from tests.job_helpers import lines, summary_of
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
    summary = summary_of(out, capsys)
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
        c = r["compute"]
        # 2 subtrees x 3 depths x M = 2 candidates: steps of 1 word at depths 0 and 1, a 4-word answer at depth 2;
        # each prompt is the 7-word question prompt plus the path so far; the PRM reads the 5-word question and
        # each candidate's path (scripted.py counts words as tokens)
        assert c["generated_tokens"] == 2 * 2 * (1 + 1 + 4)
        assert c["prompt_tokens"] == 2 * (7 + 8 + 9)
        assert c["prm_tokens"] == 2 * 2 * ((5 + 1) + (5 + 2) + (5 + 2 + 4))
        assert c["policy_calls"] == c["prm_calls"] == 2 * 3
        assert c["policy_flops"] == 2 * ScriptedPolicy.num_parameters * (c["prompt_tokens"] + c["generated_tokens"])
        assert c["prm_flops"] == 2 * ScriptedPRM.num_parameters * c["prm_tokens"]
        assert c["flops"] == c["policy_flops"] + c["prm_flops"]
        # the subtrees' own seconds add up to task_seconds; each lies inside the problem's wall-clock span
        assert c["task_seconds"] <= 2 * c["seconds"] + 1e-3, c


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


def test_model_aggregation_with_a_math_shepherd_prm_is_refused_before_ray(tmp_path, capsys, monkeypatch):
    """agg_strategy `model` hands the PRM one step holding blank lines, which Math-Shepherd's layout tags as steps:
    refused at validation in one line naming both keys, before Ray starts."""
    monkeypatch.setattr(job, "init_ray", lambda *a, **k: pytest.fail("Ray started"))
    recipe, _ = write_recipe(tmp_path, "particle_filter", {"n": 2})  # agg_strategy: model is the default
    assert job.main(["--config", str(recipe), "prm.format=math-shepherd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "search.agg_strategy: model" in err and "prm.format: math-shepherd" in err
    # the same recipe with a per-step aggregation validates
    data = yaml.safe_load(recipe.read_text())
    data["prm"]["format"] = "math-shepherd"
    data["search"]["agg_strategy"] = "last"
    assert build_config(SearchRecipe, data).search.agg_strategy == "last"


def test_bench_search_target_with_scripted_pools(ray_cluster, tmp_path, scripted_pools, monkeypatch, capsys):
    from app.pool_config import PoolConfig
    from jobs.bench import main as bench_main

    import jobs.bench.search as bench

    monkeypatch.setattr(job, "pool_configs", lambda cfg: (PoolConfig(model="toy:policy"), None))
    measured = []

    def run_and_keep(args):
        rows, figures = run(args)
        measured.append((rows, dict(figures)))
        return rows, figures

    run = bench.run
    monkeypatch.setattr(bench, "run", run_and_keep)
    recipe, _ = write_recipe(tmp_path, "beam_search", {"n": 4, "beam_width": 2, "num_iterations": 5}, n_problems=4)
    assert bench_main(["search", "--config", str(recipe), "--problems", "4", "--json"]) == 0
    assert ray_cluster.is_initialized()  # a bench run in a caller's Ray leaves it up
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(scripted_pools) == 2  # one pool for 1 replica, one for 2
    [(rows, kept)] = measured
    assert figures == pytest.approx(kept)  # the --json line is what the run measured
    search1, sampling, search2 = rows
    assert [(r["phase"], r["replicas"]) for r in rows] == [("beam_search", 1), ("sampling", 1), ("beam_search", 2)]
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(r["generated_tokens"] / r["seconds"])
    for r in (search1, search2):
        assert r["problems"] == 4 and r["problems_per_s"] == pytest.approx(r["problems"] / r["seconds"])
    # the scripted search is deterministic: both replica counts generate the same tokens; sampling matches them
    # (to 95%, topped up in at most 5 rounds)
    assert search1["generated_tokens"] == search2["generated_tokens"]
    assert sampling["generated_tokens"] >= 0.95 * search1["generated_tokens"] or sampling["rounds"] == 5
    assert figures["search_tokens_per_s"] == pytest.approx(search1["tokens_per_s"])
    assert figures["sampling_tokens_per_s"] == pytest.approx(sampling["tokens_per_s"])
    assert figures["search_efficiency"] == pytest.approx(search1["tokens_per_s"] / sampling["tokens_per_s"])
    assert figures["replica_scaling"] == pytest.approx(search2["problems_per_s"] / search1["problems_per_s"])


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


# ------------------------------------------------------------------ every problem of the data set in the denominator


def test_report_of_a_killed_run_counts_missing_problems_wrong(ray_cluster, tmp_path, scripted_pools, capsys):
    recipe, out = write_recipe(tmp_path, "best_of_n", {"n": 4})
    assert job.main(["--config", str(recipe)]) == 0
    # "killed halfway": only the first 3 of the 6 records reached the shard, the 4th was cut mid-line
    [shard] = sorted(out.glob("shard-*.jsonl"))
    kept = shard.read_text().splitlines()[:3]
    shard.write_text("\n".join(kept) + '\n{"id": "q5", "tra')
    recs = lines(out)
    correct = sum(r["selection"]["maj"]["4"]["correct"] for r in recs)

    capsys.readouterr()
    assert report.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert "solved 3 of 6, 0 failed, 3 missing" in text
    assert text.index("solved 3 of 6") < text.index("naive")  # above the table
    s = summary_of(out, capsys)
    assert (s["problems"], s["solved"], s["failed"], s["missing"]) == (6, 3, 0, 3)
    assert s["accuracy"]["maj"]["4"] == pytest.approx(correct / 6)  # not correct / 3

    # the search job's own table counts them too, and a rerun solves the missing three
    capsys.readouterr()
    assert job.main(["--config", str(recipe)]) == 0
    text = capsys.readouterr().out
    assert "3 to solve" in text and "solved 6 of 6, 0 failed, 0 missing" in text


def test_report_of_a_sharded_run_counts_the_shards_not_yet_run(ray_cluster, tmp_path, scripted_pools, capsys):
    recipe, out = write_recipe(tmp_path, "best_of_n", {"n": 4})
    assert job.main(["--config", str(recipe), "data.shard=0/2"]) == 0
    assert "solved 3 of 3, 0 failed, 0 missing" in capsys.readouterr().out  # the job's own table: its shard
    s = summary_of(out, capsys)  # the directory's: the whole run
    assert (s["problems"], s["solved"], s["failed"], s["missing"]) == (6, 3, 0, 3)
    assert job.main(["--config", str(recipe), "data.shard=1/2"]) == 0
    s = summary_of(out, capsys)
    assert (s["problems"], s["solved"], s["failed"], s["missing"]) == (6, 6, 0, 0)
    assert json.loads((out / "problems.json").read_text())["count"] == 6


class FailingPolicy(ScriptedPolicy):
    """A scripted policy that raises on one question while the flag file exists (a problem that fails)."""

    def __init__(self, *args, flag: str, poison: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.flag, self.poison = flag, poison

    def generate(self, requests):
        import os

        if os.path.exists(self.flag) and any(self.poison in r.prompt for r in requests):
            raise RuntimeError(f"scripted failure on {self.poison!r}")
        return super().generate(requests)


def test_failed_problems_are_recorded_counted_wrong_and_cleared(ray_cluster, tmp_path, monkeypatch, capsys):
    flag = tmp_path / "fail.flag"
    flag.write_text("")

    def start_pools(policy_cfg, prm_cfg):
        policy = ScriptedPool(functools.partial(FailingPolicy, world, marker="Answer:\n\n", flag=str(flag),
                                                poison="What is 4 + 0?"))
        return Pools(policy, ScriptedPool(functools.partial(ScriptedPRM, world_prm)))

    monkeypatch.setattr(job, "start_pools", start_pools)
    monkeypatch.setattr(job, "pool_configs", lambda cfg: (None, None))
    recipe, out = write_recipe(tmp_path, "best_of_n", {"n": 4})
    assert job.main(["--config", str(recipe)]) == 1
    text = capsys.readouterr().out
    assert "solved 5 of 6, 1 failed, 0 missing" in text and "q4: " in text and "scripted failure" in text
    fails = [json.loads(x) for x in (out / "failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in fails] == ["q4"] and "scripted failure" in fails[0]["error"]
    assert "\n" not in fails[0]["error"]
    s = summary_of(out, capsys)
    assert (s["problems"], s["solved"], s["failed"], s["missing"]) == (6, 5, 1, 0)

    flag.unlink()  # the cause is gone: the rerun solves it, and the failure is cleared
    assert job.main(["--config", str(recipe)]) == 0
    assert "solved 6 of 6, 0 failed, 0 missing" in capsys.readouterr().out
    assert "q4" not in (out / "failures.jsonl").read_text()
    s = summary_of(out, capsys)
    assert (s["problems"], s["solved"], s["failed"], s["missing"]) == (6, 6, 0, 0)


# ------------------------------------------------------------------ bad input: one line, exit 2, before Ray starts


@pytest.fixture
def no_ray(monkeypatch, scripted_pools):
    """Fails the test if the job starts Ray or the pools."""
    calls = []
    monkeypatch.setattr(job, "init_ray", lambda *a, **k: calls.append("init_ray"))
    yield calls
    assert calls == [] and scripted_pools == []


def test_empty_problem_set_is_an_error(tmp_path, no_ray, capsys):
    recipe, out = write_recipe(tmp_path, "best_of_n", {"n": 4})
    assert job.main(["--config", str(recipe), "data.limit=0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no problems" in err and "data.limit" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert job.main(["--config", str(recipe), f"data.source={empty}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no problems" in err and str(empty) in err


def test_duplicate_problem_ids_are_refused(tmp_path, no_ray, capsys):
    recipe, _ = write_recipe(tmp_path, "best_of_n", {"n": 4})
    data = tmp_path / "problems.jsonl"
    rows = data.read_text().splitlines()
    data.write_text("\n".join(rows + [rows[1]]) + "\n")  # q1 again on line 7
    assert job.main(["--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(data) in err and "'q1'" in err and "line 2" in err and "line 7" in err


def test_prompt_template_is_tried_before_ray_starts(tmp_path, no_ray, capsys):
    recipe, _ = write_recipe(tmp_path, "best_of_n", {"n": 4})
    # the toy tokenizer has no chat template
    assert job.main(["--config", str(recipe), "prompt.template=qwen-math", "prompt.tokenizer=toy:policy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "chat template" in err


@pytest.mark.parametrize("model", ["./models/x", "models/llama/x", "runs/checkpoint-500", "~/nowhere/x"])
def test_missing_local_model_path_names_the_key_before_ray(tmp_path, no_ray, capsys, model):
    recipe, _ = write_recipe(tmp_path, "best_of_n", {"n": 4})
    assert job.main(["--config", str(recipe), f"policy.model={model}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "policy.model" in err and model in err


def test_check_model_tells_local_paths_from_hub_ids(tmp_path, monkeypatch):
    from actors.replicas import check_model
    from app.config import ConfigError

    monkeypatch.chdir(tmp_path)
    for hub in ["Qwen/Qwen2.5-Math-1.5B-Instruct", "meta-llama/Llama-3.2-1B-Instruct", "gpt2"]:
        assert check_model(hub, "policy.model") == hub  # not checked: no hub access here
    (tmp_path / "models").mkdir()
    for local in ["./models/x", "../x", "/no/such/dir", "~/no/such", "runs/sft/final", "out/checkpoint-500",
                  "models/x", "weights/model.safetensors"]:
        with pytest.raises(ConfigError, match=r"prm\.model") as e:
            check_model(local, "prm.model")
        assert local in str(e.value) and "\n" not in str(e.value)
    ckpt = tmp_path / "models" / "x"
    ckpt.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        check_model("models/x", "policy.model")
    (ckpt / "config.json").write_text("{}")
    assert check_model("models/x", "policy.model") == "models/x"
    assert check_model("toy:policy").endswith("checkpoints/policy")


# ------------------------------------------------------------------ DVTS: the window counts tasks, not problems


class TaskCounter:
    """Stands in for the driver's Ray remote functions: counts the tasks not yet finished at each submission."""

    def __init__(self, fn, log: dict):
        self.fn, self.log = fn, log

    def options(self, **kwargs):
        return TaskCounter(self.fn.options(**kwargs), self.log)

    def remote(self, *args):
        import ray

        ref = self.fn.remote(*args)
        refs = self.log.setdefault("refs", [])
        refs.append(ref)
        _, unfinished = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        self.log["max"] = max(self.log.get("max", 0), len(unfinished))
        return ref


def strip_timing(rec: dict) -> dict:
    rec = json.loads(json.dumps(rec))
    for k in ("seconds", "task_seconds"):
        rec["compute"].pop(k, None)
    return rec


def test_dvts_window_bounds_tasks_not_problems(ray_cluster, tmp_path, scripted_pools, monkeypatch):
    from app.search import driver

    tasks = driver._tasks()
    records = {}
    for window in (3, 1):
        log: dict = {}
        monkeypatch.setattr(driver, "_TASKS", {k: TaskCounter(f, log) for k, f in tasks.items()})
        (tmp_path / f"w{window}").mkdir()
        recipe, out = write_recipe(tmp_path / f"w{window}", "dvts", {"n": 16, "beam_width": 2}, n_problems=3)
        assert job.main(["--config", str(recipe), f"max_in_flight={window}"]) == 0
        # a problem is one task, its 8 subtrees run inside it: 3 tasks, never more than `window` at once
        assert len(log["refs"]) == 3 and log["max"] <= window, log["max"]
        records[window] = {r["id"]: strip_timing(r) for r in lines(out)}
    assert records[3] == records[1] and len(records[3]) == 3  # the same seeds give the same records
