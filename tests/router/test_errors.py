"""Bad requests, scheduler errors and client disconnects over real HTTP: OpenAI's error shape,
the right status, and nothing left running in the (fake) scheduler."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import openai
import pytest

from tests.helpers.router_fixtures import chat, eventually, ids_of

# ----- errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, param", [
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),
    ({"logit_bias": {"999999": 1}}, "logit_bias"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_chat_params_are_400_naming_the_param(client, kw, param):
    kw.setdefault("messages", [{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="smol", **kw)
    assert err.value.status_code == 400
    assert err.value.body["param"] == param and err.value.body["type"] == "invalid_request_error"
    assert param.split("[")[0] in err.value.body["message"] or "context length" in \
        err.value.body["message"]


@pytest.mark.parametrize("prompt", [[49152], [[1, 2], [-1]], "", [], [1.5]])
def test_invalid_prompts_are_400(client, prompt):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt=prompt, max_tokens=2)
    assert err.value.body["param"] == "prompt"


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="smol", prompt=[300] * 2048, max_tokens=1)
    assert err.value.body["param"] == "prompt"
    assert err.value.body["code"] == "context_length_exceeded"


def test_malformed_json_is_400(url):
    reply = httpx.post(url + "/v1/chat/completions", content=b'{"model": ',
                       headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "not valid JSON" in reply.json()["error"]["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="gpt-17")
    assert err.value.body["code"] == "model_not_found"
    assert httpx.get(str(client.base_url) + "models/gpt-17").status_code == 404


def test_scheduler_errors_map_to_http(client, fake):
    fake.fail_with = (grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue is full")
    with pytest.raises(openai.InternalServerError) as err:
        chat(client, stream=True)
    assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
    fake.fail_with = (grpc.StatusCode.INVALID_ARGUMENT, "max_tokens: too many")
    with pytest.raises(openai.BadRequestError) as err:
        chat(client)
    assert "max_tokens: too many" in err.value.body["message"]
    assert err.value.body["param"] == "max_tokens"


def test_scheduler_down_is_503_then_recovers(harness, client, url):
    harness.stop_scheduler()
    try:
        with pytest.raises(openai.InternalServerError) as err:
            chat(client)
        assert err.value.status_code == 503
        assert err.value.body["code"] == "scheduler_unavailable"
        assert httpx.get(url + "/health").status_code == 503
    finally:
        harness.start_scheduler()
    eventually(lambda: httpx.get(url + "/health").status_code == 200)
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


def test_a_request_in_flight_when_the_scheduler_goes_is_503_then_the_next_reopens(harness, fake):
    """The router's one GenerateStream call breaks with the scheduler: with --resume-timeout 0
    the request on it fails as its own broken Generate call did (503 scheduler_unavailable), and
    once the scheduler is back the next request opens a new call."""
    url = harness.router(resume_timeout=0).url
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=20)
    fake.token_delay_s = 0.05
    body = {"model": "smol", "prompt": "x", "max_tokens": 500, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        reply = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
        eventually(lambda: fake.requests)
        harness.stop_scheduler()
        try:
            failed = reply.result(timeout=60)
        finally:
            harness.start_scheduler()
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["code"] == "scheduler_unavailable"
    fake.token_delay_s = 0.0
    eventually(lambda: httpx.get(url + "/health").status_code == 200)
    assert chat(client, max_tokens=2).choices[0].finish_reason == "length"


def test_api_key_and_router_flags(harness, fake, tmp_path, tokenizer):
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}>")
    router = harness.router(api_key="s3cret", chat_template=str(template), max_model_len=64,
                            served_model_name="custom")
    bad = openai.OpenAI(base_url=router.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(router.url + "/health").status_code == 200  # health checks need no key
    good = openai.OpenAI(base_url=router.url + "/v1", api_key="s3cret", max_retries=0)
    assert [m.id for m in good.models.list().data] == ["custom"]
    good.chat.completions.create(model="custom", messages=[{"role": "user", "content": "yo"}],
                                 max_tokens=2)
    assert list(fake.requests[-1].prompt_token_ids) == ids_of(tokenizer, "[user] yo\n>")
    assert fake.authorization[-1] == "Bearer s3cret"  # the scheduler takes the same key
    with pytest.raises(openai.BadRequestError) as err:
        good.completions.create(model="custom", prompt=[300] * 60, max_tokens=10)
    assert err.value.body["param"] == "max_tokens"


# ----- disconnects -------------------------------------------------------------------------------

def test_stream_disconnect_aborts_the_request(url, fake):
    fake.token_delay_s = 0.05
    body = {"model": "smol", "prompt": "x", "max_tokens": 500, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
    request_id = fake.requests[-1].request_id
    eventually(lambda: request_id in fake.cancelled and request_id in fake.aborts)


def test_non_stream_disconnect_aborts_the_request(url, fake):
    fake.token_delay_s = 0.05
    with pytest.raises(httpx.ReadTimeout):
        # The client gives up 2 s into a 25 s generation (500 tokens, 50 ms apart).
        httpx.post(url + "/v1/chat/completions", timeout=httpx.Timeout(60, read=2),
                   json={"model": "smol", "messages": [{"role": "user", "content": "x"}],
                         "max_tokens": 500, "ignore_eos": True})
    # The explicit Abort is sent after the call is cancelled, without waiting: poll for both.
    eventually(lambda: fake.requests and fake.requests[-1].request_id in fake.cancelled
               and fake.requests[-1].request_id in fake.aborts)
