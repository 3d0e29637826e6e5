"""The LLM annotator against a fake OpenAI-compatible server on 127.0.0.1: good, malformed, slow answers; resume."""

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdjax.annotate import Annotator, ChatClient, Retry, RunStopped, annotate_file
from pdjax.annotate.__main__ import main
from pdjax.annotate.instructions import SYSTEM
from pdjax.annotate.rows import finished_ids
from pdjax.synthetic import generate, save_tokenizer, train_tokenizer
from pdjax.synthetic.dataset import tokenizer_corpus

P = "<promise>-<topic>{} {}</topic>"
TIMEOUT = 0.4

# response -> (behaviour, good annotation)
ROWS = {
    "good": ("Tea is calm.\nCoffee is strong.", "good",
             P.format("tea", 1) + P.format("coffee", 1) + "<async>Tea is calm.\n</async><async>Coffee is strong.</async>"),
    "plain": ("Hello! How can I help?", "good", "Hello! How can I help?"),
    "fixed": ("Red is warm. Blue is cold.", "bad-then-good",
              P.format("red", 1) + P.format("blue", 1) + "<async>Red is warm.</async><async> Blue is cold.</async>"),
    "bad": ("One. Two.", "always-bad", None),
    "slow": ("Cats purr. Dogs bark.", "slow",
             P.format("cats", 1) + P.format("dogs", 1) + "<async>Cats purr.</async><async> Dogs bark.</async>"),
    "changed": ("Rain falls. Snow melts.", "changed", None),
    "fenced": ("Up is high. Down is low.", "fenced",
               P.format("up", 9) + P.format("down", 1) + "<async>Up is high.</async><async> Down is low.</async>"),
    "lies": ("A long answer. " * 12, "good",  # a dishonest length, corrected from the spans
             P.format("answer", 1) + P.format("end", 1) + "<async>" + "A long answer. " * 11 + "</async><async>A long answer. </async>"),
}  # fmt: skip
MALFORMED = P.format("one", 1) + "<async>One.</async><async> Two.</async>"  # 1 promise, 2 spans


class FakeEndpoint:
    """A chat-completions server whose answer depends on the RESPONSE in the request."""

    def __init__(self):
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.slow = True
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.headers.append(dict(self.headers))
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                msgs = body["messages"]
                response = msgs[1]["content"].split("RESPONSE:\n", 1)[1]
                _, behaviour, good = next(v for v in ROWS.values() if v[0] == response)
                if behaviour == "slow" and outer.slow:
                    time.sleep(TIMEOUT * 3)
                if behaviour == "always-bad" or (behaviour == "bad-then-good" and len(msgs) == 2):
                    answer = MALFORMED
                elif behaviour == "changed":
                    answer = "Rain falls. Snow rises."
                elif behaviour == "fenced":
                    answer = "```\n" + good + "\n```"
                else:
                    answer = good
                reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}
                data = json.dumps(reply).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(tokenizer_corpus(generate(2, 200, 0)[0]))


@pytest.fixture()
def endpoint():
    with FakeEndpoint() as fake:
        yield fake


def honest(annotation: str, tokenizer) -> str:
    """The annotation with each promise number = ceil(span tokens / 10), counted by the `tokenizers` backend."""
    spans = re.findall(r"<async>(.*?)</async>", annotation, re.S)
    numbers = iter(math.ceil(len(tokenizer.backend_tokenizer.encode(s, add_special_tokens=False).ids) / 10) for s in spans)
    return re.sub(r"(<promise>-<topic>[a-z ]+ )\d+", lambda m: m.group(1) + str(next(numbers)), annotation)


def write_rows(path, names):
    path.write_text("".join(json.dumps({"id": n, "prompt": f"Q {n}?", "response": ROWS[n][0]}) + "\n" for n in names))


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_annotate_validate_retry_and_resume(tmp_path, tokenizer, endpoint):
    src, out, report = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "out.discarded.jsonl"
    write_rows(src, list(ROWS))
    client = ChatClient(endpoint.url, "fake-model", api_key="k", timeout=TIMEOUT)
    annotator = Annotator(client, tokenizer, max_attempts=2, retry=Retry(base_delay=0.01, max_delay=0.02, max_failures=3))
    # the slow row times out again and again: a transport failure, never a discard; the run stops after 3 in a row
    with pytest.raises(RunStopped, match=r"failed 3 times in a row \(last: timeout.*1 row\(s\) not yet annotated") as stopped:
        annotate_file(src, out, annotator, concurrency=4, progress=False)
    summary = stopped.value.summary
    assert (summary.written, summary.discarded, summary.skipped, summary.transport_failures) == (5, 2, 0, 3)
    assert summary.reasons == {"span-count-mismatch": 1, "content-changed": 1}

    written = {r["id"]: r for r in read(out)}
    assert set(written) == {"good", "plain", "fixed", "fenced", "lies"}
    assert written["good"]["completion"] == honest(ROWS["good"][2], tokenizer) and written["good"]["attempts"] == 1
    assert written["good"]["prompt"] == "Q good?"
    assert written["plain"]["completion"] == "Hello! How can I help?"
    assert written["fixed"]["attempts"] == 2
    # lengths are recounted from the spans ('up 9' and 'answer 1' were wrong)
    assert written["fenced"]["completion"] == honest(ROWS["fenced"][2], tokenizer)
    assert written["fenced"]["completion"].startswith(P.format("up", 1))
    assert written["lies"]["completion"] == honest(ROWS["lies"][2], tokenizer)
    assert int(re.search(r"answer (\d+)", written["lies"]["completion"])[1]) >= 4
    changed = sum(honest(ROWS[k][2], tokenizer) != ROWS[k][2] for k in written)
    assert summary.lengths_changed >= changed >= 2

    discarded = {r["id"]: r for r in read(report)}
    assert set(discarded) == {"bad", "changed"}  # only answers that fail validation
    assert discarded["bad"]["reason"] == "span-count-mismatch" and discarded["bad"]["attempts"] == 2
    assert discarded["bad"]["last_answer"] == MALFORMED
    assert discarded["changed"]["reason"] == "content-changed"

    # the request format, and the feedback sent after a rejected answer
    first = endpoint.requests[0]
    assert first["model"] == "fake-model" and first["messages"][0] == {"role": "system", "content": SYSTEM}
    assert endpoint.headers[0]["Authorization"] == "Bearer k"
    retry = next(r for r in endpoint.requests if len(r["messages"]) == 4 and "Red is warm" in r["messages"][1]["content"])
    assert retry["messages"][2] == {"role": "assistant", "content": MALFORMED}
    assert "number of spans in a group differs" in retry["messages"][3]["content"]

    # once the endpoint is fast again, a re-run annotates exactly the row it stopped at
    endpoint.slow = False
    summary = annotate_file(src, out, annotator, concurrency=4, progress=False)
    assert (summary.written, summary.discarded, summary.skipped) == (1, 0, 7)
    assert {r["id"] for r in read(out)} == {"good", "plain", "fixed", "fenced", "lies", "slow"}

    # a re-run skips everything finished, written or discarded: no request at all
    before = len(endpoint.requests)
    summary = annotate_file(src, out, annotator, concurrency=4, progress=False)
    assert (summary.written, summary.discarded, summary.skipped) == (0, 0, len(ROWS))
    assert len(endpoint.requests) == before

    # retrying the discarded rows: still rejected, the report describes this run's discards only
    summary = annotate_file(src, out, annotator, concurrency=4, progress=False, retry_discarded=True)
    assert (summary.written, summary.discarded, summary.skipped) == (0, 2, 6)
    assert sorted(r["id"] for r in read(report)) == ["bad", "changed"]


def test_resume_after_an_interrupted_run(tmp_path, tokenizer, endpoint):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_rows(src, ["good", "plain", "fixed"])
    row = {"id": "good", "prompt": "Q good?", "completion": ROWS["good"][2], "attempts": 1}
    out.write_text(json.dumps(row) + "\n" + '{"id": "plain", "prompt": "Q pl')  # killed mid-line
    annotator = Annotator(ChatClient(endpoint.url, "m", timeout=TIMEOUT), tokenizer, max_attempts=2)
    summary = annotate_file(src, out, annotator, concurrency=2, progress=False)
    assert (summary.written, summary.skipped) == (2, 1)
    assert [r["id"] for r in read(out)][0] == "good" and finished_ids(out) == {"good", "plain", "fixed"}
    asked = {r["messages"][1]["content"].split("RESPONSE:\n")[1] for r in endpoint.requests}
    assert ROWS["good"][0] not in asked


def test_llm_cli_reads_the_endpoint_from_the_environment(tmp_path, tokenizer, endpoint, monkeypatch):
    save_tokenizer(tokenizer, tmp_path / "tok")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps({"instruction": "Q?", "output": ROWS["good"][0]}) + "\n")
    monkeypatch.setenv("OPENAI_BASE_URL", endpoint.url)
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    args = ["llm", "--input", str(src), "--output", str(out), "--tokenizer", str(tmp_path / "tok"), "--model", "m",
            "--prompt_field", "instruction", "--response_field", "output", "--no_progress"]  # fmt: skip
    assert main(args) == 0
    assert [r["completion"] for r in read(out)] == [honest(ROWS["good"][2], tokenizer)]
    assert endpoint.headers[-1]["Authorization"] == "Bearer secret"
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    assert main(args[:-7] + args[-5:]) == 2  # no model anywhere: a clear error, exit code 2
