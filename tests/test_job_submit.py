"""The README's cluster instructions, run as written against a local head: `ray start --head`, then a client with
RAY_ADDRESS, RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=$(ray get-auth-token) submits the search job with
`ray job submit --working-dir .`.

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


@pytest.fixture
def head():
    """A local head (2 CPUs, dashboard on a free port) with token auth on; yields (dashboard port, head env, dir)."""
    # the unix sockets live under the temp dir: keep its path short (a socket path is at most 107 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="rjs-", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {**clean_env(), "RAY_AUTH_TOKEN_PATH": str(token)}  # the head node's token (as ~/.ray/auth_token there)
    dash, gcs, client, node, objm, agent, agent_grpc, metrics, rtenv = free_ports(9)
    log = tmp / "head.log"
    cmd = [RAY, "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard", "true",
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
