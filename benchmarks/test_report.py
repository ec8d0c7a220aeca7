"""benchmarks/report.py turns a small saved pytest-benchmark JSON into a table and PNGs."""

import json

from benchmarks import report


def _bench(group, provider, median, family="ops", **extra):
    info = {
        "family": family,
        "op": "sampled_contrast",
        "case": "nce",
        "size": "tiny",
        "dtype": "fp32",
        "provider": provider,
        "group": group,
        "device": "cpu",
        "device_name": "CPU test",
        "size_set": "smoke",
        "B": 8,
        "K": 64,
        "N": 512,
        "D": 32,
        "peak_bytes": 1 << 20,
        "bytes_read": 8 * 65 * 32 * 4,
        "copy_bw_GBps": 10.0,
    }
    info.update(extra)
    return {
        "group": group,
        "name": f"test[{provider}]",
        "fullname": f"x::{group}::{provider}",
        "params": {"provider": provider},
        "extra_info": info,
        "stats": {"median": median, "iqr": median / 10, "min": median * 0.9, "rounds": 5},
    }


def _saved_json(path):
    g = "sampled_contrast/nce tiny fp32"
    benches = [
        _bench(g, "eager", 4e-3),
        _bench(g, "compile", 2e-3, compile_backend="inductor"),
        _bench(g, "cpu", 1e-3, peak_bytes=2048),
    ]
    for axis, values in (("K", (16, 64, 256)), ("B", (4, 8, 16))):
        for v in values:
            for prov, per_index in (("eager", 20e-9), ("cpu", 2e-9)):
                B, K = (8, v) if axis == "K" else (v, 64)
                benches.append(
                    _bench(
                        f"sweep{axis} {v}",
                        prov,
                        per_index * B * (K + 1),
                        family="scaling",
                        axis=axis,
                        B=B,
                        K=K,
                        peak_bytes=(B * (K + 1) * 128 if prov == "eager" else 4096),
                    )
                )
    data = {
        "machine_info": {"dcdkernels": {"device_name": "CPU test", "size_set": "smoke", "copy_bw_GBps": 10.0}},
        "commit_info": {"id": "0" * 40, "dirty": False},
        "datetime": "2026-01-01T00:00:00",
        "benchmarks": benches,
        "dcdkernels_skipped": [
            {
                "provider": "cuda",
                "reason": "no GPU",
                "case": "nce",
                "size": "tiny",
                "dtype": "fp32",
                "nodeid": "x",
                "test": "t",
            }
        ],
    }
    path.write_text(json.dumps(data))
    return path


def test_report_table_and_png(tmp_path):
    src = _saved_json(tmp_path / "bench.json")
    out = tmp_path / "out"
    assert report.main([str(src), "--out", str(out), "--quiet"]) == 0
    md = (out / "report.md").read_text()
    assert "| op/case | size | dtype | provider |" in md
    assert "4.00x" in md and "2.00x" in md  # cpu vs eager, cpu vs compile
    assert "SMOKE RUN" in md and "no GPU" in md
    for name in ("scaling_time_vs_K.png", "scaling_memory_vs_K.png", "scaling_time_vs_B.png", "speedup.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert (out / "results.csv").read_text().count("\n") == 1 + 3 + 12
    fits = {
        (f["axis"], f["provider"]): f
        for f in report.scaling_fits([report.record(b) for b in json.loads(src.read_text())["benchmarks"]])
    }
    assert abs(fits[("K", "cpu")]["time_exponent"] - 1.0) < 0.05
    assert abs(fits[("K", "eager")]["mem_bytes_per_index"] - 128) < 1e-6
    lines = report.summary_lines(json.loads(src.read_text())["benchmarks"], [], size_set="smoke", device="CPU test")
    assert any("4.00x" in line for line in lines) and len(lines) < 40
