"""`annotate llm` against a flaky endpoint on 127.0.0.1: refused connections, then 503 with Retry-After, then answers.

Nothing is discarded, the backoff waits are the documented ones (exponential
with jitter, Retry-After honoured), a run that meets too many failures in a row
stops with a one-line message and exit status 1, and a run killed mid-way and
started again ends with every row annotated exactly once. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pdjax.annotate import Annotator, ChatClient, EndpointError, Retry, RunStopped, annotate_file
from pdjax.annotate.__main__ import main
from pdjax.annotate.client import retry_after_seconds, status_kind
from pdjax.synthetic import generate, save_tokenizer, train_tokenizer
from pdjax.synthetic.dataset import tokenizer_corpus

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"id": f"r{i}", "prompt": f"Question {i}?", "response": f"Answer number {i} is here."} for i in range(12)]


def free_port() -> int:
    """A port nobody listens on (yet): connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FlakyEndpoint:
    """A chat-completions server on a fixed port: `unavailable` 503s (with Retry-After), then plain answers.

    The answer is the response itself (a valid annotation without a plan).
    `times` holds the arrival time of every request.
    """

    def __init__(self, port: int, unavailable: int, retry_after: str = "1", delay: float = 0.0):
        self.unavailable = unavailable
        self.times: list[float] = []
        self.answered: list[str] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.times.append(time.monotonic())
                if len(outer.times) <= outer.unavailable:
                    data = b'{"error": "overloaded"}'
                    self.send_response(503)
                    self.send_header("Retry-After", retry_after)
                else:
                    time.sleep(delay)
                    response = body["messages"][1]["content"].split("RESPONSE:\n", 1)[1]
                    outer.answered.append(response)
                    data = json.dumps({"choices": [{"message": {"role": "assistant", "content": response}}]}).encode()
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus(generate(2, 200, 0)[0]))


def write_rows(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_refused_then_503_then_answers_nothing_discarded_backoff_observed(tmp_path, tokenizer):
    port = free_port()
    servers: list[FlakyEndpoint] = []
    waits: list[float] = []

    def sleep(seconds: float) -> None:  # no real waiting; the server comes up after the third refusal
        waits.append(seconds)
        if len(waits) == 3:
            servers.append(FlakyEndpoint(port, unavailable=2, retry_after="7"))

    retry = Retry(base_delay=1.0, max_delay=60.0, jitter=0.5, max_failures=10, sleep=sleep, rng=random.Random(0))
    client = ChatClient(f"http://127.0.0.1:{port}/v1", "m", timeout=5.0)
    src, out = write_rows(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    try:
        summary = annotate_file(src, out, Annotator(client, tokenizer, retry=retry), concurrency=1, progress=False)
    finally:
        for s in servers:
            s.close()
    assert (summary.written, summary.discarded, summary.transport_failures) == (len(ROWS), 0, 5)
    assert not (tmp_path / "out.discarded.jsonl").exists()
    assert sorted(r["id"] for r in read(out)) == sorted(r["id"] for r in ROWS)
    # three refusals: waits of the 1st, 2nd, 3rd retry, 2**(k-1) s times a jitter factor in [0.5, 1]
    for k, wait in enumerate(waits[:3], 1):
        assert 0.5 * 2 ** (k - 1) <= wait <= 2 ** (k - 1), waits
    assert len(set(waits[:3])) == 3
    assert waits[3:] == [7.0, 7.0]  # the two 503s: Retry-After honoured exactly


def test_retry_delays_are_capped_and_jittered():
    retry = Retry(base_delay=0.5, max_delay=4.0, jitter=0.25, rng=random.Random(1))
    delays = [retry.delay(k) for k in range(1, 12)]
    for k, d in enumerate(delays, 1):
        cap = min(4.0, 0.5 * 2 ** (k - 1))
        assert 0.75 * cap <= d <= cap
    assert retry.delay(3, retry_after=30.0) == 30.0 and retry.delay(3, retry_after=9999.0) == 600.0


def annotate_cli(tmp_path: Path, port: int, *extra: str) -> subprocess.Popen:
    args = ["llm", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
            "--tokenizer", str(tmp_path / "tok"), "--model", "m", "--base_url", f"http://127.0.0.1:{port}/v1",
            "--timeout", "5", "--no_progress", *extra]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, "-m", "pdjax.annotate", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_cli_stops_after_failures_in_a_row_then_killed_and_rerun_annotates_every_row_once(tmp_path, tokenizer):
    save_tokenizer(tokenizer, tmp_path / "tok")
    write_rows(tmp_path / "in.jsonl")
    out, report = tmp_path / "out.jsonl", tmp_path / "out.discarded.jsonl"
    port = free_port()
    fast = ("--retry_base_delay", "0.05", "--retry_max_delay", "0.2")

    # 1. nobody listens: 3 refused connections in a row stop the run, one line, exit 1, nothing recorded
    run = annotate_cli(tmp_path, port, *fast, "--max_failures", "3")
    _, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    *retries, last = err.strip().splitlines()
    assert "failed 3 times in a row (last: unreachable" in last and "run the same command again" in last
    assert len(retries) == 2 and all("retrying in" in r and "in a row)" in r for r in retries)
    assert "Traceback" not in err
    assert read(out) == [] and read(report) == []

    # 2. refused for a while, then 503 + Retry-After: 1 twice, then slow answers; killed after 4 rows
    run = annotate_cli(tmp_path, port, *fast, "--concurrency", "1")
    server = None
    try:
        time.sleep(1.0)  # the client meets refused connections meanwhile
        server = FlakyEndpoint(port, unavailable=2, retry_after="1", delay=0.15)
        assert wait_for(lambda: len(read(out)) >= 4, timeout=120), run.communicate(timeout=5)
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=30)
        killed_at = len(read(out))
        assert 4 <= killed_at < len(ROWS)
        gaps = [b - a for a, b in zip(server.times, server.times[1:])]
        assert gaps[0] >= 0.95 and gaps[1] >= 0.95  # each 503's Retry-After: 1 was waited for

        # 3. the same command again finishes the rest
        rerun = annotate_cli(tmp_path, port, *fast, "--concurrency", "3")
        stdout, err = rerun.communicate(timeout=120)
        assert rerun.returncode == 0, err
        assert f"skipped {killed_at} already finished" in stdout and "discarded 0" in stdout
    finally:
        if run.poll() is None:
            run.kill()
        if server is not None:
            server.close()
    ids = [r["id"] for r in read(out)]
    assert sorted(ids) == sorted(r["id"] for r in ROWS)  # every row once: none lost, none twice
    assert read(report) == []
    assert all(r["completion"] == ROWS[int(r["id"][1:])]["response"] for r in read(out))


def test_rules_cli_bad_inputs_are_one_line_errors(tmp_path, tokenizer, capsys):
    save_tokenizer(tokenizer, tmp_path / "tok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n\n{not json\n")
    common = ["--output", str(tmp_path / "o.jsonl"), "--tokenizer", str(tmp_path / "tok")]
    cases = [
        (["--input", str(bad)], f"{bad}:3: not JSON"),
        (["--input", str(tmp_path / "missing.jsonl")], f"--input {tmp_path / 'missing.jsonl'}: no such file"),
        (["--input", str(bad), "--tokenizer", str(tmp_path / "nope")], f"--tokenizer {tmp_path / 'nope'}: no such tokenizer folder"),
    ]
    for args, message in cases:
        assert main(["rules", *common, *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pdjax.annotate: error: ") and message in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.jsonl").exists()  # a bad input line stops before anything is written
    with pytest.raises(Exception, match="not JSON"):
        main(["rules", *common, "--input", str(bad), "--debug"])


class ScriptedChat:
    """A `Chat` that raises the given endpoint errors for some responses and answers the others with the response."""

    def __init__(self, errors: dict[str, EndpointError]):
        self.errors = errors
        self.calls = 0

    def complete(self, messages):
        self.calls += 1
        response = messages[1]["content"].split("RESPONSE:\n", 1)[1]
        if response in self.errors:
            raise self.errors[response]
        return response


def test_http_statuses_are_classified():
    assert [status_kind(c) for c in (408, 429, 500, 503, 599)] == ["transient"] * 5
    assert [status_kind(c) for c in (401, 403, 404)] == ["fatal"] * 3
    assert [status_kind(c) for c in (400, 413, 422)] == ["rejected"] * 3
    assert retry_after_seconds("3") == 3.0 and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0


def test_a_request_refused_for_one_row_discards_that_row_only(tmp_path, tokenizer):
    src, out = write_rows(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    chat = ScriptedChat({ROWS[3]["response"]: EndpointError("http-400", "prompt too long", kind="rejected")})
    summary = annotate_file(src, out, Annotator(chat, tokenizer), concurrency=2, progress=False)
    assert (summary.written, summary.discarded, dict(summary.reasons)) == (len(ROWS) - 1, 1, {"http-400": 1})
    assert [r["id"] for r in read(tmp_path / "out.discarded.jsonl")] == ["r3"]


def test_wrong_endpoint_settings_stop_the_run_at_once(tmp_path, tokenizer):
    src, out = write_rows(tmp_path / "in.jsonl"), tmp_path / "out.jsonl"
    chat = ScriptedChat({r["response"]: EndpointError("http-401", "bad key", kind="fatal") for r in ROWS})
    with pytest.raises(RunStopped, match=r"refuses the request \(http-401: bad key\): check --base_url"):
        annotate_file(src, out, Annotator(chat, tokenizer), concurrency=1, progress=False)
    assert chat.calls == 1 and read(out) == [] and not (tmp_path / "out.discarded.jsonl").exists()
