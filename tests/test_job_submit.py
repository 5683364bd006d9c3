"""The README's cluster instructions, run as written against a local head: `ray start --head`, then a client with
RAY_ADDRESS, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=$(ray get-auth-token) submits the search job with
`ray job submit --working-dir .`; then the README's walk-through on a simulated 8-GPU node (`--num-gpus 8`: Ray
schedules by declared resources): the dry run of the 8-GPU example, the refusals (placeholder and relative output
paths, a plan that does not fit), a co-located run, its report, its resume, and the placement groups and actor
resources Ray made checked against the plan.

The head runs in its own temp dir on its own ports, with its own token (RAY_AUTH_TOKEN_PATH, so ~/.ray is not
touched); a head that finds a token turns token auth on. It is started with `--block` and stopped by signalling that
one process (never `ray stop`, which stops every Ray process of the machine). About 50 s on 2 CPU cores, most of it
the head starting.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")


def free_ports(k: int) -> list[int]:
    socks = []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def tail(path: Path, n: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


@pytest.fixture(scope="module")
def head():
    """A local head (8 simulated GPUs, 16 logical CPUs, dashboard on a free port) with token auth on; yields
    (dashboard port, head env, dir)."""
    # the unix sockets live under the temp dir: keep its path short (a socket path is at most 107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**clean_env(), "RAY_AUTH_TOKEN_PATH": str(token),  # the head node's token (as ~/.ray/auth_token there)
           "HF_HUB_OFFLINE": "1"}  # no hub here: the dry run's memory estimate of a Hub model says so at once
    dash, gcs, client, node, objm, agent, agent_grpc, metrics, rtenv = free_ports(9)
    log = tmp / "head.log"
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "16", "--num-gpus", "8", "--include-dashboard", "true",
           "--dashboard-port", str(dash), "--port", str(gcs), "--ray-client-server-port", str(client),
           "--node-manager-port", str(node), "--object-manager-port", str(objm),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--metrics-export-port", str(metrics), "--runtime-env-agent-port", str(rtenv),
           "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:  # the job API answers (with the token) once the dashboard is up
            if proc.poll() is not None:
                pytest.fail(f"ray start --head exited {proc.returncode}:\n{tail(log)}")
            req = urllib.request.Request(f"http://127.0.0.1:{dash}/api/jobs/",
                                         headers={"Authorization": f"Bearer {token.read_text()}"})
            try:
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"the head's dashboard did not answer on port {dash} in 240 s:\n{tail(log)}")
            time.sleep(2)
        yield dash, env, tmp
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops the processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the process group this fixture created
            proc.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


def test_readme_job_submit_runs_the_search_job(head, tmp_path):
    dash, head_env, tmp = head
    readme = (REPO / "README.md").read_text()
    assert "export RAY_AUTH_MODE=token" in readme and "RAY_AUTH_TOKEN=$(ray get-auth-token)" in readme
    # `$(ray get-auth-token)`, run where the head's token is
    got = subprocess.run([RAY, "get-auth-token"], env=head_env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, got.stderr
    token = got.stdout.strip()
    assert token
    out = tmp_path / "out"
    submit = [RAY, "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.search", "--config",
              "toy/beam_search", "data.limit=4", "search.n=4", f"output_dir={out}", "progress=false"]
    client = {**clean_env(), "RAY_ADDRESS": f"http://127.0.0.1:{dash}"}

    # the token alone is refused: the client sends it only in token mode
    refused = subprocess.run(submit, env={**client, "RAY_AUTH_TOKEN": token}, cwd=REPO, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode != 0 and "Unauthorized" in refused.stdout + refused.stderr, refused.stdout + refused.stderr
    assert not out.exists()

    # both, as the README says
    done = subprocess.run(submit, env={**client, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    text = done.stdout + done.stderr
    assert done.returncode == 0 and "succeeded" in text, text[-4000:]
    assert "solved 4 of 4, 0 failed, 0 missing" in text

    records = [json.loads(line) for p in sorted(out.glob("shard-*.jsonl")) for line in p.read_text().splitlines()]
    assert len(records) == 4 and len({r["id"] for r in records}) == 4
    assert all(r["selection"] and set(r["selection"]["maj"]) == {"1", "2", "4"} for r in records)

    # the upload left out what .gitignore names (.venv, results/, runs/) and .git: a few MB, not the environment
    [pkg] = {p.resolve() for p in (tmp / "ray").glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
             if p.is_dir()}
    assert (pkg / "jobs" / "search.py").is_file() and (pkg / "app" / "toy" / "checkpoints").is_dir()
    assert not any((pkg / name).exists() for name in (".venv", ".git", "results", "runs"))
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < 20 * 2**20, f"uploaded {size / 2**20:.1f} MiB"


def submit(dash: int, head_env: dict, *cmd: str, timeout: float = 600) -> tuple[int, str]:
    """`ray job submit --working-dir . -- CMD` as the README's client does it; (exit code, output)."""
    token = subprocess.run([RAY, "get-auth-token"], env=head_env, capture_output=True, text=True,
                           timeout=120).stdout.strip()
    env = {**clean_env(), "RAY_ADDRESS": f"http://127.0.0.1:{dash}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    done = subprocess.run([RAY, "job", "submit", "--working-dir", ".", "--", *cmd], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


SEARCH = ("python", "-m", "jobs.search", "--config")


def test_readme_cluster_walkthrough(head, tmp_path):
    dash, head_env, _ = head
    readme = (REPO / "README.md").read_text()
    example = "llama-3.2-1b/best_of_n policy.replicas=8 prm.replicas=8"
    assert f"--config {example}" in readme and "--dry-run" in readme

    # 1. the recipe as shipped: its output path is a placeholder until set
    rc, text = submit(dash, head_env, *SEARCH, "llama-3.2-1b/best_of_n", "--dry-run")
    assert rc != 0 and "error: output_dir: '<shared>/ponder/results/llama-3.2-1b/best_of_n' still has the " \
                       "<shared> placeholder" in text, text[-3000:]

    # 2. a relative path under `ray job submit` is the job's temporary working dir: refused
    rc, text = submit(dash, head_env, *SEARCH, "llama-3.2-1b/best_of_n", "output_dir=results/x", "--dry-run")
    assert rc != 0 and "error: output_dir: 'results/x' is relative; under `ray job submit`" in text, text[-3000:]

    # 3. the README's 8-GPU example fits with co-location (the plan printed, no model loaded)
    out = tmp_path / "llama"
    rc, text = submit(dash, head_env, *SEARCH, *example.split(), f"output_dir={out}", "--dry-run")
    assert rc == 0 and "fits: the cluster has the free resources for this plan" in text, text[-3000:]
    assert "total: 8 GPUs, 16 CPUs in 8 placement groups" in text
    assert not out.exists()

    # 4. without co-location, whole GPUs each: 16 GPUs on 8, one line before any model loads
    rc, text = submit(dash, head_env, *SEARCH, *example.split(), f"output_dir={out}", "prm.colocate=false",
                      "policy.num_gpus=1", "prm.num_gpus=1", "--dry-run")
    errors = {line for line in text.splitlines() if line.startswith("error:")}  # the job's log, echoed by submit
    assert rc != 0 and errors == {"error: placement: the pools need 16 GPUs (policy: 8 GPU/8 CPU, prm: 8 GPU/8 CPU), "
                                  "the cluster has 8 free; set prm.colocate=true (policy and PRM share each GPU), "
                                  "or lower policy.replicas / prm.replicas"}, text[-3000:]

    # 5. a co-located toy run: Ray makes exactly the planned groups, and each actor holds its planned share
    rc, text = submit(dash, head_env, "python", "tests/placement_probe.py", "2", "2", "1")
    assert rc == 0, text[-3000:]
    probe = json.loads(next(line for line in text.splitlines() if line.startswith("PROBE "))[6:])
    assert probe["generated"] and probe["scored"]
    def canon(groups):  # bundles as sorted items: Ray's table and the plan order a bundle's keys differently
        return sorted(str([sorted(b.items()) for b in g]) for g in groups)

    assert canon(probe["groups"].values()) == canon(probe["plan"]["groups"])
    for slot in probe["plan"]["slots"]:
        got = probe["actors"][slot["pool"]][slot["replica"]]
        assert got["resources"].get("GPU", 0) == slot["num_gpus"] == 0.5
        assert got["resources"]["CPU"] == slot["num_cpus"]
    pairs = list(zip(probe["actors"]["policy"], probe["actors"]["prm"]))
    assert all(p["placement_group"] == r["placement_group"] and p["gpu_ids"] == r["gpu_ids"] for p, r in pairs)

    # 6. submit, report, resume
    run = tmp_path / "toy"
    cmd = (*SEARCH, "toy/beam_search", "data.limit=4", "search.n=4", f"output_dir={run}", "progress=false",
           "policy.replicas=2", "prm.replicas=2", "prm.colocate=true")
    rc, text = submit(dash, head_env, *cmd)
    assert rc == 0 and "solved 4 of 4, 0 failed, 0 missing" in text, text[-3000:]
    rc, text = submit(dash, head_env, "python", "-m", "jobs.report", str(run))
    assert rc == 0 and "solved 4 of 4, 0 failed, 0 missing" in text, text[-3000:]
    rc, text = submit(dash, head_env, *cmd)
    assert rc == 0 and f"4 already in {run}, 0 to solve" in text, text[-3000:]
