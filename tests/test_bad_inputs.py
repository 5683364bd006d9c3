"""Every bad input is one line and exit 2, before Ray starts and before anything is written (issue 33), and one run
per output: a second run on an output a live run holds is refused naming the holder; a dead holder's lock is taken
over (app.run_lock)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

JOBS = ("jobs.search", "jobs.tune", "jobs.train", "jobs.synthesize", "jobs.route", "jobs.serve")
UNWRITABLE = "/proc/ponder-out"  # /proc takes no new file, even from root


@pytest.fixture
def paths(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"problem": "Was kostet 5 \u20ac + 3 \u00e9?", "answer": "8"}\n'.encode("latin-1", "replace")
                       + b'{"problem": "caf\xe9", "answer": "1"}\n')
    locked = tmp_path / "locked"
    locked.mkdir()
    # a live holder on this host: pid 1 never ends while the machine is up
    (locked / ".ponder-run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "job": "search",
                                                        "started": "earlier"}))
    locked_out = tmp_path / "locked_synth.jsonl"
    Path(f"{locked_out}.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "job": "synthesize"}))
    return {"file": a_file, "latin1": latin1, "locked": locked, "locked_out": locked_out, "tmp": tmp_path,
            "new": tmp_path / "new_out"}


def _cases():
    """(job, argv, the key the line must name). `{file}` etc. are filled from the `paths` fixture."""
    s = ("jobs.search", ["--config", "toy/greedy", "data.limit=2"])
    t = ("jobs.tune", ["--config", "toy/sweep_quick"])
    sft = ("jobs.train", ["--config", "toy/sft"])
    dpo = ("jobs.train", ["--config", "toy/dpo"])
    mc = ("jobs.synthesize", ["mc", "--config", "toy/mc"])
    r = ("jobs.route", ["train", "--config", "toy/router"])
    rows = [
        (*s, ["output_dir="], "output_dir"),
        (*s, ["output_dir={file}"], "output_dir"),
        (*s, ["output_dir={file}/sub"], "output_dir"),
        (*s, [f"output_dir={UNWRITABLE}"], "output_dir"),
        (*s, ["output_dir={locked}"], "output_dir"),
        (*s, ["data.source=toy:bogus", "output_dir={new}"], "toy:bogus"),
        (*s, ["data.source={latin1}", "output_dir={new}"], "UTF-8"),
        (*s, ["data.source={tmp}/missing.jsonl", "output_dir={new}"], "missing.jsonl"),
        (*s, ["search.beamwidth=4", "output_dir={new}"], "search.beamwidth"),
        (*s, ["policy.model={tmp}/no-model", "output_dir={new}"], "policy.model"),
        (*t, ["output_dir="], "output_dir"),
        (*t, ["output_dir={file}"], "output_dir"),
        (*t, ["output_dir={file}/sub"], "output_dir"),
        (*t, [f"output_dir={UNWRITABLE}"], "output_dir"),
        (*t, ["output_dir={locked}"], "output_dir"),
        (*t, ["data.source=toy:bogus", "output_dir={new}"], "toy:bogus"),
        (*t, ["data.source={latin1}", "output_dir={new}"], "UTF-8"),
        (*sft, ["output={file}"], "output"),
        (*sft, ["output={file}/sub"], "output"),
        (*sft, [f"output={UNWRITABLE}"], "output"),
        (*sft, ["train.storage_path={file}"], "train.storage_path"),
        (*sft, ["train.storage_path={file}/sub"], "train.storage_path"),
        (*sft, [f"train.storage_path={UNWRITABLE}"], "train.storage_path"),
        (*sft, ["data={latin1}"], "UTF-8"),
        (*sft, ["train.zero_stage=4"], "train.zero_stage"),
        (*dpo, ["data={latin1}"], "UTF-8"),
        (*mc, ["output="], "output"),
        (*mc, ["output={file}/sub"], "output"),
        (*mc, ["output={tmp}"], "output"),
        (*mc, [f"output={UNWRITABLE}/x.jsonl"], "output"),
        (*mc, ["output={locked_out}"], "output"),
        (*mc, ["problems=toy:bogus", "output={new}/x.jsonl"], "toy:bogus"),
        (*r, ["router_dir="], "router_dir"),
        (*r, ["router_dir={file}"], "router_dir"),
        (*r, ["router_dir={file}/sub"], "router_dir"),
        ("jobs.serve", ["--config", "{file}"], [], "a_file"),
    ]
    return rows


CASES = _cases()


def test_at_least_30_bad_inputs_across_the_jobs():
    assert len(CASES) >= 30
    assert {job for job, *_ in CASES} == set(JOBS)


@pytest.mark.parametrize("job,argv,overrides,key", CASES,
                         ids=[f"{j.split('.')[1]}:{' '.join(o)}" for j, _, o, _ in CASES])
def test_bad_input_is_one_line_exit_2_before_ray_and_writes_nothing(job, argv, overrides, key, paths, monkeypatch,
                                                                    capsys):
    import importlib

    fill = {k: str(v) for k, v in paths.items()}
    args = [a.format(**fill) for a in argv + overrides]
    key = key.format(**fill)
    module = importlib.import_module(job)
    monkeypatch.setattr(module, "init_ray", _no_ray, raising=False)
    monkeypatch.setattr("jobs.common.init_ray", _no_ray)
    before = _tree(paths["tmp"])
    code = module.main(args)
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert key in lines[0], lines[0]
    assert _tree(paths["tmp"]) == before, "a refused run wrote something"


def _no_ray(*a, **k):
    raise AssertionError("Ray started for a bad input")


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_dead_holders_lock_is_taken_over_and_released(tmp_path, capsys):
    from app.run_lock import RunLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".ponder-run.lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "job": "search"}))
    with RunLock.for_dir(tmp_path, "search"):
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid()
        assert "taking over the lock of a run that is gone" in capsys.readouterr().err
        with pytest.raises(Exception, match=f"in use by another run .*pid {os.getpid()}"):
            RunLock.for_dir(tmp_path, "search").acquire()  # a second run while this one holds it
    assert not lock.exists()
