"""``autocp`` command line: every subcommand at small sizes, in subprocesses, and the bad
arguments (one line on stderr, exit code 2, no traceback)."""

import json
import os
import re
import subprocess
import sys

import pytest

from autocp.cli import main, parse_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, cwd=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "autocp", *args], cwd=cwd or ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _one_line_error(err: str, code, *, contains=()):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and "error:" in lines[0], err
    for c in contains:
        assert c in lines[0], (c, lines[0])


# ----------------------------------------------------------------------------- arguments
def test_help_lists_every_subcommand():
    res = _cli("--help")
    assert res.returncode == 0, res.stderr
    for cmd in ("demo", "estimate", "explain", "bench"):
        assert cmd in res.stdout


@pytest.mark.parametrize("cmd", ["demo", "estimate", "explain", "bench"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert f"usage: autocp {cmd}" in capsys.readouterr().out


BAD = [
    (["demo", "--p", "0"], ["--mesh", "given 0"]),
    (["demo", "--p", "-1"], ["--mesh", "given -1"]),
    (["demo", "--mesh", "2x3"], ["non-square", "2x3"]),
    (["demo", "--mesh", "abc"], ["--mesh", "'abc'"]),
    (["demo", "--mesh", "5"], ["4x4"]),
    (["demo", "--c", "0"], ["--channels", "given 0"]),
    (["demo", "--channels", "-3"], ["--channels"]),
    (["demo", "--tokens", "1"], ["N >= p"]),
    (["demo", "--mesh", "3", "--tokens", "2"], ["N >= p"]),
    (["demo", "--blocks", "0"], ["--blocks"]),
    (["demo", "--model", "boltz3"], ["--model", "boltz3"]),
    (["demo", "--model", "missing_file.py:make"], ["does not exist"]),
    (["demo", "--frobnicate"], ["unrecognized"]),
    (["estimate", "--tokens", "100", "--device-memory", "80XB"], ["--device-memory", "80XB"]),
    (["estimate", "--tokens", "100", "--device-memory", "-1GiB"], ["--device-memory"]),
    (["estimate", "--tokens", "100"], ["--device-memory"]),
    (["estimate", "--device-memory", "80GiB"], ["--tokens"]),
    (["estimate", "--tokens", "0", "--device-memory", "80GiB"], ["--tokens", "given 0"]),
    (["estimate", "--tokens", "4", "--mesh", "8"], ["N >= p"]),
    (["estimate", "--tokens", "64", "--mesh", "2x4"], ["non-square"]),
    (["estimate", "--tokens", "64", "--mesh", "2", "--dtype", "int8"], ["--dtype"]),
    (["demo", "--model", "boltz2-full"], ["boltz2-full", "estimate"]),
    (["estimate", "--model", "boltz2-full", "--tokens", "64", "--mesh", "2", "--train"], ["--train"]),
    (["estimate", "--model", "boltz2-full", "--tokens", "64", "--mesh", "2", "--recycling-steps", "-1"],
     ["--recycling-steps"]),
    (["explain", "--format", "svg"], ["--format"]),
    (["bench", "latency"], ["latency"]),
    (["bench", "memory", "--mesh", "4"], ["3x3"]),
    (["bench", "memory", "--tokens", "2", "--mesh", "3"], ["N >= p"]),
    ([], ["required"]),
]


@pytest.mark.parametrize("argv,contains", BAD, ids=[" ".join(a) or "<none>" for a, _ in BAD])
def test_bad_arguments(argv, contains, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    assert out.out == "", out.out  # nothing ran
    _one_line_error(out.err, code, contains=contains)


@pytest.mark.parametrize("argv", [["demo", "--p", "0"], ["demo", "--mesh", "2x3"],
                                  ["estimate", "--tokens", "30000", "--device-memory", "lots"]])
def test_bad_arguments_subprocess(argv):
    res = _cli(*argv)
    _one_line_error(res.stderr, res.returncode)
    assert res.stdout == ""


def test_user_factory_without_the_function(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text("x = 1\n")
    res = _cli("explain", "--model", f"{f}:make")
    _one_line_error(res.stderr, res.returncode, contains=["defines no callable make"])


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30
    assert parse_bytes("40GB") == 40 * 10**9
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5TiB") == int(1.5 * 2**40)
    assert parse_bytes("1000") == 1000


# ----------------------------------------------------------------------------- subcommands
def test_demo_small(tmp_path):
    png, js = tmp_path / "mem.png", tmp_path / "demo.json"
    res = _cli("demo", "--mesh", "2", "--tokens", "10", "--blocks", "1", "--channels", "8", "--msa-rows", "3",
               "--png", str(png), "--json", str(js))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "MATCH" in res.stdout and "MISMATCH" not in res.stdout, res.stdout
    assert "N=10 tokens (divisible by p=2)" in res.stdout
    assert "registry:MSAModule" in res.stdout and "registry:TriangleMultiplicationOutgoing" in res.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads(js.read_text())
    assert d["match"] is True
    r0 = d["ranks"][0]
    assert set(r0["actions"].values()) == {"op"}, r0["actions"]  # nothing gathered
    for o in r0["outputs"]:
        assert o["max_abs_err"] <= 1e-5 * o["scale"], o
    peaks = [r["peak_rank"] for r in d["ranks"]]
    assert len(peaks) == 4 and max(peaks) < r0["peak_single"], (peaks, r0["peak_single"])


def _table(out):
    """{p: bytes} from the estimate's final table."""
    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    rows = {}
    for m in re.finditer(r"^\s+(\d+)x\1\s+\d+\s+([\d.]+) (B|KiB|MiB|GiB|TiB)", out, re.M):
        rows[int(m.group(1))] = float(m.group(2)) * units[m.group(3)]
    return rows


def test_estimate_smallest_mesh():
    # 7 channels (widths 7, 21): estimate plans at an N that is no width; every side is searched
    res = _cli("estimate", "--tokens", "40", "--device-memory", "1MiB", "--channels", "7", "--msa-rows", "4",
               "--max-mesh", "8", "--mesh", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "left out" not in res.stdout, res.stdout
    rows = _table(res.stdout)
    m = re.search(r"smallest square mesh that fits 1.00 MiB per device: (\d+)x\1", res.stdout)
    assert m, res.stdout
    p = int(m.group(1))
    assert rows[p] <= 2**20 and rows[p - 1] > 2**20, rows  # smallest: the next smaller side was evaluated
    sides = sorted(rows)
    assert len(sides) >= 3 and all(rows[a] > rows[b] for a, b in zip(sides, sides[1:])), rows  # falls with p


def test_estimate_table_only_bf16_train():
    res = _cli("estimate", "--tokens", "24", "--mesh", "1", "2", "--model", "boltz1", "--channels", "8",
               "--dtype", "bf16", "--train")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "forward+backward" in res.stdout and "bf16" in res.stdout
    assert sorted(_table(res.stdout)) == [1, 2]


def test_explain_text_dot_graphml(tmp_path):
    res = _cli("explain", "--tokens", "7", "--channels", "8", "--blocks", "1")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "registry:MSAModule" in res.stdout and "0 gathered (fallback)" in res.stdout, res.stdout
    # dot and graphml in this process (the same main() the console script calls)
    dot = tmp_path / "g.dot"
    assert main(["explain", "--model", "boltz1", "--format", "dot", "--tokens", "7", "--channels", "8",
                 "--out", str(dot)]) == 0
    assert dot.read_text().startswith("digraph")
    gml = tmp_path / "g.graphml"
    assert main(["explain", "--format", "graphml", "--tokens", "7", "--channels", "8", "--out", str(gml)]) == 0
    assert "<graphml" in gml.read_text()


def test_explain_user_factory(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(
        "from boltz.model.layers.pairformer import PairformerModule\n"
        "def make():\n"
        "    return PairformerModule(12, 8, 1, num_heads=2, pairwise_head_width=4, pairwise_num_heads=2,\n"
        "                            dropout=0.0, v2=True)\n")
    res = _cli("explain", "--model", f"{f}:make", "--tokens", "7")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PairformerModule from" in res.stdout and "registry:TriangleAttention" in res.stdout


@pytest.mark.parametrize("what", ["memory", "comm", "speed"])
def test_bench(what, tmp_path):
    args = ["bench", what, "--out", str(tmp_path), "--tokens", "6", "10", "--channels", "4"]
    if what != "speed":
        args += ["--mesh", "1", "2"] if what == "memory" else ["--mesh", "2"]
    else:
        args += ["--repeat", "1"]
    res = _cli(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    d = json.loads((tmp_path / f"bench_{what}.json").read_text())
    assert (tmp_path / f"bench_{what}.png").read_bytes()[:4] == b"\x89PNG"
    rows = d["rows"]
    assert sorted({r["n"] for r in rows}) == [6, 10]
    if what == "memory":
        by = {(r["n"], r["P"]): r for r in rows}
        assert by[(10, 4)]["max_rank_peak_bytes"] < by[(10, 1)]["max_rank_peak_bytes"]
        assert by[(10, 1)]["max_rank_peak_bytes"] > by[(6, 1)]["max_rank_peak_bytes"]
    elif what == "comm":
        for r in rows:
            assert r["measured_bytes_per_layer"] > 0
            assert r["measured_bytes_per_layer"] == pytest.approx(r["analytic_bytes_per_layer"], rel=1e-6), r
    else:
        assert all(r["original_s"] > 0 and r["parallelize_1x1_s"] > 0 for r in rows)


def test_estimate_whole_model_in_process(monkeypatch, capsys):
    """``autocp estimate --model boltz2-full``: the whole prediction on one simulated rank
    (here the tiny widths stand in for the released configuration, to stay fast)."""
    boltz_full = pytest.importorskip("autocp.models.boltz_full")
    if not boltz_full.boltz_full_available():
        pytest.skip("whole-model deps missing")
    from autocp.models import boltz_estimate

    monkeypatch.setattr(boltz_estimate, "released_boltz2_config", lambda **kw: boltz_full.tiny_boltz2_config(**kw))
    code = main(["estimate", "--model", "boltz2-full", "--tokens", "24", "--mesh", "2", "--recycling-steps", "0",
                 "--sampling-steps", "2", "--msa-rows", "6", "--table"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "the whole Boltz-2 prediction" in out and "2x2" in out
    assert "pairformer_module" in out and "structure_module" in out  # the per-module table
