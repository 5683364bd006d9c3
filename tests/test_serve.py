"""The Serve endpoint on 127.0.0.1:8000 (the shipped toy router, toy policy and PRM), called with a plain HTTP client
and with the `openai` client: solve, chat, models, healthz, docs, and each bad request (a 4xx naming the field)."""
from __future__ import annotations

import httpx
import pytest

URL = "http://127.0.0.1:8000"
ARGS = {"router_dir": "toy:router", "prompt": {"template": "toy"}, "policy": {"engine": "hf", "model": "toy:policy"},
        "prm": {"engine": "hf", "model": "toy:prm", "format": "qwen"}}


@pytest.fixture(scope="module")
def endpoint(ray_cluster):
    from ray import serve

    from actors.serve import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(build_app(ARGS), name="ponder", route_prefix="/", blocking=False)
    yield URL
    serve.shutdown()


@pytest.fixture(scope="module")
def http(endpoint):
    with httpx.Client(base_url=endpoint, timeout=300) as c:
        yield c


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

    client = openai.OpenAI(base_url=f"{endpoint}/v1", api_key="unused")
    assert "ponder-router" in [m.id for m in client.models.list().data]
    c = client.chat.completions.create(model="ponder/greedy", messages=[
        {"role": "system", "content": "solve"}, {"role": "user", "content": "What is 3 + 4?"}])
    assert c.choices[0].message.content and "\\boxed{" in c.choices[0].message.content
    assert c.usage.completion_tokens > 0
    c2 = client.chat.completions.create(model="ponder-router", messages=[{"role": "user", "content": "What is 9 - 1?"}],
                                        extra_body={"budget": 4, "cost_weight": 0.0})
    assert c2.choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError) as e:
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
    ("/v1/chat/completions", {"model": "ponder-router", "messages": [{"role": "user", "content": "1+1?"}],
                              "stream": True}, "stream"),
])
def test_bad_requests_are_4xx_naming_the_field(http, path, body, field):
    r = http.post(path, json=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["param"] == field and err["message"].startswith(f"{field}:"), err
    assert "Traceback" not in r.text and "File \"" not in r.text
    assert http.post("/v1/solve", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
