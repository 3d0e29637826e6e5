"""`python -m pdjax.serve` and its engine, on the shipped PD model, against `python -m pdjax.decode`.

The expectations come from the decode CLI (`pdjax.decode.cli.main --json`, batch
size 1): every served answer must equal its answer for the same prompt, knobs and
seed. Clients are the real `openai` package on 127.0.0.1. Two servers: the real
command in a subprocess (answers, streaming, errors, 200 concurrent requests,
SIGTERM), and an in-process app over an engine slowed down between chunks, so that
a full queue and a client leaving mid-request happen deterministically.
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import redirect_stdout

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from pdjax.decode import cli as decode_cli  # noqa: E402
from pdjax.decode.cli import DEFAULT_MODEL  # noqa: E402

MAX_LENGTH, BATCH = 128, 4
MODEL = "pdjax-default"
HELDOUT = [json.loads(line)["prompt"] for line in (DEFAULT_MODEL / "heldout.jsonl").read_text().splitlines()[:8]]
PROMPTS = HELDOUT[:6]


# ---- the reference: the decode CLI ---------------------------------------------------------


def assert_answers_equal(eng, single, prompts: list[list[int]], options_list: list, **generate: float) -> None:
    """The engine's answers and call counts are the single (batch-1) decoder's under every options set, and the
    engine compiled one program for all of them (``generate``: e.g. the engine's timeout)."""
    for options in options_list:
        got = eng.generate(prompts, options, **generate)
        want = single.generate(prompts, options)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.stats.model_calls for g in got] == [w.stats.model_calls for w in want]
    assert eng.slots.compiled_programs() == 1


@pytest.fixture(scope="module")
def cli_build():
    """The CLI's own `build` (batch size 1), run once: later CLI runs reuse it (knobs are traced: no recompile)."""
    args = decode_cli.build_parser().parse_args(["--prompt", "x", "--max_length", str(MAX_LENGTH)])
    return decode_cli.build(args, str(DEFAULT_MODEL))


def run_cli(cli_build, monkeypatch, prompts: list[str], *flags: str) -> list[dict]:
    """`python -m pdjax.decode --json` in process: one JSON record per prompt."""
    monkeypatch.setattr(decode_cli, "build", lambda args, path: cli_build)
    argv = ["--json", "--max_length", str(MAX_LENGTH), *flags]
    for p in prompts:
        argv += ["--prompt", p]
    out = io.StringIO()
    with redirect_stdout(out):
        assert decode_cli.main(argv) == 0
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def greedy(cli_build):
    """The CLI's greedy answers to PROMPTS (its real `build`, no patch)."""
    mp = pytest.MonkeyPatch()
    try:
        return {r["prompt"]: r for r in run_cli(cli_build, mp, PROMPTS, "--temperature", "0")}
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def greedy_full(cli_build):
    """The CLI's greedy answers with the nucleus off (--top_p 1): no sort over the vocabulary, a faster load test."""
    mp = pytest.MonkeyPatch()
    try:
        return {r["prompt"]: r for r in run_cli(cli_build, mp, PROMPTS, "--temperature", "0", "--top_p", "1")}
    finally:
        mp.undo()


# ---- servers -------------------------------------------------------------------------------


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, lines: list[str]):
        self.proc, self.url, self.lines = proc, url, lines

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url, api_key="none", max_retries=0, timeout=kw.pop("timeout", 120), **kw)


def start_server(*flags: str, timeout: float = 300.0, before_ready=lambda: None) -> Server:
    """The command in a subprocess; `before_ready` runs while it loads and compiles."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pdjax.serve", "--port", "0", "--max_length", str(MAX_LENGTH), "--batch_size",
           str(BATCH), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "serving http://" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    before_ready()
    if not ready.wait(timeout) or proc.poll() is not None:
        proc.kill()
        pytest.fail("the server did not start:\n" + "".join(lines))
    url = next(line for line in lines if "serving http://" in line).split("serving ")[1].split(" ")[0]
    return Server(proc, url, lines)


@pytest.fixture(scope="module")
def server(request):
    def compile_here():  # the in-process programs compile while the server compiles its own
        for name in ("greedy", "greedy_full", "engine"):
            request.getfixturevalue(name)

    s = start_server("--chunk", "8", "--max_queue", "256", before_ready=compile_here)
    yield s
    if s.proc.poll() is None:
        s.proc.kill()
        s.proc.wait(30)


def chat(client, prompt: str, **kw):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}], **kw)


# ---- the real command ----------------------------------------------------------------------


def test_concurrent_greedy_requests_equal_cli(server, greedy):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
        answers = list(pool.map(lambda p: chat(client, p, temperature=0), PROMPTS))
    for prompt, answer in zip(PROMPTS, answers):
        want = greedy[prompt]
        assert answer.choices[0].message.content == want["text"]
        stats = answer.model_extra["pdjax"]
        assert stats["model_calls"] == want["stats"]["model_calls"]
        assert (stats["rounds"], stats["spans"]) == (want["stats"]["rounds"], want["stats"]["spans"])
        assert answer.usage.completion_tokens == len(want["token_ids"])
        assert answer.choices[0].finish_reason == ("stop" if want["finish_reason"] == "eos" else "length")


def test_sampled_requests_equal_cli_with_same_knobs(server, cli_build, monkeypatch):
    flags = ["--temperature", "0.9", "--top_p", "0.9", "--seed", "7", "--confidence_threshold", "0.6",
             "--alg", "maskgit_plus", "--length_scale", "8"]
    want = run_cli(cli_build, monkeypatch, PROMPTS[:4], *flags)
    client = server.client()
    extra = {"confidence_threshold": 0.6, "alg": "maskgit_plus", "length_scale": 8}
    with cf.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda p: chat(client, p, temperature=0.9, top_p=0.9, seed=7, extra_body=extra),
                            PROMPTS[:4]))
    assert [g.choices[0].message.content for g in got] == [w["text"] for w in want]


def test_streaming_reassembles_to_the_same_text(server, greedy):
    client = server.client()
    for prompt in PROMPTS[:3]:
        chunks = list(chat(client, prompt, temperature=0, stream=True, stream_options={"include_usage": True}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        text = "".join(d.content or "" for d in deltas)
        assert text == greedy[prompt]["text"]
        plan = "".join((d.model_extra or {}).get("plan", "") for d in deltas)
        if greedy[prompt]["stats"]["spans"]:
            assert plan.startswith("<promise>") and "</topic>" in plan  # the plan, as it was written
            first_plan = next(i for i, d in enumerate(deltas) if (d.model_extra or {}).get("plan"))
            first_text = next(i for i, d in enumerate(deltas) if d.content)
            assert first_plan <= first_text
        assert chunks[-1].usage.completion_tokens == len(greedy[prompt]["token_ids"])
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize(
    "body, param",
    [
        ("{not json", None),
        ({"temperature": "hot"}, "temperature"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"n": 2}, "n"),
        ({"steps_ratio": 0}, "steps_ratio"),
        ({"confidence_threshold": 1.5}, "confidence_threshold"),
        ({"alg": "nope"}, "alg"),
        ({"top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "spring " * 200}]}, "messages"),
    ],
)
def test_bad_requests_get_400_with_an_openai_error(server, body, param):
    import urllib.error
    import urllib.request

    if isinstance(body, dict):
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body})
    req = urllib.request.Request(server.url + "/chat/completions", data=body.encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400
    error = json.loads(e.value.read())["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_openai_client_raises_bad_request_for_a_long_prompt(server):
    with pytest.raises(openai.BadRequestError) as e:
        chat(server.client(), "spring " * 200)
    assert e.value.body["code"] == "context_length_exceeded"


def test_200_concurrent_requests_are_each_answered_once(server, greedy_full):
    import asyncio

    before = json.loads(_get(server.url.removesuffix("/v1") + "/health"))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(200)]

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, top_p=1) for p in prompts))
        finally:
            await client.close()

    answers = asyncio.run(main())
    assert len({a.id for a in answers}) == 200
    assert [a.choices[0].message.content for a in answers] == [greedy_full[p]["text"] for p in prompts]
    after = json.loads(_get(server.url.removesuffix("/v1") + "/health"))
    assert after["completed"] - before["completed"] == 200
    assert after["submitted"] - before["submitted"] == 200
    assert after["compiled_programs"] == 1  # prompts, knobs, chunk lengths: one program


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


# ---- the engine without a socket, and an in-process server over it --------------------------


@pytest.fixture(scope="module")
def engine(cli_build):
    from pdjax.decode import DecodeConfig, Decoder
    from pdjax.serve import Engine

    class Slowed(Engine):
        delay = 0.0

        def step(self) -> bool:
            if self.delay:
                time.sleep(self.delay)
            return super().step()

    single, tokenizer, ids = cli_build
    decoder = Decoder(single.forward, eos_id=single.eos_id, ids=ids,
                      config=DecodeConfig(mode="pd", max_length=MAX_LENGTH, batch_size=BATCH))
    engine = Slowed(decoder, chunk=4, max_queue=2)
    engine.warmup()
    return engine, tokenizer


def test_engine_answers_equal_the_decoder_with_one_program(engine, cli_build):
    from pdjax.decode import DecodeOptions
    from pdjax.model.tokenizer import chat_prompt_ids

    eng, tokenizer = engine
    single = cli_build[0]
    prompts = [chat_prompt_ids(tokenizer, p) for p in HELDOUT[:6]]
    assert_answers_equal(eng, single, prompts, [
        DecodeOptions(temperature=0.0), DecodeOptions(temperature=1.0, top_p=None, seed=3, dense=True),
        DecodeOptions(temperature=0.5, steps_ratio=0.5, alg="topk_margin", seed=9, max_new_tokens=50),
        DecodeOptions(temperature=0.3, confidence_threshold=0.6, seed=5)])


@pytest.fixture
def slow_server(engine):
    """The app over the (slowed) engine, served by uvicorn on a thread, on 127.0.0.1."""
    from pdjax.serve.app import create_app

    eng, tokenizer = engine
    eng.delay = 0.1
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(eng, tokenizer, model_name=MODEL, drain_timeout=5), log_level="error")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", eng
    srv.should_exit = True
    thread.join(60)
    eng.delay = 0.0


def test_a_full_queue_answers_429(slow_server, greedy):
    url, eng = slow_server
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)

    def ask(prompt):
        try:
            return chat(client, prompt, temperature=0)
        except openai.RateLimitError as e:
            return e

    # 4 slots and 2 places in the queue: 8 requests at once (each takes > 1 s here) leave some without a place
    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, [PROMPTS[i % 6] for i in range(8)]))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and len(refused) + len(served) == 8
    assert all(r.status_code == 429 and r.body["type"] == "rate_limit_error" for r in refused)
    assert all(s.choices[0].message.content == greedy[PROMPTS[i % 6]]["text"]
               for i, s in enumerate(results) if not isinstance(s, Exception))


def test_a_client_that_disconnects_frees_its_slot(slow_server, greedy):
    url, eng = slow_server
    eng.delay = 0.25  # a request takes > 1.5 s: far longer than the leaving clients wait
    before = eng.stats()
    leaving = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=0.5)
    staying = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)

    def leave(prompt):
        with pytest.raises(openai.APITimeoutError):
            chat(leaving, prompt, temperature=0)

    with cf.ThreadPoolExecutor(5) as pool:
        gone = [pool.submit(leave, p) for p in PROMPTS[:4]]  # they take every slot, then hang up
        time.sleep(0.2)
        queued = pool.submit(chat, staying, PROMPTS[4], temperature=0)  # waits for a slot
        [g.result(timeout=60) for g in gone]
        answer = queued.result(timeout=120)
    assert answer.choices[0].message.content == greedy[PROMPTS[4]]["text"]
    after = eng.stats()
    assert after["cancelled"] - before["cancelled"] == 4  # the four slots were freed, not finished
    assert after["completed"] - before["completed"] == 1


def test_a_stop_string_ends_the_answer_before_it(server, greedy):
    prompt = PROMPTS[0]
    full = greedy[prompt]["text"]
    stop = full.split()[3]  # a word from the middle of the CLI's answer
    client = server.client()
    answer = chat(client, prompt, temperature=0, stop=[stop])
    assert answer.choices[0].message.content == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, prompt, temperature=0, stop=stop,
                                                                         stream=True) if c.choices)
    assert streamed == full[: full.index(stop)]


# ---- last: it stops the server -------------------------------------------------------------


def test_sigterm_drains_requests_in_flight_and_exits_0(server, greedy):
    client = server.client()
    host, port = server.url.removeprefix("http://").removesuffix("/v1").split(":")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(40)]
    health = lambda: json.loads(_get(f"http://{host}:{port}/health"))  # noqa: E731
    base = health()["submitted"]
    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(chat, client, p, temperature=0) for p in prompts]
        deadline = time.monotonic() + 60
        while health()["submitted"] - base < 20 and time.monotonic() < deadline:
            time.sleep(0.02)
        state = health()
        assert state["running"] + state["waiting"] > 0  # SIGTERM finds requests in flight
        server.proc.send_signal(signal.SIGTERM)
        answers = [f.result(timeout=120) for f in futures]
    assert [a.choices[0].message.content for a in answers] == [greedy[p]["text"] for p in prompts]
    assert server.proc.wait(timeout=60) == 0
    with pytest.raises(OSError):
        socket.create_connection((host, int(port)), timeout=5).close()
    assert any("stopped" in line for line in server.lines)


@pytest.mark.parametrize("mode", ["ar", "diffusion"])
def test_engine_answers_equal_the_decoder_in_ar_and_diffusion_modes(mode):
    """The split serving iteration (own calls for prefill / denoising rows, shared plan steps) in the other modes."""
    from pdjax.decode import DecodeConfig, DecodeOptions, Decoder
    from pdjax.model.tokenizer import chat_prompt_ids
    from pdjax.serve import Engine

    args = decode_cli.build_parser().parse_args(["--prompt", "x", "--mode", mode, "--max_length", "96"])
    single, tokenizer, ids = decode_cli.build(args, str(DEFAULT_MODEL.parent / mode))
    decoder = Decoder(single.forward, eos_id=single.eos_id, ids=ids,
                      config=DecodeConfig(mode=mode, max_length=96, batch_size=3))
    eng = Engine(decoder, chunk=3)
    prompts = [chat_prompt_ids(tokenizer, p) for p in HELDOUT[:4]]
    assert_answers_equal(eng, single, prompts, [DecodeOptions(temperature=0.0, max_new_tokens=20),
                                               DecodeOptions(temperature=0.7, seed=4, steps_ratio=0.5, max_new_tokens=16)])


# ---- data-parallel replicas -------------------------------------------------------------------


def test_replicas_answer_as_the_decoder_from_one_queue(cli_build):
    """Two replicas on two (fake CPU) devices, one queue: each request's answer is the single decoder's, both
    replicas serve, and each keeps its state on its own device."""
    import jax

    from pdjax.decode import DecodeConfig, DecodeOptions, Decoder
    from pdjax.model.tokenizer import chat_prompt_ids
    from pdjax.serve import Replicas

    single, tokenizer, ids = cli_build
    devices = jax.local_devices()[:2]
    assert len(devices) == 2, "conftest gives the host 8 devices"
    decoders = []
    for device in devices:
        args = decode_cli.build_parser().parse_args(["--prompt", "x", "--max_length", str(MAX_LENGTH)])
        args.device = device
        model = decode_cli.build(args, str(DEFAULT_MODEL))[0]
        decoders.append(Decoder(model.forward, eos_id=single.eos_id, ids=ids,
                                config=DecodeConfig(mode="pd", max_length=MAX_LENGTH, batch_size=2)))
    pool = Replicas(decoders, devices, chunk=4, max_queue=16)
    pool.warmup()
    prompts = [chat_prompt_ids(tokenizer, p) for p in HELDOUT[:8]]
    pool.start()
    try:
        assert_answers_equal(pool, single, prompts,
                             [DecodeOptions(temperature=0.0), DecodeOptions(temperature=0.8, seed=11, steps_ratio=0.5)],
                             timeout=300)
    finally:
        assert pool.shutdown(drain_timeout=60)
    stats = pool.stats()
    assert (stats["replicas"], stats["completed"], stats["running"], stats["waiting"]) == (2, 16, 0, 0)
    assert all(e.counts["steps"] > 0 for e in pool.engines), "both replicas served requests"
    for engine, device in zip(pool.engines, devices):
        assert {d for leaf in jax.tree.leaves(engine._state) for d in leaf.devices()} == {device}


def test_replicas_beyond_the_local_devices_is_a_one_line_error():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    out = subprocess.run([sys.executable, "-m", "pdjax.serve", "--replicas", "3", "--port", "0"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "--replicas 3 needs 3 local devices; this host has 2" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_server_with_two_replicas_answers_as_the_cli(greedy):
    s = start_server("--replicas", "2", "--chunk", "8")
    try:
        client = s.client()
        with cf.ThreadPoolExecutor(len(PROMPTS)) as pool:
            answers = list(pool.map(lambda p: chat(client, p, temperature=0), PROMPTS))
        assert [a.choices[0].message.content for a in answers] == [greedy[p]["text"] for p in PROMPTS]
        health = json.loads(_get(s.url.removesuffix("/v1") + "/health"))
        assert (health["replicas"], health["completed"], health["compiled_programs"]) == (2, len(PROMPTS), 1)
        assert any("2 replicas x 4" in line for line in s.lines)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(30)


# ---- iteration schedules ----------------------------------------------------------------------


def test_schedule_auto_is_split_on_a_cpu_and_shared_on_an_accelerator():
    from pdjax.decode.slots import resolve_schedule

    assert [resolve_schedule("auto", p) for p in ("cpu", "tpu", "gpu")] == ["split", "shared", "shared"]
    assert [resolve_schedule(s, "tpu") for s in ("split", "shared")] == ["split", "shared"]
    with pytest.raises(ValueError, match="unknown schedule 'fast'"):
        resolve_schedule("fast", "cpu")


def test_shared_schedule_answers_equal_the_decoder_and_lowers_for_tpu(cli_build):
    """One call per iteration over every slot (the accelerator default): the same answers and calls as the CLI's
    decoder, one compiled program, and a serving program that exports for TPU under either schedule."""
    from pdjax.decode import DecodeConfig, DecodeOptions, Decoder
    from pdjax.model.tokenizer import chat_prompt_ids
    from pdjax.serve import Engine

    single, tokenizer, ids = cli_build
    decoder = Decoder(single.forward, eos_id=single.eos_id, ids=ids,
                      config=DecodeConfig(mode="pd", max_length=MAX_LENGTH, batch_size=3))
    eng = Engine(decoder, chunk=5, schedule="shared")
    assert eng.slots.schedule == "shared" and Engine(decoder).slots.schedule == "split"  # auto, on this CPU
    prompts = [chat_prompt_ids(tokenizer, p) for p in HELDOUT[:5]]
    assert_answers_equal(eng, single, prompts, [
        DecodeOptions(temperature=0.0), DecodeOptions(temperature=0.8, seed=7, steps_ratio=0.5, confidence_threshold=0.5)])
    for schedule in ("shared", "split"):
        mlir = Engine(decoder, schedule=schedule).slots.export(["tpu"]).mlir_module()
        assert "while" in mlir
