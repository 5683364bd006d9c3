"""The HTTP edge of the Serve app (`actors.serve`): request models, OpenAI-shaped errors, the guard that caps bodies
and checks API keys, text cleaning and the OpenAI chat parameters. Kept apart from the deployments so that every
rule a request meets before any model sees it reads in one place.

Every error, FastAPI's own 404/405/422 included, is `{"error": {"message", "type", "param", "code"}}` (OpenAI's
shape); the message starts with the field it names. Nothing a client sends reaches a tokenizer before `clean_text`
has refused a lone UTF-16 surrogate and NFC-normalised the rest.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import unicodedata
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException


class ApiError(Exception):
    """A request answered with an error: status, the field it names (param), OpenAI's type and code."""

    def __init__(self, field: str | None, message: str, status: int = 422, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(f"{field}: {message}" if field else message)
        self.field, self.message, self.status, self.code, self.kind = field, message, status, code, kind


BadRequest = ApiError  # the name the deployments raise


def error_body(field: str | None, message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": field, "code": code}}


def error_response(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return ErrorJSON(error_body(e.field, str(e), e.kind, e.code), status_code=e.status, headers=headers)


class ErrorJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may quote text that is not valid UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read (an HTTPException, so FastAPI's body parsing lets it through)."""

    def __init__(self, limit: int):
        super().__init__(413, f"body: over the limit of {limit} bytes (serve args max_body_bytes)")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Guard:
    """ASGI middleware in front of every route: API keys (Authorization: Bearer; /healthz stays open) and the body
    cap (413 from Content-Length at once, or while a chunked body streams in). Settings: `app.state.guard`."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg = getattr(scope["app"].state, "guard", None) or {}
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        keys = cfg.get("key_hashes")
        if keys and not scope["path"].rstrip("/").endswith("/healthz"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = key_hash(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
            if not any(hmac.compare_digest(given, k) for k in keys):
                msg = "a valid API key is required (header Authorization: Bearer KEY)" if given else \
                    "no API key given (header Authorization: Bearer KEY)"
                return await error_response(ApiError(None, msg, 401, "invalid_api_key"),
                                            {"www-authenticate": "Bearer"})(scope, receive, send)
        limit = int(cfg.get("max_body_bytes") or 0)
        if not limit:
            return await self.app(scope, receive, send)
        size = headers.get("content-length", "")
        if size.isdigit() and int(size) > limit:
            return await error_response(ApiError("body", BodyTooLarge(limit).detail.removeprefix("body: "), 413,
                                                 "body_too_large"))(scope, receive, send)
        seen = 0

        async def capped():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return msg

        return await self.app(scope, capped, send)


def install(api: FastAPI) -> None:
    """OpenAI-shaped answers for every error path of `api`, and the guard."""

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0]
        if err.get("type") == "json_invalid":
            why = err.get("ctx", {}).get("error", "parse error")
            return error_response(ApiError(None, f"the body is not valid JSON ({why})", 400, "invalid_json"))
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        field = ".".join(loc) or "body"
        msg = err.get("msg", "invalid").removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            return error_response(ApiError(field, "unknown parameter (not supported by ponder)", 400,
                                           "unsupported_parameter"))
        if err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "finite_number":
            msg = "must be a finite number (not NaN or infinity)"
        elif field == "body":
            msg = "must be a JSON object"
        return error_response(ApiError(field, msg, 422))

    @api.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError):
        return error_response(exc)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413:
            return error_response(ApiError("body", str(exc.detail).removeprefix("body: "), 413, "body_too_large"))
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path} (see /docs)"
            return error_response(ApiError(None, msg, 404, "not_found"))
        if exc.status_code == 405:
            return error_response(ApiError(None, f"{request.method} is not allowed on {request.url.path}", 405,
                                           "method_not_allowed"))
        return error_response(ApiError(None, str(exc.detail), exc.status_code))

    @api.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(ApiError(None, f"internal error ({type(exc).__name__})", 500, None, "server_error"))

    api.add_middleware(Guard)


def clean_text(field: str, text: str) -> str:
    """Valid Unicode, NFC-normalised, before any tokenizer: a lone UTF-16 surrogate (which JSON's \\uD800 escapes
    can carry) is refused with 422 naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(field, f"holds a lone UTF-16 surrogate at character {e.start} ({ascii(text[e.start])}): "
                       "not valid Unicode text") from None
    return unicodedata.normalize("NFC", text)


# ---------------------------------------------------------------- request bodies

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


class SolveRequest(BaseModel):
    model_config = _STRICT
    question: str = Field(..., description="the question, as plain text")
    method: str = Field("auto", description="auto (the router picks) or one search method")
    n: int | None = Field(None, ge=1, description="fix the budget N (at most the method's max_n)")
    cost_weight: float | None = Field(None, ge=0, description="lambda: the price on compute (default: the config's)")
    deadline_s: float | None = Field(None, gt=0, description="cancel the search after this long (at most the "
                                                             "server's deadline_s)")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list | None = None


# OpenAI parameters ponder cannot honour: refused (400 unsupported_parameter) when set to anything but their default
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logit_bias": None,
               "logprobs": False, "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0,
               "parallel_tool_calls": None, "audio": None, "modalities": None, "prediction": None,
               "web_search_options": None, "reasoning_effort": None}


class ChatRequest(BaseModel):
    """OpenAI's chat request, with its ranges; ponder's extensions: budget, cost_weight, deadline_s."""

    model_config = _STRICT
    model: str = "ponder-router"
    messages: list[ChatMessage] = Field(..., min_length=1)
    stream: bool | None = False
    stream_options: dict | None = None
    n: int | None = Field(None, ge=1, le=128, description="OpenAI's number of choices: ponder gives 1")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    user: str | None = None
    metadata: dict | None = None
    store: bool | None = None
    service_tier: str | None = None
    response_format: dict | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    logit_bias: dict | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    parallel_tool_calls: bool | None = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    budget: int | None = Field(None, ge=1, description="the search's N (ponder's `n` of /v1/solve)")
    cost_weight: float | None = Field(None, ge=0)
    deadline_s: float | None = Field(None, gt=0)

    def refuse_unsupported(self) -> None:
        for key, default in UNSUPPORTED.items():
            v = getattr(self, key)
            if v is not None and v != default and v not in ({}, []):
                raise ApiError(key, "not supported by ponder (a search returns one text answer)", 400,
                               "unsupported_parameter")
        if self.n not in (None, 1):
            raise ApiError("n", "ponder returns one choice; set the search's budget with `budget`", 400,
                           "unsupported_parameter")
        if self.response_format not in (None, {"type": "text"}):
            raise ApiError("response_format", "only {\"type\": \"text\"} is supported", 400, "unsupported_parameter")
        if isinstance(self.stop, list) and (len(self.stop) > 4 or not all(self.stop)):
            raise ApiError("stop", "at most 4 non-empty strings")
        if self.stop == "":
            raise ApiError("stop", "must be a non-empty string")
        if self.stream_options is not None and not self.stream:
            raise ApiError("stream_options", "only with stream: true", 400)
        if self.max_tokens and self.max_completion_tokens and self.max_tokens != self.max_completion_tokens:
            raise ApiError("max_completion_tokens", "differs from max_tokens (give one)")

    def overrides(self) -> dict:
        """The sampling keys applied to the search (temperature, top_p, the answer's token bound, seed)."""
        out = {"temperature": self.temperature, "top_p": self.top_p,
               "max_tokens": self.max_tokens or self.max_completion_tokens, "seed": self.seed}
        return {k: v for k, v in out.items() if v is not None}

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def prompt_parts(self) -> tuple[str | None, str]:
        """(system, question): the system (or developer) messages joined, and the LAST user turn; earlier turns and
        assistant / tool messages are not part of a search's prompt."""
        def text(i: int, m: ChatMessage) -> str:
            c = m.content
            if isinstance(c, list):
                parts = []
                for p in c:
                    if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                        raise ApiError(f"messages.{i}.content", "only text parts are supported", 400,
                                       "unsupported_parameter")
                    parts.append(p["text"])
                c = "".join(parts)
            return clean_text(f"messages.{i}.content", c or "")

        users = [(i, m) for i, m in enumerate(self.messages) if m.role == "user"]
        if not users:
            raise ApiError("messages", "needs a user message (the question)")
        system = [text(i, m) for i, m in enumerate(self.messages) if m.role in ("system", "developer")]
        question = text(*users[-1])
        if not question.strip():
            raise ApiError("messages", "the last user message is empty (it is the question)")
        return ("\n\n".join(system) if system else None), question


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """vLLM's rule: cut at the earliest stop string (left out); (text, whether one was found)."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=True)}\n\n"
