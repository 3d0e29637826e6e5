"""`python -m pdjax.aot`: Cloud TPU names, the report's arithmetic and verdicts, bad input, and real TPU compiles.

The compiles run libtpu in their own processes (this test process is pinned to 8 fake CPU devices);
the Dream-7B ones take minutes each on 2 cores, so they are few and marked slow.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdjax.aot import topology
from pdjax.aot.report import CompileReport, compile_lowered
from pdjax.memory import GiB, MemoryEstimate

ROOT = Path(__file__).resolve().parent.parent
needs_libtpu = pytest.mark.skipif(not topology.libtpu_available(), reason="libtpu not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("accelerator, grid, chips, hbm", [
    ("v4-8", "v4:2x2x1", 4, 32 * GiB), ("v4-128", "v4:4x4x4", 64, 32 * GiB), ("v4-256", "v4:4x4x8", 128, 32 * GiB),
    ("v5p-32", "v5p:2x2x4", 16, 95e9), ("v5p-12288", "v5p:16x16x24", 6144, 95e9),
    ("v5litepod-1", "v5e:1x1", 1, 16e9), ("v5litepod-16", "v5e:4x4", 16, 16e9), ("v5litepod-128", "v5e:8x16", 128, 16e9),
    ("v6e-1", "v6e:1x1", 1, 32e9), ("v6e-8", "v6e:2x4", 8, 32e9), ("v6e-256", "v6e:16x16", 256, 32e9),
])
def test_cloud_tpu_names_to_topologies(accelerator, grid, chips, hbm):
    t = topology.target(accelerator)
    assert (t.topology, t.chips, t.hbm_bytes) == (grid, chips, hbm)
    dims = [int(d) for d in grid.split(":")[1].split("x")]
    assert dims[0] * dims[1] * (dims[2] if len(dims) > 2 else 1) == chips


@pytest.mark.parametrize("bad", ["v6e-2", "v5p-7", "v5e-8", "tpu-8", "v6e", "v6e-x"])
def test_unknown_accelerators_are_one_line_errors(bad, capsys):
    from pdjax.aot.cli import main

    assert main(["decode", "--model", "dream_7b", "--topology", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: argument --topology:" in err.splitlines()[-1] and bad in err.splitlines()[-1]  # argparse's usage + line
    assert "Traceback" not in err


def test_missing_config_and_missing_libtpu_are_one_line_errors(capsys, monkeypatch):
    from pdjax.aot.cli import main

    assert main(["train", "--config", "configs/nope.yaml", "--topology", "v5p-32"]) == 2
    assert "configs/nope.yaml: no such file" in capsys.readouterr().err
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    assert main(["decode", "--model", "dream_7b", "--topology", "v6e-1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs libtpu" in err[0] and "pip install" in err[0]


def _report(**terms) -> CompileReport:
    base = dict.fromkeys(("arguments", "outputs", "aliased", "temporaries", "code"), 0)
    return CompileReport("a step", topology.target("v5litepod-1"), 1.0, {**base, **terms})


def test_report_total_verdict_and_largest_term():
    fits = _report(arguments=10 * GiB, outputs=2 * GiB, aliased=2 * GiB, temporaries=int(1.5 * GiB), code=2**20)
    assert fits.total == 10 * GiB + int(1.5 * GiB) + 2**20 and fits.fits and fits.reason() == ""
    big = _report(arguments=6 * GiB, temporaries=9 * GiB)  # 15 GiB > 16 GB = 14.9 GiB
    assert not big.fits and big.largest() == ("temporaries", 9 * GiB)
    assert "largest term: temporaries 9.00 GiB" in big.reason() and "v5litepod-1" in big.reason()
    data = big.to_json()
    assert data["fits"] is False and data["total_bytes"] == 15 * GiB and data["hbm_bytes"] == 16 * 10**9
    assert "does not fit" in big.table()


def test_compiler_out_of_memory_is_a_verdict_and_other_errors_raise():
    class Lowered:
        def __init__(self, message):
            self.message = message

        def compile(self):
            raise RuntimeError(self.message)

    oom = "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (32.00G) " \
          "exceeds available HBM (15.75G)."
    report = compile_lowered(Lowered(oom), "a step", topology.target("v5litepod-1"),
                             MemoryEstimate("training", (("x", 1.0),)))
    assert not report.fits and "HLO temporaries (32.00G)" in report.reason()
    assert report.to_json()["total_bytes"] is None and report.to_json()["estimate_bytes"] == 1
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        compile_lowered(Lowered("INVALID_ARGUMENT: bad shape"), "a step", topology.target("v6e-1"))


def _aot(*args: str, timeout: int = 1500) -> subprocess.CompletedProcess:
    """`python -m pdjax.aot ... --json` as a user runs it (it compiles in its own libtpu process)."""
    return subprocess.run([sys.executable, "-m", "pdjax.aot", *args, "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@needs_libtpu
def test_decode_of_the_shipped_model_compiles_for_a_v6e_chip():
    proc = _aot("decode", "--model", "pdjax/assets/default_model/pd", "--topology", "v6e-1", "--max_length", "128",
                "--buckets", "128")  # one call width: the cheapest compile
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["fits"] and report["topology"] == "v6e:1x1" and report["hbm_bytes"] == 32 * 10**9
    terms = report["terms"]
    assert report["total_bytes"] == (terms["arguments"] + terms["outputs"] - terms["aliased"] + terms["temporaries"]
                                     + terms["code"])
    # the shipped model's weights are what its config.json says they are
    assert terms["arguments"] >= report["estimate_terms"]["weights"]
    assert report["cost"]["flops"] > 0 and report["compile_s"] > 0 and report["compile_cpu_s"] > 0


def test_the_notebooks_compiled_memory_check_runs_on_any_backend():
    """`compiled_decode_bytes` (the decode notebook's check on a TPU runtime) on this CPU: the program's bytes,
    at least the weights of the shipped model it reads the shape of."""
    import jax

    from pdjax.aot.programs import compiled_decode_bytes, resolve_model

    folder = str(ROOT / "pdjax" / "assets" / "default_model" / "pd")
    need = compiled_decode_bytes(folder, jax.devices("cpu")[0], batch_size=1, max_length=64, buckets=(32,))
    spec = resolve_model(folder)
    assert spec.ids is not None and need >= spec.config.num_params * spec.config.param_dtype.itemsize
