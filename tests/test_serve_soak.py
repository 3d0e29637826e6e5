"""benchmarks/serve_soak.py, a short run: a few hundred mixed requests against the real server lose nothing.

The benchmark's own checks (answers equal to `python -m pdjax.decode`'s, every bad
request its 4xx, no 5xx, /metrics agreeing with the clients, /health empty at the
end, memory, SIGTERM exit 0) must all pass; on top, each kind of request must have
happened and ended the way it should, counted against the benchmark's own plan.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "serve_soak.py"


def soak_module():
    spec = importlib.util.spec_from_file_location("serve_soak", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_a_short_soak_loses_nothing():
    soak = soak_module()
    args = soak.build_parser().parse_args(["--requests", "260", "--duration", "40", "--window", "10", "--bursts", "2",
                                           "--clients", "12", "--prompts", "8", "--quiet"])
    args.timeout = args.duration + 600
    out = soak.run(args)
    assert out["failures"] == [], out["table"]

    planned = soak.plan(args, args.prompts)
    by_kind = {k: sum(p.kind == k for p in planned) for k in soak.KINDS}
    kinds = out["kinds"]
    assert all(by_kind[k] > 0 for k in soak.KINDS), by_kind  # the short run still has every kind
    for k in (soak.GREEDY_K, soak.GREEDY_S, soak.SAMPLED_K, soak.SAMPLED_S):
        assert kinds[k].answered == by_kind[k] and kinds[k].mismatches == 0, k  # every one answered, as the CLI
        assert kinds[k].sent == by_kind[k] + kinds[k].refused  # each 429 was retried once more
    assert kinds[soak.LEFT].left == by_kind[soak.LEFT]
    assert kinds[soak.BAD].expected_4xx == kinds[soak.BAD].sent == by_kind[soak.BAD]
    burst = kinds[soak.BURST]
    assert burst.sent == by_kind[soak.BURST] == burst.answered + burst.refused and burst.refused > 0
    assert not [s for s in out["statuses"] if s >= 500]
    assert (out["end"]["health"]["running"], out["end"]["health"]["waiting"]) == (0, 0)
    assert out["samples"] >= args.duration / 2  # memory was read through the load

    # the access log: one line per chat request, each naming its request id (the client's where it sent one)
    ids = [re.search(r"request_id=(\S+)", line).group(1) for line in out["access_log"]]
    sent_ids = {p.request_id for p in planned if p.request_id}
    assert sent_ids <= set(ids)
    assert len(ids) == sum(t.sent for t in kinds.values())
