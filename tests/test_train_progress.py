"""The training progress display and metrics log: step and ETA visible at 80 columns, no step logged twice."""

from __future__ import annotations

import io
import json
import re

from rich.console import Console

from pdjax.train.metrics import MetricsLog, truncate_jsonl

METRICS = {
    "loss": 3.14159,
    "ar_loss": 2.5,
    "diffusion_loss": 1.25,
    "grad_norm": 0.5,
    "learning_rate": 2e-3,
    "tokens_per_s": 123456.0,
    "mfu": 0.12,
}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_progress_line_keeps_step_and_eta_at_80_columns():
    clock = [100.0]
    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None, get_time=lambda: clock[0])
    log = MetricsLog(None, progress=True, total_steps=3000, console=console)
    for step in range(10, 60, 10):  # 10 steps a second
        clock[0] += 1.0
        log.write(step, METRICS)
    log.print("saving checkpoint step 50 to /tmp/x ...")
    log.close()
    lines = [ANSI.sub("", part) for line in out.getvalue().splitlines() for part in line.split("\r")]
    lines = [line.rstrip() for line in lines if line.strip()]
    assert "saving checkpoint step 50 to /tmp/x ..." in lines
    final = lines[-1]
    assert len(final) <= 80
    assert "50/3000" in final
    # 2950 steps left at 10 steps/s: 295 s
    assert re.search(r"\b0:04:5\d\b", final), final
    assert "loss 3.142" in final  # metrics come after, cut to fit


def test_truncate_jsonl_keeps_steps_up_to_the_restored_one(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 13)]
    path.write_text("".join(lines) + '{"step": 13, "lo')  # a line cut by a kill
    assert truncate_jsonl(str(path), 10) == 3
    assert path.read_text() == "".join(lines[:10])
    assert truncate_jsonl(str(path), 10) == 0
    assert truncate_jsonl(str(tmp_path / "absent.jsonl"), 3) == 0


def test_a_resumed_log_drops_the_interrupted_runs_later_steps(tmp_path):
    first = MetricsLog(str(tmp_path), tensorboard=False, progress=False)
    for step in range(1, 8):
        first.write(step, {"loss": float(step)})
    first.close()  # "interrupted" after step 7; the checkpoint holds step 5
    second = MetricsLog(str(tmp_path), tensorboard=False, progress=False, start_step=5)
    for step in range(6, 10):
        second.write(step, {"loss": 10.0 + step})
    second.close()
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 10))
    assert [r["loss"] for r in logged] == [1.0, 2.0, 3.0, 4.0, 5.0, 16.0, 17.0, 18.0, 19.0]
