"""`python -m jobs.bench chaos [--json]`: a fixed schedule of faults over the toy recipes, on a multi-node Ray
cluster on this machine (`jobs.bench.multinode`), and what survived.

The schedule (each fault on a run of its own, the jobs as users run them: `ponder ...` drivers with RAY_ADDRESS):

1. driver: a search's driver is SIGKILLed mid-run; the same command run again finishes it.
2. replica: a policy replica's process is SIGKILLed mid-search (Ray restarts it; callers retry).
3. node: the node holding the PRM replica (and whatever else runs there) is removed mid-search; a fresh node joins.
4. train-node: the node of a Ray Train worker is removed after a committed checkpoint (train.max_failures).
5. serve-node: the node holding the Serve searcher is removed under `--requests` concurrent /v1/solve calls; each
   call must answer (200, or a clean 5xx within its deadline), never hang, and /healthz must come back.

Figures: `faults_injected`, `faults_survived` (the run finished with every problem or step once), `records_lost`,
`records_duplicated` (search problems and training steps missing or written twice), `serve_requests_failed`
(non-200 answers), `serve_requests_hung` (no answer within deadline + 60 s), `serve_recovered_s`.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

from jobs.bench.multinode import (PONDER, REPO, actor_pids, job_env, multi_node_cluster, registered_checkpoint,
                                  written_ids)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--problems", type=int, default=24, help="toy problems per search run (default 24)")
    parser.add_argument("--requests", type=int, default=32, help="concurrent Serve requests (default 32)")
    parser.add_argument("--skip", nargs="*", default=[], help="faults to leave out: driver replica node train-node "
                        "serve-node")
    parser.add_argument("--port", type=int, default=8321, help="HTTP port of the Serve app (default 8321)")
    parser.add_argument("--keep", action="store_true", help="keep the runs' folders (printed)")


def _wait(pred, proc, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the job ended before the fault (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for the job:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _search(cluster, out: Path, problems: int, log: Path) -> subprocess.Popen:
    cmd = [str(PONDER), "search", "--config", "toy/best_of_n", f"data.limit={problems}", "search.n=4",
           "search.max_tokens=256", "policy.replicas=2", "prm.replicas=1", "max_in_flight=4", f"output_dir={out}"]
    return subprocess.Popen(cmd, cwd=REPO, env=job_env(cluster), stdout=open(log, "a"), stderr=subprocess.STDOUT)


def _search_row(fault: str, out: Path, problems: int, code: int, seconds: float) -> dict:
    counts = Counter(written_ids(out))
    lost = problems - len(counts)
    dup = sum(c - 1 for c in counts.values())
    return {"fault": fault, "survived": code == 0 and lost == 0 and dup == 0, "exit": code, "lost": lost,
            "duplicated": dup, "seconds": round(seconds, 1)}


def _search_fault(cluster, work: Path, args, name: str, label: str, inject) -> dict:
    """A search run until it is under way (3 problems written), then `inject(proc)`, which makes the fault and
    returns the process that finishes the run (the same one, or a rerun)."""
    out, log = work / name, work / f"{name}.log"
    t0 = time.monotonic()
    proc = _search(cluster, out, args.problems, log)
    _wait(lambda: len(written_ids(out)) >= 3, proc, log)
    finisher = inject(proc)
    return _search_row(label, out, args.problems, finisher.wait(timeout=900), time.monotonic() - t0)


def _driver(cluster, nodes, work: Path, args) -> dict:
    def kill_and_rerun(proc):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return _search(cluster, work / "driver", args.problems, work / "driver.log")

    return _search_fault(cluster, work, args, "driver", "driver SIGKILL, rerun", kill_and_rerun)


def _replica(cluster, nodes, work: Path, args) -> dict:
    def kill_a_policy_replica(proc):
        os.kill(next(iter(actor_pids("PolicyActor", nodes))), signal.SIGKILL)
        return proc

    return _search_fault(cluster, work, args, "replica", "policy replica SIGKILL", kill_a_policy_replica)


def _node(cluster, nodes, work: Path, args) -> dict:
    def remove_the_prms_node(proc):
        doomed = next(iter(actor_pids("PRMActor", nodes).values()))
        cluster.remove_node(doomed, allow_graceful=False)
        nodes.remove(doomed)
        return proc

    row = _search_fault(cluster, work, args, "node", "node with the PRM removed", remove_the_prms_node)
    nodes.append(cluster.add_node(num_cpus=3))  # the cluster replaces the machine for the next faults
    return row


def _train_node(cluster, nodes, work: Path, args) -> dict:
    runs, log = work / "train_runs", work / "train.log"
    steps = 16
    cmd = [str(PONDER), "train", "--config", "toy/sft", "toy.n_per_level=100", "toy.levels=[1,2]",
           "eval_toy_per_level=0", "train.num_workers=2", "train.micro_batch_size=4", f"train.max_steps={steps}",
           "train.warmup_steps=1", "train.checkpoint_every_steps=2", "train.max_failures=2", "train.name=chaos",
           f"train.storage_path={runs}", f"output={work / 'train_model'}", "train.progress=false"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(cluster), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _wait(lambda: registered_checkpoint(runs / "chaos") is not None, proc, log)
    doomed = next(iter(actor_pids("RayTrainWorker", nodes).values()))
    cluster.remove_node(doomed, allow_graceful=False)
    nodes.remove(doomed)
    code = proc.wait(timeout=900)
    nodes.append(cluster.add_node(num_cpus=3))
    last = runs / "chaos" / f"step_{steps:07d}" / "metrics.jsonl"
    seen = Counter(json.loads(x)["step"] for x in last.read_text().splitlines()) if last.exists() else Counter()
    lost = sum(1 for s in range(1, steps + 1) if s not in seen)
    dup = sum(c - 1 for c in seen.values())
    return {"fault": "node with a Train worker removed", "survived": code == 0 and lost == 0 and dup == 0,
            "exit": code, "lost": lost, "duplicated": dup, "seconds": round(time.monotonic() - t0, 1)}


def _serve_node(cluster, nodes, work: Path, args) -> dict:
    import concurrent.futures

    import httpx

    import yaml

    log, config = work / "serve.log", work / "serve.yaml"
    spec = yaml.safe_load((REPO / "configs/serve/toy.yaml").read_text())
    spec.setdefault("http_options", {})["port"] = args.port  # beside any other Serve app on this machine
    # one HTTP proxy, on the head: on one machine every node's proxy would want the same port, and the one that got
    # it could be on the node removed (on a real cluster a load balancer spreads clients over every node's proxy)
    spec["proxy_location"] = "HeadOnly"
    config.write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen([str(PONDER), "serve", "--config", str(config)], cwd=REPO, env=job_env(cluster),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{args.port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=5).json().get("status") == "ok"
        except Exception:
            return False

    t0 = time.monotonic()
    try:
        _wait(healthy, proc, log, timeout=900)
        deadline = 300.0

        def ask(i: int) -> str:
            try:
                r = httpx.post(f"{base}/v1/solve", json={"question": f"What is {i} + {i + 3}?",
                                                         "method": "best_of_n", "n": 4},
                               timeout=deadline + 60)
                return "ok" if r.status_code == 200 else f"http {r.status_code}"
            except httpx.TimeoutException:
                return "hung"
            except Exception as e:  # a dropped connection: an answer, not a hang
                return type(e).__name__

        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            futures = [pool.submit(ask, i) for i in range(args.requests)]
            time.sleep(3)
            searchers = actor_pids("ServeReplica:ponder:Searcher", nodes)
            doomed = next(iter(searchers.values())) if searchers else nodes[0]
            ingress_too = any(n is doomed for n in actor_pids("ServeReplica:ponder:Ingress", nodes).values())
            cluster.remove_node(doomed, allow_graceful=False)
            nodes.remove(doomed)
            outcomes = Counter(f.result() for f in futures)
        nodes.append(cluster.add_node(num_cpus=3))
        t_dead = time.monotonic()
        _wait(healthy, proc, log, timeout=600)
        recovered = time.monotonic() - t_dead
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    failed = sum(n for k, n in outcomes.items() if k != "ok")
    return {"fault": f"node with the Serve searcher{' and ingress' if ingress_too else ''} removed under "
                     f"{args.requests} requests",
            "survived": outcomes.get("hung", 0) == 0, "ok": outcomes.get("ok", 0), "failed": failed,
            "hung": outcomes.get("hung", 0), "answers": ", ".join(f"{k} x{n}" for k, n in sorted(outcomes.items())),
            "recovered_s": round(recovered, 1),
            "seconds": round(time.monotonic() - t0, 1)}


FAULTS = {"driver": _driver, "replica": _replica, "node": _node, "train-node": _train_node, "serve-node": _serve_node}


def run(args) -> tuple[list[dict], dict]:
    work = Path(tempfile.mkdtemp(prefix="ponder-chaos-"))
    rows = []
    with multi_node_cluster([{"num_cpus": 3}, {"num_cpus": 3}]) as (cluster, nodes):
        nodes = list(nodes)
        for name, fault in FAULTS.items():
            if name in args.skip:
                continue
            try:
                rows.append(fault(cluster, nodes, work, args))
            except Exception as e:  # a fault the system did not survive is a row, not the end of the schedule
                rows.append({"fault": name, "survived": False, "error": str(e).splitlines()[0][:200]})
    if args.keep:
        print(f"runs kept in {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    serve = [r for r in rows if "hung" in r]
    figures = {
        "faults_injected": len(rows),
        "faults_survived": sum(1 for r in rows if r.get("survived")),
        "records_lost": sum(r.get("lost", 0) for r in rows),
        "records_duplicated": sum(r.get("duplicated", 0) for r in rows),
        "serve_requests_failed": sum(r["failed"] for r in serve),
        "serve_requests_hung": sum(r["hung"] for r in serve),
        "serve_recovered_s": serve[0]["recovered_s"] if serve else None,
    }
    return rows, figures
