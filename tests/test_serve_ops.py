"""The server in production: API keys, GET /metrics, request ids and the access log.

The real command (`python -m pdjax.serve`, two keys in PDJAX_API_KEY) in a subprocess
on 127.0.0.1, with the real `openai` client; its answers are compared with
`python -m pdjax.decode --json` run as a subprocess on the same prompts, and its
/metrics is read with `prometheus_client.parser`. The middleware's own corner cases
(an app that fails, a client that leaves, an unusable client id) are driven without
a socket, and the command's key flags without a model.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from pdjax.cli_errors import UserError  # noqa: E402
from pdjax.decode.cli import DEFAULT_MODEL  # noqa: E402
from pdjax.serve import cli as serve_cli  # noqa: E402
from pdjax.serve.access import AccessMiddleware, KeyCheck, RequestRecord  # noqa: E402

MAX_LENGTH, BATCH = 128, 4
MODEL = "pdjax-default"
KEYS = ("key-one", "key-two")
PROMPTS = [json.loads(line)["prompt"] for line in (DEFAULT_MODEL / "heldout.jsonl").read_text().splitlines()[8:11]]
CHAT = "/v1/chat/completions"


# ---- the real command, and the CLI's answers ------------------------------------------------


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines
        self.root = url.removesuffix("/v1")

    def client(self, key: str = KEYS[0]) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)

    def access(self, request_id: str) -> list[str]:
        """The access log lines naming `request_id` (waiting a little for the first: the log is read on a thread)."""
        deadline = time.monotonic() + 10
        while True:
            found = [x for x in self.lines if "pdjax.serve access:" in x and f"request_id={request_id} " in x]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def http(url: str, method: str = "GET", body: bytes | None = None, key: str | None = None,
         request_id: str | None = None) -> tuple[int, dict[str, str], str]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    if request_id is not None:
        headers["x-request-id"] = request_id
    req = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()


@pytest.fixture(scope="module")
def cli_answers():
    """`python -m pdjax.decode --json --temperature 0` on PROMPTS, started now (it runs while the server compiles)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "pdjax.decode", "--json", "--temperature", "0", "--max_length", str(MAX_LENGTH)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    result: dict[str, dict] = {}

    def get() -> dict[str, dict]:
        if not result:
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            result.update({r["prompt"]: r for r in map(json.loads, out.splitlines())})
        return result

    yield get
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


@pytest.fixture(scope="module")
def server(cli_answers):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1", "PDJAX_API_KEY": ", ".join(KEYS)}
    cmd = [sys.executable, "-m", "pdjax.serve", "--port", "0", "--max_length", str(MAX_LENGTH), "--batch_size",
           str(BATCH), "--chunk", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "serving http://" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    if not ready.wait(900) or proc.poll() is not None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(lines))
    url = next(line for line in lines if "serving http://" in line).split("serving ")[1].split(" ")[0]
    yield Server(proc, url, lines)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    reader.join(30)


def chat(client, prompt: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **kw)


def scrape(server: Server) -> dict[str, dict[tuple, float]]:
    """GET /metrics with the key, parsed by prometheus_client: {sample name: {sorted label items: value}}."""
    status, headers, text = http(server.root + "/metrics", key=KEYS[1])
    assert status == 200 and headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def chat_counts(metrics) -> dict[str, float]:
    return {dict(k)["status"]: v for k, v in metrics["pdjax_requests_total"].items() if dict(k)["endpoint"] == CHAT}


# ---- API keys ---------------------------------------------------------------------------------


def test_the_startup_line_says_keys_are_required(server):
    line = next(line for line in server.lines if "serving http://" in line)
    assert line.rstrip().endswith("API key required (2 keys)")
    assert "GET /metrics" in line
    assert not any("warning" in line for line in server.lines)  # loopback: nothing to warn about


def test_without_the_key_chat_and_models_are_401(server):
    for key in ("none", "wrong-key", KEYS[0] + "x"):  # "none": what a client of a keyless server sends
        client = server.client(key)
        with pytest.raises(openai.AuthenticationError) as e:
            chat(client, PROMPTS[0], temperature=0)
        assert e.value.status_code == 401
        assert e.value.body == {"message": e.value.body["message"], "type": "invalid_request_error", "param": None,
                                "code": "invalid_api_key"}
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    status, headers, body = http(server.url + "/models")
    assert (status, headers["www-authenticate"]) == (401, "Bearer")
    assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    assert http(server.root + "/metrics", key="nope")[0] == 401
    assert http(server.root + "/health")[0] == 200  # a load balancer's probe needs no key


def test_with_either_key_the_answer_equals_the_cli(server, cli_answers):
    want = cli_answers()
    for key, prompt in zip([*KEYS, KEYS[0]], PROMPTS):
        client = server.client(key)
        assert [m.id for m in client.models.list()] == [MODEL]
        answer = chat(client, prompt, temperature=0)
        assert answer.choices[0].message.content == want[prompt]["text"]
        assert answer.usage.completion_tokens == len(want[prompt]["token_ids"])
        assert answer.model_extra["pdjax"]["model_calls"] == want[prompt]["stats"]["model_calls"]


# ---- request ids and the access log ---------------------------------------------------------------


def test_a_client_request_id_comes_back_and_is_logged_with_tokens_and_calls(server, cli_answers):
    want = cli_answers()[PROMPTS[1]]
    raw = server.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPTS[1]}], temperature=0,
        extra_headers={"x-request-id": "trace-42.a"})
    answer = raw.parse()
    assert raw.headers["x-request-id"] == "trace-42.a" and answer._request_id == "trace-42.a"
    [line] = server.access("trace-42.a")
    fields = dict(f.split("=", 1) for f in line.split("pdjax.serve access: ", 1)[1].split()[2:])
    assert (fields["method"], fields["path"], fields["status"], fields["stream"]) == ("POST", CHAT, "200", "0")
    assert int(fields["completion_tokens"]) == answer.usage.completion_tokens == len(want["token_ids"])
    assert int(fields["prompt_tokens"]) == answer.usage.prompt_tokens
    assert int(fields["model_calls"]) == want["stats"]["model_calls"]
    assert 0 < float(fields["ttft_s"]) <= float(fields["latency_s"])


def test_every_response_has_a_request_id_fresh_when_the_client_sent_none(server):
    answers = [http(server.root + "/health"), http(server.url + "/models"), http(server.url + "/models", key=KEYS[0]),
               http(server.url + "/chat/completions", "POST", b"{oops", key=KEYS[0]),
               http(server.root + "/nowhere", key=KEYS[0])]
    assert [a[0] for a in answers] == [200, 401, 200, 400, 404]
    ids = [a[1]["x-request-id"] for a in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and len(set(ids)) == len(ids)
    assert json.loads(answers[4][2])["error"]["code"] == "not_found"  # routing's errors are OpenAI errors too
    for i, status in zip(ids, [200, 401, 200, 400, 404]):
        [line] = server.access(i)
        assert f" status={status} " in line
    # an id that could break a log line is not echoed: the server makes its own
    status, headers, _ = http(server.root + "/health", request_id="two words")
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-request-id"])


# ---- metrics ----------------------------------------------------------------------------------------


def test_metrics_parse_and_count_the_requests_sent(server, cli_answers):
    want = cli_answers()
    before = scrape(server)
    client = server.client(KEYS[1])
    answers = [chat(client, p, temperature=0) for p in PROMPTS]
    streamed = list(chat(client, PROMPTS[0], temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want[PROMPTS[0]]["text"]
    bad = [http(server.url + "/chat/completions", "POST", b"{oops", key=KEYS[0]),
           http(server.url + "/chat/completions", "POST", json.dumps({"model": "other", "messages": [
               {"role": "user", "content": "hi"}]}).encode(), key=KEYS[0]),
           http(server.url + "/chat/completions", "POST", b"{}")]
    assert [b[0] for b in bad] == [400, 404, 401]
    after = scrape(server)

    sent = {"200": len(answers) + 1, "400": 1, "404": 1, "401": 1}
    counts_before, counts_after = chat_counts(before), chat_counts(after)
    assert {s: counts_after[s] - counts_before.get(s, 0) for s in counts_after
            if counts_after[s] != counts_before.get(s, 0)} == sent
    delta = lambda name: after[name][()] - before[name][()]  # noqa: E731
    records = [want[p] for p in PROMPTS] + [want[PROMPTS[0]]]
    assert delta("pdjax_completion_tokens_total") == sum(len(r["token_ids"]) for r in records)
    assert delta("pdjax_prompt_tokens_total") == sum(a.usage.prompt_tokens for a in answers) + answers[0].usage.prompt_tokens
    assert delta("pdjax_model_calls_total") == sum(r["stats"]["model_calls"] for r in records)
    assert delta("pdjax_request_duration_seconds_count") == delta("pdjax_time_to_first_token_seconds_count") == 4
    buckets = after["pdjax_request_duration_seconds_bucket"]
    assert buckets[(("le", "+Inf"),)] == after["pdjax_request_duration_seconds_count"][()]
    engine = {dict(k)["outcome"]: v for k, v in after["pdjax_engine_requests_total"].items()}
    assert engine["completed"] - {dict(k)["outcome"]: v for k, v in before["pdjax_engine_requests_total"].items()}[
        "completed"] == 4
    assert after["pdjax_queue_length"][()] == 0 and after["pdjax_slots_busy"][()] == 0
    assert after["pdjax_slots"][()] == BATCH and after["pdjax_compiled_programs"][()] == 1
    assert after["pdjax_engine_steps_total"][()] > before["pdjax_engine_steps_total"][()]
    assert "pdjax_requests_created" not in after  # the command turns the *_created series off


def test_sigterm_still_exits_0(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=120) == 0


# ---- the middleware without a socket ------------------------------------------------------------------


def drive(app, path: str = "/x", headers: list[tuple[bytes, bytes]] = (), disconnect: bool = False):
    """Run an ASGI app once; returns the messages it sent and the records it ended."""
    ended: list[RequestRecord] = []
    sent: list[dict] = []
    middleware = AccessMiddleware(app, KeyCheck(["k"]), ended.append)
    scope = {"type": "http", "method": "GET", "path": path,
             "headers": [(b"authorization", b"Bearer k"), *headers]}

    async def receive():
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def main():
        try:
            await middleware(scope, receive, send)
        except RuntimeError:
            pass

    asyncio.run(main())
    return sent, ended


def test_an_app_that_fails_answers_500_with_a_request_id_and_counts_it():
    async def failing(scope, receive, send):
        raise RuntimeError("boom")

    sent, [record] = drive(failing, headers=[(b"x-request-id", b"abc")])
    start, body = sent
    assert start["status"] == 500 and (b"x-request-id", b"abc") in start["headers"]
    assert json.loads(body["body"])["error"]["type"] == "server_error"
    assert (record.status_label, record.ended) == (500, True)


def test_a_client_that_leaves_mid_response_is_counted_499():
    async def leaving(scope, receive, send):  # a streamed response whose client went away: no final body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})

    sent, [record] = drive(leaving, path=CHAT, disconnect=True)
    assert record.status == 200 and record.client_left and record.status_label == 499
    assert "status=499" in record.log_line() and "client_left=1" in record.log_line()


def test_key_check_is_bearer_and_exact():
    keys = KeyCheck(["k1", "key-2"])
    assert keys.allows("Bearer k1") and keys.allows("bearer key-2") and keys.allows("  Bearer   k1 ")
    for header in (None, "", "k1", "Basic k1", "Bearer", "Bearer k", "Bearer k1k", "Bearer key-2 x"):
        assert not keys.allows(header), header
    assert KeyCheck([]).allows(None) and not KeyCheck([])
    with pytest.raises(ValueError, match="must not be empty"):
        KeyCheck([""])


# ---- the command's key flags ---------------------------------------------------------------------------


def test_api_keys_come_from_the_flags_else_the_variable():
    assert serve_cli.api_keys(["a", "b"], {"PDJAX_API_KEY": "c"}) == ["a", "b"]
    assert serve_cli.api_keys(None, {"PDJAX_API_KEY": " c , d "}) == ["c", "d"]
    assert serve_cli.api_keys(None, {}) == []
    for value, message in (("", "is set but empty"), (" , ", "is set but empty"),
                           ("a,,b", "key 2 of 3: an API key must not be empty"), ("a b", "no spaces")):
        with pytest.raises(UserError, match=message):
            serve_cli.api_keys(None, {"PDJAX_API_KEY": value})


@pytest.mark.parametrize("argv, env, message", [
    (["--api-key", ""], None, "argument --api-key/--api_key: an API key must not be empty"),
    (["--api-key", "has space"], None, "an API key may hold only letters, digits"),
    ([], "", "pdjax.serve: error: PDJAX_API_KEY is set but empty; unset it to serve without a key"),
])
def test_a_bad_key_is_a_one_line_error(argv, env, message, capsys, monkeypatch):
    if env is None:
        monkeypatch.delenv("PDJAX_API_KEY", raising=False)
    else:
        monkeypatch.setenv("PDJAX_API_KEY", env)
    assert serve_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if ": error: " in line]) == 1


def test_the_startup_notice_warns_only_for_a_reachable_host_without_a_key():
    assert serve_cli.key_notice("0.0.0.0", "0.0.0.0", 0)[1].startswith("--host 0.0.0.0 is reachable")
    assert serve_cli.key_notice("::", "::", 0)[1] is not None
    assert serve_cli.key_notice("0.0.0.0", "0.0.0.0", 1) == ("API key required (1 key)", None)
    assert serve_cli.key_notice("127.0.0.1", "127.0.0.1", 0) == ("no API key (this machine only)", None)
    assert serve_cli.key_notice("localhost", "::1", 0)[1] is None
