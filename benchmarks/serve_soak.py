"""A soak test of `python -m pdjax.serve` over loopback: a long mixed load that must lose nothing.

Starts the real server on 127.0.0.1 (a free port, an API key, a small --max_queue)
and sends it `--requests` requests paced over `--duration` seconds from `--clients`
concurrent `openai` clients: greedy and sampled requests (fixed seeds), streamed and
not, about 10 % malformed or over-long requests (each with the 4xx it must get),
about 5 % clients that leave mid-stream, and bursts of requests past --max_queue
(429s are the right answer there; paced clients retry a 429 after its Retry-After).
Meanwhile it scrapes /metrics every few seconds, as Prometheus would, and reads
the server's resident memory every second. It checks:
- every greedy and sampled answer (streamed or not) equals `python -m pdjax.decode
  --json` run on the same prompt with the same knobs and seed;
- every malformed request got its 4xx with an OpenAI error object, no request a 5xx,
  every paced well-formed request an answer, every response an `x-request-id`
  (the client's when it sent one, else a fresh one);
- the server's request counter (/metrics) agrees with what the clients saw, status by status;
- at the end /health shows no slot in use and an empty queue;
- the server's resident memory grew by less than 10 % from the first to the last
  `--window` seconds of the load; SIGTERM then stops it with exit status 0.
Prints a table and exits 1 if any check failed. Bounded: a fixed number of
requests, a timeout on each, and `--timeout` on the whole load.

    python benchmarks/serve_soak.py                                  # docs/serve_soak.md: 2,000 requests, 5 minutes
    python benchmarks/serve_soak.py --requests 300 --duration 45 --window 15 --bursts 2    # a short run
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "pdjax" / "assets" / "default_model" / "pd"
MODEL = "pdjax-default"
CHAT = "/v1/chat/completions"

# sampled requests: the request's fields, which are also `python -m pdjax.decode`'s flags (--name value)
SAMPLED = ({"temperature": 0.9, "top_p": 0.9, "seed": 7},
           {"temperature": 0.7, "seed": 11, "steps_ratio": 0.5, "confidence_threshold": 0.6})
GREEDY = {"temperature": 0}

GREEDY_K, GREEDY_S = "greedy", "greedy, streamed"
SAMPLED_K, SAMPLED_S = "sampled", "sampled, streamed"
LEFT, BAD, BURST = "left mid-stream", "malformed / over-long", "burst past --max_queue"
KINDS = (GREEDY_K, GREEDY_S, SAMPLED_K, SAMPLED_S, LEFT, BAD, BURST)
# the paced load's mix (bursts come on top, at fixed times)
MIX = {GREEDY_K: 0.30, GREEDY_S: 0.20, SAMPLED_K: 0.18, SAMPLED_S: 0.17, BAD: 0.10, LEFT: 0.05}


def _chat(**fields: Any) -> bytes:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about the word spring."}], **fields}
    return json.dumps(body).encode()


# (what is wrong, method, body, Authorization header: "key" = the right one, the status it must get)
MALFORMED = (
    ("invalid JSON", "POST", b'{"model": "pdjax-default", "messages": [', "key", 400),
    ("a string temperature", "POST", _chat(temperature="hot"), "key", 400),
    ("no messages", "POST", _chat(messages=[]), "key", 400),
    ("n=2", "POST", _chat(n=2), "key", 400),
    ("steps_ratio 0", "POST", _chat(steps_ratio=0), "key", 400),
    ("max_tokens 0", "POST", _chat(max_tokens=0), "key", 400),
    ("an unknown role", "POST", _chat(messages=[{"role": "robot", "content": "hi"}]), "key", 400),
    ("an unknown model", "POST", _chat(model="gpt-4o"), "key", 404),
    ("an over-long prompt", "POST", _chat(messages=[{"role": "user", "content": "spring " * 200}]), "key", 400),
    ("an over-long system prompt", "POST",
     _chat(messages=[{"role": "system", "content": "summer " * 150}, {"role": "user", "content": "hi"}]), "key", 400),
    ("no API key", "POST", _chat(), None, 401),
    ("a wrong API key", "POST", _chat(), "Bearer not-the-key", 401),
    ("GET on the chat endpoint", "GET", b"", "key", 405),
)
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@dataclasses.dataclass
class Planned:
    """One request of the plan: its kind, when it is sent (seconds after the load starts), what it asks."""

    index: int
    kind: str
    at: float
    prompt: int = 0  # index into the prompts
    sampled: int = -1  # index into SAMPLED; -1: greedy
    bad: int = -1  # index into MALFORMED
    request_id: str | None = None  # sent as x-request-id (every other request), else the server makes one


def plan(args: argparse.Namespace, prompts: int) -> list[Planned]:
    """The whole load, drawn from a fixed seed: paced requests spread over the duration, bursts at fixed times."""
    rng = random.Random(args.seed)
    burst_size = args.burst_size or (args.max_queue + args.batch_size + 24)
    paced = args.requests - args.bursts * burst_size
    if paced < 1:
        raise SystemExit(f"--requests {args.requests} leaves no paced requests beside {args.bursts} bursts of "
                         f"{burst_size}")
    out = []
    kinds, weights = list(MIX), list(MIX.values())
    for i in range(paced):
        kind = rng.choices(kinds, weights)[0]
        p = Planned(i, kind, args.duration * i / paced, prompt=rng.randrange(prompts))
        if kind in (SAMPLED_K, SAMPLED_S):
            p.sampled = rng.randrange(len(SAMPLED))
        if kind == BAD:
            p.bad = rng.randrange(len(MALFORMED))
        out.append(p)
    for b in range(args.bursts):
        at = args.duration * (b + 0.5) / args.bursts
        out += [Planned(0, BURST, at, prompt=rng.randrange(prompts)) for _ in range(burst_size)]
    out.sort(key=lambda p: p.at)
    for i, p in enumerate(out):
        p.index = i
        if i % 2 == 0:
            p.request_id = f"soak-{args.seed}-{i}"
    return out


# ---- the server and the reference --------------------------------------------------------------


def start_server(args: argparse.Namespace, key: str) -> tuple[subprocess.Popen, threading.Event, list[str],
                                                               threading.Thread]:
    """The command as a subprocess (the key through PDJAX_API_KEY, not the process list); its output is kept."""
    cmd = [sys.executable, "-m", "pdjax.serve", "--model", str(MODEL_DIR), "--served_model_name", MODEL,
           "--host", "127.0.0.1", "--port", "0", "--batch_size", str(args.batch_size), "--max_length",
           str(args.max_length), "--chunk", str(args.chunk), "--max_queue", str(args.max_queue)]
    if args.compilation_cache:
        cmd += ["--compilation_cache", args.compilation_cache]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PDJAX_API_KEY": key, "JAX_PLATFORMS": os.environ.get(
        "JAX_PLATFORMS", "cpu"), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's shell has (a test run gives its process eight)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if "pdjax.serve access:" not in line and not args.quiet:
                print("   ", line.rstrip(), flush=True)
            if "serving http://" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return proc, ready, lines, reader


def reference(args: argparse.Namespace, prompts: list[str]) -> dict[tuple[int, int], dict[str, Any]]:
    """`python -m pdjax.decode --json` on every prompt: greedy, and once per SAMPLED knob set.

    Returns {(sampled index or -1, prompt index): the CLI's JSON record}.
    """
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompts.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        env = {**os.environ, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
        env.pop("XLA_FLAGS", None)
        runs = []
        for s, fields in [(-1, GREEDY), *enumerate(SAMPLED)]:  # side by side: each is mostly its compile
            flags = [x for k, v in fields.items() for x in (f"--{k}", str(v))]
            cmd = [sys.executable, "-m", "pdjax.decode", "--json", "--model", str(MODEL_DIR), "--max_length",
                   str(args.max_length), "--prompt-file", str(path), *flags]
            if args.compilation_cache:
                cmd += ["--compilation_cache", args.compilation_cache]
            runs.append((s, flags, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                    env=env)))
        for s, flags, proc in runs:
            try:
                stdout, stderr = proc.communicate(timeout=args.start_timeout)
            except subprocess.TimeoutExpired:
                for _, _, p in runs:
                    p.kill()
                raise SystemExit(f"python -m pdjax.decode {' '.join(flags)} took over {args.start_timeout} s")
            if proc.returncode != 0:
                raise SystemExit(f"python -m pdjax.decode {' '.join(flags)} failed:\n{stderr[-2000:]}")
            records = [json.loads(line) for line in stdout.splitlines()]
            assert [r["prompt"] for r in records] == prompts
            out.update({(s, i): r for i, r in enumerate(records)})
    return out


class Memory(threading.Thread):
    """The server's resident memory (VmRSS of /proc/PID/status), once a second, as (seconds, bytes)."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.samples, self.t0 = pid, [], time.monotonic()
        self.done = threading.Event()

    def rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def run(self) -> None:
        while not self.done.is_set():
            try:
                self.samples.append((time.monotonic() - self.t0, self.rss()))
            except (OSError, RuntimeError):
                return
            self.done.wait(1.0)

    def windows(self, window: float) -> tuple[float, float]:
        """The median RSS of the first and of the last `window` seconds."""
        end = self.samples[-1][0]
        first = [b for t, b in self.samples if t <= window]
        last = [b for t, b in self.samples if t >= end - window]
        return statistics.median(first), statistics.median(last)


# ---- the load ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Kind:
    """What the clients saw for one kind of request."""

    sent: int = 0  # HTTP requests (retries included)
    answered: int = 0
    left: int = 0  # streams the client closed mid-answer
    refused: int = 0  # 429
    expected_4xx: int = 0  # a malformed request's own status
    unexpected: int = 0  # any other status
    server_errors: int = 0  # 5xx
    errors: int = 0  # no HTTP answer (refused connection, reset, timeout)
    mismatches: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)


class Load:
    """Runs the plan against the server and tallies what the clients saw."""

    def __init__(self, args: argparse.Namespace, url: str, key: str, prompts: list[str],
                 want: dict[tuple[int, int], dict[str, Any]]):
        self.args, self.url, self.key, self.prompts, self.want = args, url, key, prompts, want
        self.kinds = {k: Kind() for k in KINDS}
        self.statuses: collections.Counter[int] = collections.Counter()  # every chat HTTP answer, by status
        self.problems: list[str] = []  # the first few, for the report
        self.problem_count = 0
        self.ids_missing = 0
        self.ids_echo_wrong = 0
        self.generated_ids: list[str] = []
        self.unanswered = 0  # paced well-formed requests left without an answer after their retries
        self.scrapes = 0
        self.max_waiting = 0

    def problem(self, what: str) -> None:
        self.problem_count += 1
        if len(self.problems) < 20:
            self.problems.append(what)

    def _ids(self, p: Planned, header: str | None) -> None:
        if not header:
            self.ids_missing += 1
        elif p.request_id is not None:
            self.ids_echo_wrong += header != p.request_id
        else:
            if not GENERATED_ID.fullmatch(header):
                self.ids_echo_wrong += 1
            self.generated_ids.append(header)

    async def run(self) -> float:
        """Send every planned request on time (at most --clients paced ones in flight); returns the wall seconds."""
        import openai

        args = self.args
        pool: asyncio.Queue[Any] = asyncio.Queue()
        clients = [openai.AsyncOpenAI(base_url=self.url, api_key=self.key, max_retries=0, timeout=args.request_timeout)
                   for _ in range(args.clients)]
        for c in clients:
            pool.put_nowait(c)
        burst = openai.AsyncOpenAI(base_url=self.url, api_key=self.key, max_retries=0, timeout=args.request_timeout)
        todo = plan(args, len(self.prompts))
        stop = asyncio.Event()
        scraper = asyncio.create_task(self._scrape_until(stop))
        tasks = []
        t0 = time.monotonic()

        async def paced(p: Planned) -> None:
            client = await pool.get()
            try:
                if p.kind == BAD:
                    await self._malformed(p)
                else:
                    await self._well_formed(client, p)
            finally:
                pool.put_nowait(client)

        for p in todo:
            delay = t0 + p.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(self._well_formed(burst, p) if p.kind == BURST else paced(p)))
        try:
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=max(1.0, args.timeout - (time.monotonic() - t0)))
        except asyncio.TimeoutError:
            self.problem(f"the load did not finish within --timeout {args.timeout} s")
            for t in tasks:
                t.cancel()
        wall = time.monotonic() - t0
        stop.set()
        await scraper
        for c in [*clients, burst]:
            await c.close()
        return wall

    async def _scrape_until(self, stop: asyncio.Event) -> None:
        """Scrape /metrics every --scrape_every seconds, as Prometheus would (each scrape must parse)."""
        while not stop.is_set():
            try:
                families = await self.metrics()
                self.scrapes += 1
                self.max_waiting = max(self.max_waiting, int(families["pdjax_queue_length"][()]))
            except Exception as e:  # noqa: BLE001 — a failed scrape is a finding, not a crash
                self.problem(f"GET /metrics failed: {type(e).__name__}: {e}")
            try:
                await asyncio.wait_for(stop.wait(), self.args.scrape_every)
            except asyncio.TimeoutError:
                pass

    async def metrics(self) -> dict[str, dict[tuple, float]]:
        """GET /metrics, parsed by prometheus_client: {family: {labels as sorted items: value}}."""
        from prometheus_client.parser import text_string_to_metric_families

        status, _, text = await self.http("GET", "/metrics", headers={"authorization": f"Bearer {self.key}"})
        if status != 200:
            raise RuntimeError(f"GET /metrics answered {status}: {text[:200]}")
        out: dict[str, dict[tuple, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    async def http(self, method: str, path: str, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
        """One plain HTTP request (the standard library's, on a thread): status, headers (lower-case), body text."""
        import urllib.error
        import urllib.request

        def call() -> tuple[int, dict[str, str], str]:
            req = urllib.request.Request(self.url.removesuffix("/v1") + path, data=body, headers=headers or {},
                                         method=method)
            try:
                with urllib.request.urlopen(req, timeout=self.args.request_timeout) as r:
                    return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode()

        return await asyncio.to_thread(call)

    async def _well_formed(self, client: Any, p: Planned) -> None:
        """A greedy or sampled request, streamed or not (or left mid-stream): its answer against the CLI's."""
        import openai

        tally = self.kinds[p.kind]
        stream = p.kind in (GREEDY_S, SAMPLED_S, LEFT)
        fields = GREEDY if p.sampled < 0 else SAMPLED[p.sampled]
        want = self.want[(p.sampled, p.prompt)]
        headers = {"x-request-id": p.request_id} if p.request_id else {}
        tries = 1 if p.kind == BURST else self.args.retries
        for attempt in range(tries):
            tally.sent += 1
            t0 = time.perf_counter()
            try:
                text, done = await self._ask(client, p, fields, headers, stream)
            except openai.APIStatusError as e:
                self.statuses[e.status_code] += 1
                self._ids(p, e.response.headers.get("x-request-id"))
                if e.status_code == 429:
                    tally.refused += 1
                    if (e.body or {}).get("code") != "queue_full" or "retry-after" not in e.response.headers:
                        self.problem(f"#{p.index} {p.kind}: a 429 without code queue_full and Retry-After: {e.body}")
                    if attempt + 1 < tries:
                        await asyncio.sleep(float(e.response.headers.get("retry-after", "1")))
                        continue
                elif e.status_code >= 500:
                    tally.server_errors += 1
                    self.problem(f"#{p.index} {p.kind}: {e.status_code} {e.body}")
                else:
                    tally.unexpected += 1
                    self.problem(f"#{p.index} {p.kind}: {e.status_code} {e.body}")
                break
            except openai.APIConnectionError as e:  # a timeout too
                tally.errors += 1
                self.problem(f"#{p.index} {p.kind}: {type(e).__name__}: {e}")
                break
            except openai.APIError as e:  # an error event in a stream: the decoding failed on the server
                tally.server_errors += 1
                self.problem(f"#{p.index} {p.kind}: {type(e).__name__}: {e}")
                break
            except Exception as e:  # noqa: BLE001 — a malformed answer (e.g. a stream without its end) is a finding
                tally.unexpected += 1
                self.problem(f"#{p.index} {p.kind}: {type(e).__name__}: {e}")
                break
            self.statuses[200] += 1
            if not done:  # the client left mid-stream, on purpose
                tally.left += 1
                return
            tally.answered += 1
            tally.latencies.append(time.perf_counter() - t0)
            if text != want["text"]:
                tally.mismatches += 1
                self.problem(f"#{p.index} {p.kind}: prompt {p.prompt} answered {text!r}, the CLI {want['text']!r}")
            return
        if p.kind != BURST:
            self.unanswered += 1
            self.problem(f"#{p.index} {p.kind}: no answer after {tries} tries")

    async def _ask(self, client: Any, p: Planned, fields: dict[str, Any], headers: dict[str, str],
                   stream: bool) -> tuple[str, bool]:
        """The answer text, and whether it was read to the end (a LEFT request closes the stream mid-answer)."""
        messages = [{"role": "user", "content": self.prompts[p.prompt]}]
        if not stream:
            r = await client.chat.completions.create(model=MODEL, messages=messages, extra_body=fields,
                                                     extra_headers=headers)
            self._ids(p, r._request_id)
            return r.choices[0].message.content, True
        s = await client.chat.completions.create(model=MODEL, messages=messages, extra_body=fields,
                                                 extra_headers=headers, stream=True)
        self._ids(p, s.response.headers.get("x-request-id"))
        parts = []
        finished = False
        try:
            async for chunk in s:
                if not chunk.choices:
                    continue
                delta = chunk.choices[0].delta
                parts.append(delta.content or "")
                finished |= chunk.choices[0].finish_reason is not None
                if p.kind == LEFT and (delta.content or (delta.model_extra or {}).get("plan")):
                    return "".join(parts), False  # hang up mid-answer
        finally:
            await s.close()
        if not finished:
            raise RuntimeError(f"#{p.index}: the stream ended without a finish_reason")
        return "".join(parts), True

    async def _malformed(self, p: Planned) -> None:
        """A malformed or over-long request (raw HTTP): it must get its own 4xx with an OpenAI error object."""
        what, method, body, auth, status = MALFORMED[p.bad]
        tally = self.kinds[BAD]
        headers = {"content-type": "application/json"}
        if auth is not None:
            headers["authorization"] = f"Bearer {self.key}" if auth == "key" else auth
        if p.request_id:
            headers["x-request-id"] = p.request_id
        tally.sent += 1
        t0 = time.perf_counter()
        try:
            code, got_headers, text = await self.http(method, CHAT, body or None, headers)
        except OSError as e:  # urllib's URLError too: no HTTP answer
            tally.errors += 1
            self.problem(f"#{p.index} {what}: {type(e).__name__}: {e}")
            return
        tally.latencies.append(time.perf_counter() - t0)
        self.statuses[code] += 1
        self._ids(p, got_headers.get("x-request-id"))
        try:
            error = json.loads(text)["error"]
            shaped = set(error) == {"message", "type", "param", "code"} and bool(error["message"])
        except (ValueError, KeyError, TypeError):
            shaped = False
        if code == status and shaped:
            tally.expected_4xx += 1
        elif code >= 500:
            tally.server_errors += 1
            self.problem(f"#{p.index} {what}: {code} {text[:200]}")
        else:
            tally.unexpected += 1
            self.problem(f"#{p.index} {what}: {code} (want {status} with an OpenAI error) {text[:200]}")


# ---- checks and the table ----------------------------------------------------------------------


async def finish(load: Load, timeout: float) -> dict[str, Any]:
    """/health once the engine has freed every slot (or the timeout passed), and the final /metrics."""
    deadline = time.monotonic() + timeout
    while True:
        health = json.loads((await load.http("GET", "/health"))[2])
        if (health["running"] == 0 and health["waiting"] == 0) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    families = await load.metrics()
    return {"health": health, "metrics": families}


def check(load: Load, end: dict[str, Any], memory: tuple[float, float], wall: float,
          args: argparse.Namespace) -> list[str]:
    """Every failed check, in words (empty: the soak passed)."""
    k = load.kinds
    failures = []
    total = lambda field: sum(getattr(t, field) for t in k.values())  # noqa: E731
    if total("mismatches"):
        failures.append(f"{total('mismatches')} answers differ from python -m pdjax.decode's")
    if total("server_errors"):
        failures.append(f"{total('server_errors')} requests got a 5xx")
    if total("unexpected"):
        failures.append(f"{total('unexpected')} requests got a status other than theirs")
    if total("errors"):
        failures.append(f"{total('errors')} requests got no HTTP answer")
    if load.unanswered:
        failures.append(f"{load.unanswered} paced well-formed requests were never answered")
    if args.bursts and not k[BURST].refused:
        failures.append("no burst went past --max_queue (no 429)")
    if load.ids_missing or load.ids_echo_wrong or len(set(load.generated_ids)) != len(load.generated_ids):
        failures.append(f"x-request-id: {load.ids_missing} missing, {load.ids_echo_wrong} not the client's or not "
                        f"fresh, {len(load.generated_ids) - len(set(load.generated_ids))} repeated")
    health = end["health"]
    if health["running"] or health["waiting"]:
        failures.append(f"/health at the end: {health['running']} slots in use, {health['waiting']} waiting")
    served = {int(dict(labels)["status"]): v for labels, v in end["metrics"]["pdjax_requests_total"].items()
              if dict(labels)["endpoint"] == CHAT}
    seen = dict(load.statuses)
    left = served.pop(499, 0)
    served[200] = served.get(200, 0) + left  # a stream its client left was sent a 200
    if {s: int(v) for s, v in served.items() if v} != {s: v for s, v in seen.items() if v}:
        failures.append(f"/metrics counts {dict(sorted(served.items()))} chat requests by status, the clients saw "
                        f"{dict(sorted(seen.items()))}")
    if any(s >= 500 for s in served):
        failures.append("/metrics counts 5xx responses")
    first, last = memory
    if last > first * 1.10:
        failures.append(f"resident memory grew {100 * (last / first - 1):.1f} % (>= 10 %)")
    if load.problem_count and not failures:
        failures.append(f"{load.problem_count} other problems")
    return failures


def table(load: Load, end: dict[str, Any], memory: tuple[float, float], wall: float,
          args: argparse.Namespace, failures: list[str]) -> str:
    """The report: requests by kind, then server-side counts, memory and throughput."""
    import numpy as np

    burst = args.burst_size or (args.max_queue + args.batch_size + 24)
    lines = [f"{args.requests} requests: {args.requests - args.bursts * burst} paced over {args.duration:.0f} s by "
             f"{args.clients} concurrent openai clients, {args.bursts} bursts of {burst} at once; loopback; server: PD "
             f"model, --batch_size {args.batch_size} --max_queue {args.max_queue} --max_length {args.max_length} "
             f"--chunk {args.chunk}, an API key. sent: HTTP requests (a paced 429 is retried after its Retry-After); "
             f"left: streams closed by their client mid-answer; p50/p99: seconds to the whole answer"]
    head = (f"{'kind':<24} {'sent':>5} {'answered':>8} {'left':>5} {'429':>5} {'4xx ok':>6} {'4xx bad':>7} "
            f"{'5xx':>4} {'no reply':>8} {'mismatch':>8} {'p50 s':>6} {'p99 s':>6}")
    lines += [head, "-" * len(head)]
    rows = list(load.kinds.items())
    everything = Kind()
    for _, t in rows:
        for f in dataclasses.fields(Kind):
            if f.name != "latencies":
                setattr(everything, f.name, getattr(everything, f.name) + getattr(t, f.name))
        everything.latencies += t.latencies
    for name, t in [*rows, ("total", everything)]:
        if name == "total":
            lines.append("-" * len(head))
        p50, p99 = (f"{np.percentile(t.latencies, q):>6.2f}" if t.latencies else f"{'-':>6}" for q in (50, 99))
        lines.append(f"{name:<24} {t.sent:>5} {t.answered:>8} {t.left:>5} {t.refused:>5} {t.expected_4xx:>6} "
                     f"{t.unexpected:>7} {t.server_errors:>4} {t.errors:>8} {t.mismatches:>8} {p50} {p99}")
    health = end["health"]
    m = end["metrics"]
    by_status = {dict(lb)["status"]: int(v) for lb, v in m["pdjax_requests_total"].items() if dict(lb)["endpoint"] == CHAT}
    engine = {dict(lb)["outcome"]: int(v) for lb, v in m["pdjax_engine_requests_total"].items()}
    first, last = memory
    answers = everything.answered
    lines += [
        "",
        f"server /metrics, chat requests by status: {', '.join(f'{s}: {n}' for s, n in sorted(by_status.items()))} "
        f"(499: a client left mid-answer); engine: {engine.get('completed', 0)} completed, "
        f"{engine.get('cancelled', 0)} cancelled, {engine.get('rejected', 0)} refused; "
        f"compiled programs {int(m['pdjax_compiled_programs'][()])}; {load.scrapes} scrapes, longest queue seen "
        f"{load.max_waiting}",
        f"/health at the end: {health['running']} slots in use, {health['waiting']} waiting",
        f"resident memory: median {first / 2**20:.0f} MiB over the first {args.window:.0f} s, {last / 2**20:.0f} MiB "
        f"over the last {args.window:.0f} s: {100 * (last / first - 1):+.1f} %",
        f"wall {wall:.0f} s: {answers} answers, {answers / wall:.2f} answers/s",
        f"summary: {everything.sent} requests over {wall / 60:.1f} min, {sum(t.mismatches for _, t in rows)} "
        f"mismatches, {everything.server_errors} 5xx, {health['running']} slots leaked, resident memory "
        f"{100 * (last / first - 1):+.1f} %, {answers / wall:.2f} answers/s: " + ("PASS" if not failures else "FAIL"),
    ]
    for f in failures:
        lines.append(f"FAILED: {f}")
    for p in load.problems:
        lines.append(f"  {p}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole soak: server, reference, load, checks. Returns the tallies, failures and the table."""
    held = [json.loads(line)["prompt"] for line in (MODEL_DIR / "heldout.jsonl").read_text().splitlines()]
    prompts = held[: args.prompts]
    key = "soak-" + secrets.token_hex(16)
    proc, ready, lines, reader = start_server(args, key)
    try:
        t0 = time.monotonic()
        want = reference(args, prompts)  # while the server loads and compiles
        if not args.quiet:
            print(f"== reference: python -m pdjax.decode on {len(prompts)} prompts x {1 + len(SAMPLED)} knob sets "
                  f"in {time.monotonic() - t0:.0f} s", flush=True)
        if not ready.wait(max(1.0, args.start_timeout - (time.monotonic() - t0))) or proc.poll() is not None:
            raise SystemExit("the server did not start:\n" + "".join(lines[-20:]))
        url = next(x for x in lines if "serving http://" in x).split("serving ")[1].split(" ")[0]
        if not url.startswith("http://127.0.0.1:"):
            raise SystemExit(f"the server is not on loopback: {url}")
        memory = Memory(proc.pid)
        memory.start()
        load = Load(args, url, key, prompts, want)

        async def main() -> tuple[float, dict[str, Any]]:
            wall = await load.run()
            return wall, await finish(load, 60.0)

        if not args.quiet:
            print(f"== load: {args.requests} requests over {args.duration:.0f} s", flush=True)
        wall, end = asyncio.run(main())
        memory.done.set()
        memory.join()
        windows = memory.windows(args.window)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        reader.join(30)
    failures = check(load, end, windows, wall, args)
    if code != 0:
        failures.append(f"the server exited {code} after SIGTERM")
    access = [x for x in lines if "pdjax.serve access:" in x and f"path={CHAT} " in x]
    sent = sum(t.sent for t in load.kinds.values())
    if len(access) != sent:
        failures.append(f"the access log has {len(access)} lines for {CHAT}, the clients sent {sent} requests")
    return {"kinds": load.kinds, "statuses": dict(load.statuses), "end": end, "memory": windows, "wall": wall,
            "failures": failures, "access_log": access, "samples": len(memory.samples),
            "table": table(load, end, windows, wall, args, failures)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=2000, help="requests in all, bursts included (default: 2000)")
    p.add_argument("--duration", type=float, default=300.0, help="seconds the requests are paced over (default: 300)")
    p.add_argument("--clients", type=int, default=24, help="concurrent openai clients of the paced load (default: 24)")
    p.add_argument("--bursts", type=int, default=8, help="bursts past --max_queue, evenly spread (default: 8)")
    p.add_argument("--burst_size", type=int, default=0,
                   help="requests per burst, sent at once (default: max_queue + batch_size + 24)")
    p.add_argument("--window", type=float, default=60.0,
                   help="seconds at the start and at the end of the load whose memory is compared (default: 60)")
    p.add_argument("--prompts", type=int, default=24, help="distinct held-out prompts (default: 24)")
    p.add_argument("--batch_size", type=int, default=8, help="server --batch_size (default: 8)")
    p.add_argument("--max_queue", type=int, default=16, help="server --max_queue (default: 16)")
    p.add_argument("--max_length", type=int, default=128, help="server and reference --max_length (default: 128)")
    p.add_argument("--chunk", type=int, default=16, help="server --chunk (default: 16)")
    p.add_argument("--retries", type=int, default=20,
                   help="tries of a paced well-formed request that gets 429s, each after its Retry-After (default: 20)")
    p.add_argument("--request_timeout", type=float, default=300.0, help="seconds per request (default: 300)")
    p.add_argument("--scrape_every", type=float, default=5.0, help="seconds between /metrics scrapes (default: 5)")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="seconds the whole load may take (default: --duration + 600)")
    p.add_argument("--start_timeout", type=float, default=900.0,
                   help="seconds for the server and the reference to start and finish (default: 900)")
    p.add_argument("--seed", type=int, default=0, help="draws the mix of requests (default: 0)")
    p.add_argument("--compilation_cache", default=None, help="JAX's persistent compilation cache folder")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--json", default=None, help="also write the counts to this JSON file")
    return p


def main() -> int:
    args = build_parser().parse_args()
    if args.requests < 1 or args.duration <= 0 or args.clients < 1 or args.window <= 0 or args.prompts < 1:
        build_parser().error("--requests, --duration, --clients, --window and --prompts must be positive")
    args.timeout = args.timeout or args.duration + 600
    out = run(args)
    print(out["table"], flush=True)
    if args.json:
        kinds = {k: {**dataclasses.asdict(t), "latencies": len(t.latencies)} for k, t in out["kinds"].items()}
        Path(args.json).write_text(json.dumps({"kinds": kinds, "statuses": out["statuses"], "wall": out["wall"],
                                               "memory": out["memory"], "failures": out["failures"]}, indent=1))
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
