"""`ponder serve --config configs/serve/toy.yaml` (= `python -m jobs.serve`): routed solving on Ray Serve.

The config is a Ray Serve config file (the same file works with `serve run` and `serve deploy`): `http_options`
(host, port, root_path behind a reverse proxy, request_timeout_s, TLS files) and one application whose `args` are
`actors.serve.ServeArgs` (router folder, policy and PRM pools, prompt, bounds, API keys). The job validates the
args, the model paths and the API key sources before Ray starts (one line, exit 2), starts Ray (or joins
RAY_ADDRESS), deploys the application, prints where it listens, and blocks until Ctrl-C, then shuts Serve down.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from app.config import ConfigError, read_recipe
from jobs.common import init_ray, user_errors


HTTP_KEYS = ("host", "port", "root_path", "request_timeout_s", "keep_alive_timeout_s", "ssl_keyfile", "ssl_certfile",
             "ssl_keyfile_password", "ssl_ca_certs")


PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")  # Serve's proxy_location: where the HTTP proxies run


def load(path: str) -> tuple[dict, dict]:
    """(http_options, the application's entry) of a Serve config file; one-line errors."""
    data, src = read_recipe(path)
    apps = data.get("applications")
    if not isinstance(apps, list) or len(apps) != 1 or not isinstance(apps[0], dict):
        raise ConfigError(f"{src}: `applications` must list one application (import_path actors.serve:build_app)")
    app = apps[0]
    if app.get("import_path") != "actors.serve:build_app":
        raise ConfigError(f"{src}: applications[0].import_path must be actors.serve:build_app")
    http = dict(data.get("http_options") or {})
    unknown = sorted(set(http) - set(HTTP_KEYS))
    if unknown:
        raise ConfigError(f"{src}: http_options.{unknown[0]} is not a Serve HTTP option ponder serve passes on "
                          f"(one of: {', '.join(HTTP_KEYS)})")
    location = data.get("proxy_location", "EveryNode")
    if location not in PROXY_LOCATIONS:
        raise ConfigError(f"{src}: proxy_location {location!r} is not one of {', '.join(PROXY_LOCATIONS)}")
    return {"host": "127.0.0.1", "port": 8000, **http}, dict(app, proxy_location=location)


def start(path: str, num_cpus: int | None = None):
    """Deploy the config's application (Ray started or joined); returns (url, app name)."""
    from ray import serve

    from actors.serve import build_app

    http, entry = load(path)
    application = build_app(entry.get("args") or {})  # validates before Ray starts
    init_ray(num_cpus)
    serve.start(http_options=http, proxy_location=entry["proxy_location"])
    name = entry.get("name", "ponder")
    serve.run(application, name=name, route_prefix=entry.get("route_prefix", "/"), blocking=False)
    scheme = "https" if http.get("ssl_certfile") else "http"
    return f"{scheme}://{http['host']}:{int(http['port'])}{http.get('root_path') or ''}", name


@user_errors
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ponder serve", description="Serve routed solving (Ray Serve + FastAPI).")
    p.add_argument("--config", "-c", default="configs/serve/toy.yaml", help="a Ray Serve config file")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the pools' placement plan and "
                   "check it against the cluster (RAY_ADDRESS or a local one) without loading any model")
    args = p.parse_args(argv)
    if args.dry_run:
        from actors.serve import ServeArgs, build_app
        from app.config import build_config
        from jobs.common import dry_run

        _, entry = load(args.config)
        build_app(entry.get("args") or {})  # every check the deployment makes, before Ray
        a = build_config(ServeArgs, dict(entry.get("args") or {}), source=args.config)
        return dry_run({"policy": a.policy, **({"prm": a.prm} if a.prm is not None else {})})
    url, _ = start(args.config, args.num_cpus)
    print(f"ponder serve: listening on {url} (POST /v1/solve, /v1/chat/completions; GET /v1/models[/ID], /healthz, "
          f"/docs); Ctrl-C stops it", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
