"""attnlab bench: statistics, FLOP counts, the worker's failure rows, and the real console script end to end
(table, --json, --plot, bad options). Sizes are tiny and --threads 1 so that it stays fast on a busy
2-core machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab import variants as V
from attnlab.bench import DEFAULT, QUICK, attention_flops, summarize, worker
from attnlab.bench.stats import matmul_flops, percentile
from attnlab.variants import VARIANTS

ATTNLAB = shutil.which("attnlab", path=str(Path(sys.executable).parent)) or shutil.which("attnlab")
TINY = ["--quick", "--batch", "1", "--tokens", "16", "--width", "32", "--heads", "2", "--repeats", "2",
        "--warmup", "1", "--threads", "1", "--no-progress"]
TIMEOUT = 600


def _attnlab(*args: str | Path) -> subprocess.Popen:
    assert ATTNLAB is not None, "the attnlab console script is not installed next to this python"
    return subprocess.Popen(
        [ATTNLAB, "bench", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "COLUMNS": "200"},
    )


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=TIMEOUT)
    return proc.returncode, out, err


def parse_table(stdout: str) -> dict[str, list[str]]:
    """Rows of the rich table, by variant name: the cells between the │ separators."""
    rows: dict[str, list[str]] = {}
    for line in stdout.splitlines():
        if "│" not in line:
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells and cells[0] in VARIANTS:
            rows[cells[0]] = cells
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def test_summary_median_and_iqr():
    s = summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.q1, s.q3, s.min, s.max) == (5, 3.0, 2.0, 4.0, 1.0, 5.0)
    assert s.iqr == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert summarize([7.0]).iqr == 0.0
    with pytest.raises(ValueError, match="zero samples"):
        summarize([])


def test_flop_count_formula():
    # B=1, T=2, d_in=d_out=2, H=1: projections 2·1·2·2·2·3 + 2·1·2·2·2 = 64; causal pairs 3:
    # attention 4·1·3·2 = 24.
    assert attention_flops(1, 2, 2, 2, 1) == 88
    assert attention_flops(1, 2, 2, 2, 1, backward=True) == 3 * 88
    assert attention_flops(1, 2, 2, 2, 1, causal=False) == 64 + 4 * 4 * 2
    assert matmul_flops(10) == 2000


def test_defaults_are_the_notebook_setting():
    assert (DEFAULT.batch, DEFAULT.tokens, DEFAULT.width, DEFAULT.heads, DEFAULT.dtype) == (8, 1024, 768, 12, "float32")
    assert DEFAULT.baseline == "ch03"
    assert QUICK.tokens * QUICK.width < DEFAULT.tokens * DEFAULT.width


# --------------------------------------------------------------------------------------------------
# The worker turns failures into rows
# --------------------------------------------------------------------------------------------------


class _Conn:
    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def close(self) -> None:
        pass


CFG = {"batch": 1, "tokens": 8, "width": 8, "heads": 2, "dtype": "float32", "device": "cpu", "mode": "fwd",
       "compile": False, "repeats": 2, "warmup": 1, "threads": None, "seed": 0}


def _result(conn: _Conn) -> dict:
    kind, payload = conn.sent[-1]
    assert kind == "result"
    return payload


def test_worker_times_a_variant():
    conn = _Conn()
    worker.measure_variant(CFG, "sdpa", conn)
    res = _result(conn)
    assert res["status"] == "ok"
    assert len(res["times_s"]) == 2 and all(t > 0 for t in res["times_s"])
    assert res["peak_mem_bytes"] >= 0
    assert [m for m in conn.sent if m[0] == "tick"] == [("tick", None)] * 3


def test_worker_reports_unavailable_variant(monkeypatch):
    monkeypatch.setattr(V, "_flex_unavailable_reason", lambda: "simulated: no FlexAttention here")
    conn = _Conn()
    worker.measure_variant(CFG, "flex", conn)
    res = _result(conn)
    assert res["status"] == "unavailable"
    assert res["note"] == "variant 'flex' is unavailable: simulated: no FlexAttention here"


def test_worker_reports_out_of_memory(monkeypatch):
    class Hungry(torch.nn.Module):
        def __init__(self, *args) -> None:
            super().__init__()

        def forward(self, x):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setitem(VARIANTS, "hungry", Hungry)
    conn = _Conn()
    worker.measure_variant(CFG, "hungry", conn)
    res = _result(conn)
    assert res["status"] == "out of memory"
    assert "can't allocate memory" in res["note"]


def test_worker_measures_matmul():
    conn = _Conn()
    worker.measure_matmul(CFG, 64, conn)
    res = _result(conn)
    assert res["status"] == "ok" and res["n"] == 64 and min(res["times_s"]) > 0


# --------------------------------------------------------------------------------------------------
# The console script, end to end (all launched at once, then checked)
# --------------------------------------------------------------------------------------------------

# Through the real console script (a fresh process each: exit code, no traceback, one line).
BAD = {
    "unknown_variant": (["--variants", "ch03,nope"], "unknown variant 'nope' in --variants; valid names: ch03_wrapper"),
    "bad_dtype": (["--dtype", "float8"], "invalid choice: 'float8'"),
    "json_exists": (["--json", "{existing}"], "already exists; pass --force"),
}
# Through attnlab.cli.main in this process (the same code, without paying for a new process each).
BAD_IN_PROCESS = {
    "heads_not_dividing": (["--width", "32", "--heads", "5"], "--heads 5 does not divide --width 32"),
    "zero_repeats": (["--repeats", "0"], "expected a positive integer, got 0"),
    "negative_warmup": (["--warmup", "-1"], "expected an integer >= 0, got -1"),
    "cuda_missing": (["--device", "cuda"], "CUDA is not available"),
    "plot_not_png": (["--plot", "{tmp}/chart.jpg"], "give a .png file name"),
    "plot_exists": (["--plot", "{existing}"], "already exists; pass --force"),
    "plot_dir_missing": (["--plot", "{tmp}/no/such/dir/chart.png"], "does not exist"),
    "bad_baseline": (["--baseline", "nope"], "unknown --baseline 'nope'"),
    "empty_variants": (["--variants", ","], "in --variants; valid names"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    existing = tmp / "existing.json"
    existing.write_text("keep me\n")
    procs = {
        "quick": _attnlab(*TINY, "--json", tmp / "r.json", "--plot", tmp / "r.png"),
        "fwd_bwd": _attnlab(*TINY, "--mode", "fwd+bwd", "--variants", "ch03,flex,attnlab"),
    }
    for key, (args, _) in BAD.items():
        procs[key] = _attnlab(*TINY, *[a.format(existing=existing, tmp=tmp) for a in args])
    done = {key: _finish(proc) for key, proc in procs.items()}
    return tmp, existing, done


def test_quick_table_has_every_variant(runs):
    _, _, done = runs
    rc, out, err = done["quick"]
    assert rc == 0, err
    assert "Traceback" not in err
    for header in ("median (ms)", "IQR (ms)", "peak mem (MiB)", "GFLOP/s", "% of matmul", "speed vs ch03 (×)"):
        assert header in out
    rows = parse_table(out)
    assert list(rows) == list(VARIANTS)
    for name, cells in rows.items():
        assert number(cells[1]) > 0, (name, cells)
        assert number(cells[4]) > 0, (name, cells)
    assert rows["ch03"][6] == "1.00"
    assert "IQR (ms): spread = 75th minus 25th percentile" in out  # the legend
    assert "load average" in out


def test_quick_json(runs):
    tmp, _, done = runs
    assert done["quick"][0] == 0
    data = json.loads((tmp / "r.json").read_text())
    assert data["config"]["tokens"] == 16 and data["config"]["repeats"] == 2
    assert data["flops_per_call"] == attention_flops(1, 16, 32, 32, 2)
    assert data["matmul"]["gflops"] > 0
    results = {r["name"]: r for r in data["results"]}
    assert list(results) == list(VARIANTS)
    for name, r in results.items():
        assert r["status"] == "ok", (name, r)
        assert len(r["times_s"]) == 2
        assert r["summary"]["median"] > 0 and r["summary"]["q1"] <= r["summary"]["q3"]
        assert r["peak_mem_bytes"] >= 0 and r["gflops"] > 0 and r["frac_of_matmul"] > 0
    assert results["ch03"]["speedup"] == 1.0
    sdpa = results["sdpa"]
    # the same float64 division on both sides: approx's 1e-6 only absorbs a JSON decimal round trip
    assert sdpa["speedup"] == pytest.approx(results["ch03"]["summary"]["median"] / sdpa["summary"]["median"])


def test_quick_plot_is_a_real_png(runs):
    import matplotlib.image

    tmp, _, done = runs
    assert done["quick"][0] == 0
    img = matplotlib.image.imread(tmp / "r.png")
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    colours = np.unique(img.reshape(-1, img.shape[-1]), axis=0)
    assert len(colours) > 10  # not one colour: bars, text, axes


def test_unavailable_variant_is_a_row_and_the_run_goes_on(runs):
    _, _, done = runs
    rc, out, err = done["fwd_bwd"]
    assert rc == 0, err
    rows = parse_table(out)
    assert number(rows["ch03"][1]) > 0 and number(rows["attnlab"][1]) > 0
    assert rows["flex"][1] == "—"
    assert rows["flex"][7].startswith("unavailable: variant 'flex' is unavailable for training")


@pytest.mark.parametrize("case", list(BAD))
def test_bad_options_exit_2_with_one_line(runs, case):
    _, existing, done = runs
    if case == "cuda_missing" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    rc, out, err = done[case]
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert BAD[case][1] in lines[0]
    assert existing.read_text() == "keep me\n"  # nothing the user gave is lost


@pytest.mark.parametrize("case", list(BAD_IN_PROCESS))
def test_bad_options_in_process(tmp_path, capsys, case):
    from attnlab.cli import main

    if case == "cuda_missing" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    existing = tmp_path / "existing.png"
    existing.write_bytes(b"keep me")
    args, message = BAD_IN_PROCESS[case]
    argv = ["bench", *TINY, *[a.format(existing=existing, tmp=tmp_path) for a in args]]
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse errors
        rc = exc.code
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0]
    assert existing.read_bytes() == b"keep me"
