"""The Serve endpoint on 127.0.0.1:8000 over real HTTP (httpx and the `openai` client), ONE Serve app for the module
(the shipped toy router, toy policy and PRM) with API keys on, a small body cap, a small queue and a slow served
method (majority over many samples): solve, chat, models, healthz, docs; bounds (max n, deadline, cancellation on
disconnect, overload); access (401 / 200); OpenAI compatibility (streamed and not, parameters applied or refused,
404 model_not_found, errors in OpenAI's shape); every bad request a 4xx naming its field.
"""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

URL = "http://127.0.0.1:8000"
KEY = "sk-test-ponder"
SLOW = {"n": 256, "temperature": 1.0}  # majority: one policy call of 256 samples (seconds); n=1024: 4x as long
ARGS = {"router_dir": "toy:router", "prompt": {"template": "toy"}, "policy": {"engine": "hf", "model": "toy:policy"},
        "prm": {"engine": "hf", "model": "toy:prm", "format": "qwen"}, "methods": {"majority": SLOW},
        "max_n": {"majority": 1024}, "max_body_bytes": 65536, "keep_alive_s": 0.2, "api_keys_env": "PONDER_TEST_KEYS",
        "max_ongoing_requests": 3, "max_queued_requests": 1}
AUTH = {"authorization": f"Bearer {KEY}"}
Q = "What is 2 + 3 * 4?"


@pytest.fixture(scope="module")
def endpoint(ray_cluster):
    import os

    from ray import serve

    from actors.serve import build_app

    os.environ["PONDER_TEST_KEYS"] = f"other-key, {KEY}"
    try:
        app = build_app(ARGS)
    finally:
        del os.environ["PONDER_TEST_KEYS"]  # read once, by build_app: the replicas get hashes only
    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(app, name="ponder", route_prefix="/", blocking=False)
    yield URL
    serve.shutdown()


@pytest.fixture(scope="module")
def http(endpoint):
    with httpx.Client(base_url=endpoint, timeout=300, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def client(endpoint):
    import openai

    return openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY, max_retries=0)


def test_healthz_models_docs(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    models = http.get("/v1/models").json()
    ids = [m["id"] for m in models["data"]]
    assert models["object"] == "list" and ids[0] == "ponder-router" and "ponder/best_of_n" in ids
    assert http.get("/docs").status_code == 200
    assert "/v1/solve" in http.get("/openapi.json").json()["paths"]


def test_solve_routed_and_fixed(http):
    r = http.post("/v1/solve", json={"question": "What is 2 + 3 * 4?"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) >= {"answer", "method", "n", "steps", "compute", "router"}
    assert out["steps"] and all(isinstance(s, str) for s in out["steps"])
    assert out["compute"]["flops"] > 0 and out["compute"]["tokens"] > 0 and "computed_flops" in out["compute"]
    assert 0 <= out["router"]["predicted_accuracy"] <= 1 and out["router"]["arm"]
    fixed = http.post("/v1/solve", json={"question": "What is 7 - 2?", "method": "best_of_n", "n": 2}).json()
    assert fixed["method"] == "best_of_n" and fixed["n"] == 2 and fixed["router"]["chosen"] == "fixed"
    # a high price on compute routes to the cheapest arm, no price to a dearer one
    q = "What is 7 * 8 - 9 + 6 * 3 - 4?"
    cheap = http.post("/v1/solve", json={"question": q, "cost_weight": 100.0}).json()
    assert cheap["method"] == "greedy" and cheap["n"] == 1
    dear = http.post("/v1/solve", json={"question": q, "cost_weight": 0.0}).json()
    assert dear["router"]["predicted_accuracy"] >= cheap["router"]["predicted_accuracy"]


def test_chat_plain_http_and_openai_client(endpoint, http):
    r = http.post("/v1/chat/completions", json={"model": "ponder-router",
                                                "messages": [{"role": "user", "content": "What is 5 + 6?"}]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] > 0

    import openai

    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key=KEY)
    assert "ponder-router" in [m.id for m in client.models.list().data]
    c = client.chat.completions.create(model="ponder/greedy", messages=[
        {"role": "system", "content": "solve"}, {"role": "user", "content": "What is 3 + 4?"}])
    assert c.choices[0].message.content and "\\boxed{" in c.choices[0].message.content
    assert c.usage.completion_tokens > 0
    c2 = client.chat.completions.create(model="ponder-router", messages=[{"role": "user", "content": "What is 9 - 1?"}],
                                        extra_body={"budget": 4, "cost_weight": 0.0})
    assert c2.choices[0].message.content
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="ponder/nope", messages=[{"role": "user", "content": "What is 1 + 1?"}])
    assert "model" in str(e.value)


@pytest.mark.parametrize("path,body,field", [
    ("/v1/solve", {"question": ""}, "question"),
    ("/v1/solve", {"question": "   "}, "question"),
    ("/v1/solve", {}, "question"),
    ("/v1/solve", {"question": "What is 1 + 1?", "method": "nope"}, "method"),
    ("/v1/solve", {"question": "What is 1 + 1?", "n": 0}, "n"),
    ("/v1/solve", {"question": "What is 1 + 1?", "n": -3}, "n"),
    ("/v1/solve", {"question": "What is 1 + 1?", "cost_weight": -0.5}, "cost_weight"),
    ("/v1/solve", {"question": "What is 1 + 1?", "method": "greedy", "n": 4}, "n"),
    ("/v1/solve", {"question": "What is 1 + 1?", "colour": "red"}, "colour"),
    ("/v1/solve", {"question": "What is " + " + ".join(["1"] * 400) + "?"}, "question"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "What is 1 + 1?"}]}, "model"),
    ("/v1/chat/completions", {"model": "ponder-router", "messages": [{"role": "system", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"model": "ponder-router", "messages": [{"role": "user", "content": ""}]}, "messages"),
])
def test_bad_requests_are_4xx_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}:"), err
    assert "Traceback" not in r.text and "File \"" not in r.text
    assert http.post("/v1/solve", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400


def searcher_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("Searcher", app_name="ponder").stats.remote().result()


def wait_idle(before: dict, timeout: float = 60.0) -> dict:
    """Poll until no search thread runs and no pool call is in flight, and one more search was cancelled."""
    t = time.monotonic() + timeout
    while True:
        s = searcher_stats()
        if s["running"] == 0 and s["pool_inflight"] == 0 and s["cancelled"] > before["cancelled"]:
            return s
        assert time.monotonic() < t, s
        time.sleep(0.2)


def is_openai_error(r: httpx.Response, status: int, param=..., code=...) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def test_api_keys_and_open_healthz(endpoint):
    with httpx.Client(base_url=endpoint, timeout=60) as anon:
        assert anon.get("/healthz").json() == {"status": "ok"}
        is_openai_error(anon.get("/v1/models"), 401, code="invalid_api_key")
        is_openai_error(anon.post("/v1/solve", json={"question": Q}), 401, code="invalid_api_key")
        is_openai_error(anon.get("/v1/models", headers={"authorization": "Bearer wrong"}), 401)
        assert anon.get("/v1/models", headers={"authorization": "Bearer other-key"}).status_code == 200
        assert anon.get("/v1/models", headers=AUTH).status_code == 200
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{endpoint}/v1", api_key="nope", max_retries=0).models.list()


def test_models_routes_and_model_not_found(http, client):
    import openai

    assert client.models.retrieve("ponder/best_of_n").id == "ponder/best_of_n"
    assert http.get("/v1/models/ponder-router").json()["object"] == "model"
    is_openai_error(http.get("/v1/models/ponder/nope"), 404, "model", "model_not_found")
    is_openai_error(http.get("/v1/nowhere"), 404, None, "not_found")
    is_openai_error(http.get("/v1/solve"), 405, None, "method_not_allowed")
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": Q}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


SURROGATE = b'{"question": "What is \\ud800 2 + 3?"}'
CHAT = {"model": "ponder/greedy", "messages": [{"role": "user", "content": Q}]}


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/solve", b"{not json", 400, None, "invalid_json"),
    ("/v1/solve", b"[1, 2]", 422, "body", None),
    ("/v1/solve", SURROGATE, 422, "question", None),
    ("/v1/chat/completions", b'{"model": "ponder-router", "messages": [{"role": "user", "content": "1 + \\udfff?"}]}',
     422, "messages.0.content", None),
    ("/v1/solve", b'{"question": "What is 1 + 1?", "cost_weight": 1e999}', 422, "cost_weight", None),
    ("/v1/solve", b'{"question": "What is 1 + 1?", "cost_weight": NaN}', 422, "cost_weight", None),
    ("/v1/solve", b'{"question": "What is 1 + 1?", "cost_weight": -Infinity}', 422, "cost_weight", None),
    ("/v1/solve", {"question": Q, "method": "best_of_n", "n": 17}, 422, "n", None),
    ("/v1/solve", {"question": Q, "n": 10 ** 9}, 422, "n", None),
    ("/v1/solve", {"question": Q, "method": "majority", "n": 1025}, 422, "n", None),
    ("/v1/chat/completions", {**CHAT, "model": "ponder/beam_search", "budget": 8}, 422, "budget", None),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, 422, "temperature", None),
    ("/v1/chat/completions", {**CHAT, "top_p": 0}, 422, "top_p", None),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 0}, 422, "max_tokens", None),
    ("/v1/chat/completions", {**CHAT, "seed": 1.5}, 422, "seed", None),
    ("/v1/chat/completions", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop", None),
    ("/v1/chat/completions", {**CHAT, "n": 2}, 400, "n", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "presence_penalty": 0.5}, 400, "presence_penalty", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object"}}, 400, "response_format",
     "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "colour": "red"}, 400, "colour", "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages.0.content",
     "unsupported_parameter"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": Q}]}, 422, "messages.0.role", None),
])
def test_bad_requests_are_openai_shaped_4xx(http, path, body, status, param, code):
    r = http.post(path, **({"content": body, "headers": {"content-type": "application/json"}}
                           if isinstance(body, bytes) else {"json": body}))
    err = is_openai_error(r, status, param, code)
    assert param is None or err["message"].startswith(f"{param}:"), err
    assert "Traceback" not in r.text
    assert http.get("/healthz").status_code == 200


def test_body_cap_413(http):
    big = {"question": "What is 1 + 1?" + " " * 100_000}
    is_openai_error(http.post("/v1/solve", json=big), 413, "body", "body_too_large")

    def chunks():  # no Content-Length: capped while it streams in
        for _ in range(40):
            yield b" " * 4096
    r = http.post("/v1/solve", content=chunks(), headers={"content-type": "application/json"})
    is_openai_error(r, 413, "body", "body_too_large")
    r = http.post("/v1/solve", content=b"x" * (64 << 20), headers={"content-type": "application/json"})
    is_openai_error(r, 413, "body", "body_too_large")  # the 64 MiB body: answered, not parsed
    assert http.get("/healthz").status_code == 200


def test_openai_parameters_applied(client):
    base = client.chat.completions.create(model="ponder/greedy", messages=[{"role": "user", "content": Q}], seed=3)
    text = base.choices[0].message.content
    assert base.choices[0].finish_reason == "stop" and "\\boxed{" in text
    u = base.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0
    assert u.model_extra["prm_tokens"] >= 0
    # stop strings cut the answer (vLLM's rule), finish_reason "stop"
    stop = text[3:5]
    cut = client.chat.completions.create(model="ponder/greedy", messages=[{"role": "user", "content": Q}], stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    # max_tokens bounds the answer: cut before it finished is an honest "length"
    short = client.chat.completions.create(model="ponder/greedy", messages=[{"role": "user", "content": Q}],
                                           max_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens <= 3 < u.completion_tokens
    # temperature and seed reach the search: a seeded sampled call repeats itself
    a, b = (client.chat.completions.create(model="ponder/best_of_n", messages=[{"role": "user", "content": Q}],
                                           temperature=1.3, top_p=0.9, seed=11, extra_body={"budget": 2})
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.model_extra["ponder"]["n"] == 2


def test_stream_assembles_to_the_same_answer(client, http):
    msgs = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "What is 9 - 1?"}]
    plain = client.chat.completions.create(model="ponder/greedy", messages=msgs)
    chunks = list(client.chat.completions.create(model="ponder/greedy", messages=msgs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]" and all(ln.startswith(("data: ", ":")) for ln in lines)


def test_deadline_cancels_the_search(http):
    before = searcher_stats()
    r = http.post("/v1/solve", json={"question": Q, "method": "majority", "n": 1024, "deadline_s": 0.3})
    is_openai_error(r, 504, None, "deadline_exceeded")
    assert "deadline" in r.json()["error"]["message"]
    wait_idle(before)
    # streamed: a role chunk, keep-alive comments while it runs, then the error event and [DONE]
    before = searcher_stats()
    body = {"model": "ponder/majority", "messages": [{"role": "user", "content": Q}], "stream": True, "budget": 1024,
            "deadline_s": 1.0}
    with http.stream("POST", "/v1/chat/completions", json=body) as s:
        lines = [ln for ln in s.iter_lines() if ln]
    assert ": keep-alive" in lines and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "deadline_exceeded"
    wait_idle(before)


def test_disconnect_cancels_the_search(endpoint):
    before = searcher_stats()
    with httpx.Client(base_url=endpoint, headers=AUTH, timeout=1.5) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/solve", json={"question": Q, "method": "majority", "n": 1024})
    after = wait_idle(before)
    assert after["finished"] == before["finished"]  # it stopped, it did not run to the end
    # a streamed answer left while its search runs (keep-alive comments come only while the search is in flight)
    body = {"model": "ponder/majority", "messages": [{"role": "user", "content": Q}], "stream": True, "budget": 1024}
    with httpx.Client(base_url=endpoint, headers=AUTH, timeout=60) as c:
        with c.stream("POST", "/v1/chat/completions", json=body) as s:
            lines = s.iter_lines()
            assert '"role": "assistant"' in next(lines)
            seen = 0
            for line in lines:
                seen += line == ": keep-alive"
                if seen >= 3:
                    break
            assert seen >= 3, "the stream ended before its search had run for three keep-alives"
    assert wait_idle(after)["finished"] == before["finished"]


def test_overload_is_refused_at_once(endpoint, http):
    async def burst():
        async with httpx.AsyncClient(base_url=endpoint, headers=AUTH, timeout=120) as c:
            body = {"question": Q, "method": "majority", "deadline_s": 2.0}
            return await asyncio.gather(*(c.post("/v1/solve", json=body) for _ in range(8)))

    before = searcher_stats()
    codes = sorted(r.status_code for r in asyncio.run(burst()))
    # 3 running + 1 queued (each 504 at its deadline, or 200 if the search ends first); the rest 503 at once
    assert set(codes) <= {200, 503, 504} and codes.count(503) >= 4, codes
    t = time.monotonic() + 60
    while searcher_stats()["running"] or searcher_stats()["cancelled"] - before["cancelled"] < codes.count(504):
        assert time.monotonic() < t
        time.sleep(0.2)
    assert http.get("/healthz").status_code == 200


def test_config_checked_before_ray(tmp_path, capsys):
    """A model path that does not exist, or an API key source that is missing, is one line and exit 2 before Ray
    starts (as `ponder search`)."""
    import ray

    from jobs.serve import main

    was = ray.is_initialized()
    for args, key in [({**ARGS, "policy": {"engine": "hf", "model": str(tmp_path / "nope")}}, "policy.model"),
                      ({**ARGS, "api_keys_env": "PONDER_NO_SUCH_VAR"}, "api_keys_env"),
                      ({**ARGS, "api_keys_env": None, "api_keys_file": str(tmp_path / "keys")}, "api_keys_file"),
                      ({**ARGS, "api_keys_env": None, "max_n": {"rebase": 4}}, "max_n")]:
        cfg = tmp_path / "serve.yaml"
        cfg.write_text(json.dumps({"applications": [{"name": "x", "import_path": "actors.serve:build_app",
                                                     "args": args}]}))
        assert main(["--config", str(cfg)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {key}:") and "\n" not in err, err
    cfg.write_text(json.dumps({"http_options": {"hots": "0.0.0.0"}, "applications": [
        {"name": "x", "import_path": "actors.serve:build_app", "args": ARGS}]}))
    assert main(["--config", str(cfg)]) == 2
    assert "http_options.hots is not a Serve HTTP option" in capsys.readouterr().err
    assert ray.is_initialized() == was
