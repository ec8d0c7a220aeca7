"""Turn pytest-benchmark JSON files of this suite into a markdown report and plots.

    python -m benchmarks.report bench.json [more.json ...] --out benchmarks/results/<device>/

Writes ``report.md`` (time ratios vs eager and vs torch.compile per op / size / dtype, peak
transient memory measured and analytic, achieved bandwidth and the fraction of the memory
roofline), ``results.csv`` (one row per benchmark) and PNG plots of time and memory vs K and
vs B from the scaling sweeps (``scaling_{time,memory}_vs_{K,B}.png``) plus ``speedup.png``.

All ratios are computed between rows of the same JSON run (same machine, same session): a
speedup is ``median time of the baseline / median time of the provider`` (> 1 = faster).
The roofline uses the bytes a fused pass must read at least (``bytes_read``: B(K+1)D x element
size per bank for the sampled ops) and the device-to-device copy bandwidth measured in the same
session (``copy_bw_GBps``, (read + written bytes) / s of a large ``copy_``): on GPU the floor is
``bytes_read / copy_bw``; on CPU the same number is printed against DRAM copy bandwidth, but
small banks partly live in cache there, so it is indicative only.
"""

import argparse
import csv
import json
import math
import os
from collections import OrderedDict, defaultdict
from typing import Dict, Iterable, List, Optional

PROVIDER_ORDER = ("eager", "eager-lightly", "eager-pml", "compile", "cpu", "triton", "cuda")
COLORS = {
    "eager": "tab:blue",
    "eager-lightly": "tab:cyan",
    "eager-pml": "tab:olive",
    "compile": "tab:orange",
    "cpu": "tab:green",
    "triton": "tab:purple",
    "cuda": "tab:red",
}
DTYPE_ORDER = {"fp32": 0, "bf16": 1}
FUSED = ("cpu", "triton", "cuda")
MiB = float(1 << 20)


# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------
def load(paths: Iterable[str]):
    """(benchmarks, skipped, machine_info, meta) from one or more pytest-benchmark JSON files."""
    benches, skipped, machine, meta = OrderedDict(), [], {}, {}
    for path in paths:
        with open(path) as fh:
            data = json.load(fh)
        for b in data.get("benchmarks", []):
            benches[b.get("fullname", b.get("name"))] = b
        skipped.extend(data.get("dcdkernels_skipped", []))
        machine = data.get("machine_info", machine) or machine
        meta = {
            "datetime": data.get("datetime"),
            "commit": (data.get("commit_info") or {}).get("id"),
            "dirty": (data.get("commit_info") or {}).get("dirty"),
            "files": list(paths),
        }
    return list(benches.values()), skipped, machine, meta


def record(b: dict) -> dict:
    """A flat record of one benchmark (stats + extra_info + derived bandwidth figures)."""
    x = dict(b.get("extra_info") or {})
    st = b.get("stats") or {}
    x["name"] = b.get("name")
    x["median"] = st.get("median")
    x["iqr"] = st.get("iqr")
    x["min"] = st.get("min")
    x["rounds"] = st.get("rounds")
    x.setdefault("group", b.get("group"))
    x.setdefault("provider", (b.get("params") or {}).get("provider", "?"))
    if x.get("bytes_read") and x.get("median"):
        x["GBps"] = x["bytes_read"] / x["median"] / 1e9
        if x.get("copy_bw_GBps"):
            x["roofline"] = x["GBps"] / x["copy_bw_GBps"]
    return x


def _pkey(p):
    return PROVIDER_ORDER.index(p) if p in PROVIDER_ORDER else len(PROVIDER_ORDER)


def grouped(records: List[dict]) -> "OrderedDict[str, Dict[str, dict]]":
    """group -> {provider: record}, groups in first-seen order, with the ratios filled in."""
    out = OrderedDict()
    for r in records:
        out.setdefault(r["group"], {})[r["provider"]] = r
    for rows in out.values():
        eager, comp = rows.get("eager"), rows.get("compile")
        for r in rows.values():
            if eager and eager.get("median") and r.get("median"):
                r["vs_eager"] = eager["median"] / r["median"]
            if comp and comp.get("median") and r.get("median"):
                r["vs_compile"] = comp["median"] / r["median"]
    return out


# ---------------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------------
def fmt_time(s: Optional[float]) -> str:
    if s is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e3), ("us", 1e6)):
        if s * f >= 1.0 or unit == "us":
            v = s * f
            return f"{v:.3g}{unit}" if v < 100 else f"{v:.0f}{unit}"
    return "-"


def fmt_ratio(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x < 10 else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def fmt_mib(n: Optional[float]) -> str:
    if n is None:
        return "-"
    v = n / MiB
    return f"{v:.3g}" if v < 1000 else f"{v:.0f}"


def _pct(x):
    return "-" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def _skip_summary(skipped: List[dict]) -> List[str]:
    counts = OrderedDict()
    for s in skipped:
        key = (s.get("provider", "?"), s.get("reason", "?"))
        counts[key] = counts.get(key, 0) + 1
    return [f"{p:<8} x{n:<3} {reason}" for (p, reason), n in sorted(counts.items(), key=lambda kv: _pkey(kv[0][0]))]


# ---------------------------------------------------------------------------------------------
# scaling fits
# ---------------------------------------------------------------------------------------------
def _fit(xs, ys):
    """Least squares y = a + b x: (a, b, r2)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    b = sxy / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return a, b, (1 - ss_res / ss_tot) if ss_tot > 0 else 1.0


def scaling_series(records: List[dict]):
    """(axis, dtype, provider) -> sorted list of (value, record) from the scaling sweeps."""
    series = defaultdict(list)
    for r in records:
        if r.get("family") == "scaling" and r.get("median") is not None:
            series[(r["axis"], r["dtype"], r["provider"])].append((r[r["axis"]], r))
    for v in series.values():
        v.sort(key=lambda t: t[0])
    return series


def scaling_fits(records: List[dict]) -> List[dict]:
    """Per series: time exponent in B*K (log-log slope), linear fit of time vs B(K+1) (R^2),
    and the transient-memory slope in bytes per gathered index (B(K+1))."""
    out = []
    for (axis, dtype, prov), pts in sorted(
        scaling_series(records).items(), key=lambda kv: (kv[0][0], DTYPE_ORDER.get(kv[0][1], 9), _pkey(kv[0][2]))
    ):
        work = [r["B"] * (r["K"] + 1) for _, r in pts]
        t = [r["median"] for _, r in pts]
        mem = [r.get("peak_bytes") for _, r in pts]
        f_log = _fit([math.log(w) for w in work], [math.log(x) for x in t]) if len(pts) > 1 else None
        f_lin = _fit(work, t) if len(pts) > 1 else None
        f_mem = _fit(work, mem) if len(pts) > 1 and None not in mem else None
        out.append(
            {
                "axis": axis,
                "dtype": dtype,
                "provider": prov,
                "points": len(pts),
                "time_exponent": f_log[1] if f_log else None,
                "time_r2": f_lin[2] if f_lin else None,
                "ns_per_index": f_lin[1] * 1e9 if f_lin else None,
                "mem_bytes_per_index": f_mem[1] if f_mem else None,
                "mem_min": min(m for m in mem if m is not None) if any(m is not None for m in mem) else None,
                "mem_max": max(m for m in mem if m is not None) if any(m is not None for m in mem) else None,
            }
        )
    return out


# ---------------------------------------------------------------------------------------------
# the terminal summary (conftest prints it at the end of a timed run)
# ---------------------------------------------------------------------------------------------
def summary_lines(
    benches: List[dict], skipped: List[dict], *, size_set: str = "?", device: str = "?", width: int = 150
) -> List[str]:
    records = [record(b) for b in benches]
    fam_order = {"ops": 0, "methods": 1}
    groups = grouped(
        sorted((r for r in records if r.get("family") != "scaling"), key=lambda r: fam_order.get(r.get("family"), 2))
    )
    provs = sorted({r["provider"] for r in records}, key=_pkey)
    lines = [
        f"device: {device} | sizes: {size_set} | time = median per step (fwd+bwd) | "
        f"N.NNx = speedup vs eager (eager time / provider time) | mem = peak transient MiB"
    ]
    if size_set == "smoke":
        lines.append("SMOKE SIZES: tiny shapes that only exercise the code; these numbers say nothing about speed")
    gw = max([len(g) for g in groups] + [20])
    gw = min(gw, 46)
    head = (
        f"{'op/case size dtype':<{gw}} " + " ".join(f"{p:>15}" for p in provs) + f"  {'mem eager':>9} {'mem fused':>9}"
    )
    lines += [head, "-" * min(len(head), width)]
    for g, rows in groups.items():
        cells = []
        for p in provs:
            r = rows.get(p)
            if r is None:
                cells.append(f"{'-':>15}")
            elif p == "eager":
                cells.append(f"{fmt_time(r['median']):>15}")
            else:
                cells.append(f"{fmt_time(r['median']):>8} {fmt_ratio(r.get('vs_eager')):>6}")
        fused = [rows[p] for p in FUSED if p in rows and rows[p].get("peak_bytes") is not None]
        mem_e = rows.get("eager", {}).get("peak_bytes")
        mem_f = min((r["peak_bytes"] for r in fused), default=None)
        lines.append(f"{g[:gw]:<{gw}} " + " ".join(cells) + f"  {fmt_mib(mem_e):>9} {fmt_mib(mem_f):>9}")
    fits = scaling_fits(records)
    if fits:
        lines.append("")
        lines.append(
            "scaling (sampled NCE sweeps): e = exponent of time in B*K (1 = linear); "
            "mem = transient bytes per extra gathered index (0 = flat)"
        )
        by = OrderedDict()
        for f in fits:
            by.setdefault((f["axis"], f["provider"]), []).append(f)
        for (axis, prov), fs in by.items():
            parts = []
            for f in fs:
                e = "-" if f["time_exponent"] is None else f"{f['time_exponent']:.2f}"
                m = "-" if f["mem_bytes_per_index"] is None else f"{f['mem_bytes_per_index']:.1f}"
                parts.append(
                    f"{f['dtype']}: e = {e:>5}, mem = {m:>6} B/index, peak {fmt_mib(f['mem_min'])}.."
                    f"{fmt_mib(f['mem_max'])} MiB"
                )
            lines.append(f"  vs {axis} {prov:<8} " + " | ".join(parts))
    skips = _skip_summary(skipped)
    if skips:
        lines.append("")
        lines.append("not measured here:")
        lines += ["  " + s for s in skips]
    return lines


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------
def _md_table(header: List[str], rows: List[List[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _dims(r):
    keys = [k for k in ("N", "B", "K", "M", "D", "feat", "s_dim", "t_dim", "hidden", "classes") if r.get(k)]
    return " ".join(f"{k}={r[k]:,}" for k in keys)


def markdown(benches, skipped, machine, meta, plots: List[str]) -> str:
    records = [record(b) for b in benches]
    info = (machine or {}).get("dcdkernels", {})
    size_set = info.get("size_set") or next((r.get("size_set") for r in records if r.get("size_set")), "?")
    device = info.get("device_name") or next((r.get("device_name") for r in records), "?")
    L = [f"# dcdkernels benchmark report ({device}){' - SMOKE RUN' if size_set == 'smoke' else ''}", ""]
    if size_set == "smoke":
        L += [
            "> **SMOKE RUN**: tiny shapes that only exercise the pipeline. The times below say nothing",
            "> about the speed of any backend; do not quote them.",
            "",
        ]
    L += [
        f"- device: {device}; torch {info.get('torch', '?')}; torch threads: {info.get('threads', '?')}",
        f"- size set: `{size_set}`; torch.compile backend: `{info.get('compile_backend', '?')}`",
        f"- device copy bandwidth measured in this session: {info.get('copy_bw_GBps', '?')} GB/s "
        "((read + written bytes) / s of a large `copy_`)",
        f"- run: {meta.get('datetime', '?')}, commit {str(meta.get('commit'))[:12]}"
        f"{' (dirty tree)' if meta.get('dirty') else ''}; "
        f"from {', '.join(os.path.basename(f) for f in meta.get('files', []))}",
        "",
        "How to read: `time` is the median of the timed rounds of one step (forward + backward; the",
        "bank update has no backward), synchronised on GPU. `x eager` = eager median / provider median",
        "(> 1 = faster than the user-style eager code of `benchmarks/baselines.py`); `x compile` likewise",
        "against `torch.compile` of that code. `peak` = measured peak transient memory of one step",
        "(CUDA: `max_memory_allocated` delta; CPU: torch.profiler allocator events), `analytic` = the",
        "dominant buffers by formula. `GB/s` = the bytes a fused pass must read (B(K+1)D x elem per bank)",
        "per second; `roofline` = that over the session's copy bandwidth (meaningful on GPU).",
        "",
    ]
    for fam, title in (
        ("ops", "Ops (forward + backward)"),
        ("methods", "Methods (one full loss step)"),
        (
            "integrations",
            "Integrations (drop-ins vs the libraries' own classes; eager = the "
            "library's class; one forward + backward step with the memory update)",
        ),
    ):
        groups = grouped([r for r in records if r.get("family") == fam])
        if not groups:
            continue
        L += [f"## {title}", ""]
        rows = []
        for g, provs in groups.items():
            for p in sorted(provs, key=_pkey):
                r = provs[p]
                rows.append(
                    [
                        f"{r.get('op', '?')}{'/' + r['case'] if r.get('case') else ''}",
                        f"{r.get('size')}",
                        r.get("dtype", "?"),
                        p + (f" ({r['compile_backend']})" if p == "compile" else ""),
                        fmt_time(r.get("median")),
                        fmt_time(r.get("iqr")),
                        str(r.get("rounds", "-")),
                        fmt_ratio(r.get("vs_eager")),
                        fmt_ratio(r.get("vs_compile")),
                        fmt_mib(r.get("peak_bytes")),
                        fmt_mib(r.get("analytic_bytes")),
                        "-" if r.get("GBps") is None else f"{r['GBps']:.1f}",
                        _pct(r.get("roofline")),
                    ]
                )
        L += _md_table(
            [
                "op/case",
                "size",
                "dtype",
                "provider",
                "time",
                "IQR",
                "rounds",
                "x eager",
                "x compile",
                "peak MiB",
                "analytic MiB",
                "GB/s",
                "roofline",
            ],
            rows,
        )
        L.append("")
        dims = OrderedDict()
        for r in records:
            if r.get("family") == fam:
                dims.setdefault(f"{r.get('op')} {r.get('size')}", _dims(r))
        L += ["Sizes: " + "; ".join(f"`{k}`: {v}" for k, v in dims.items()), ""]
    fits = scaling_fits(records)
    if fits:
        L += [
            "## Scaling (sampled NCE, one bank, forward + backward)",
            "",
            "Claims checked here: fused time grows linearly in B*K (exponent ~ 1, linear R^2 ~ 1);",
            "fused transient memory is flat in K (slope ~ 0 bytes per gathered index, vs >= 4D for",
            "eager's gather).",
            "",
        ]
        rows = [
            [
                f["axis"],
                f["dtype"],
                f["provider"],
                str(f["points"]),
                "-" if f["time_exponent"] is None else f"{f['time_exponent']:.2f}",
                "-" if f["time_r2"] is None else f"{f['time_r2']:.3f}",
                "-" if f["ns_per_index"] is None else f"{f['ns_per_index']:.2f}",
                "-" if f["mem_bytes_per_index"] is None else f"{f['mem_bytes_per_index']:.1f}",
                f"{fmt_mib(f['mem_min'])} .. {fmt_mib(f['mem_max'])}",
            ]
            for f in fits
        ]
        L += _md_table(
            [
                "sweep",
                "dtype",
                "provider",
                "points",
                "time exponent in B*K",
                "linear R^2",
                "ns per index",
                "mem bytes per index",
                "peak MiB range",
            ],
            rows,
        )
        L.append("")
        series = scaling_series(records)
        rows = []
        for (axis, dtype, prov), pts in sorted(series.items(), key=lambda kv: (kv[0][0], kv[0][1], _pkey(kv[0][2]))):
            for v, r in pts:
                rows.append(
                    [
                        axis,
                        str(v),
                        dtype,
                        prov,
                        f"B={r['B']} K={r['K']}",
                        fmt_time(r["median"]),
                        fmt_mib(r.get("peak_bytes")),
                        fmt_mib(r.get("analytic_bytes")),
                    ]
                )
        L += ["<details><summary>sweep points</summary>", ""]
        L += _md_table(["sweep", "value", "dtype", "provider", "shape", "time", "peak MiB", "analytic MiB"], rows)
        L += ["", "</details>", ""]
    if plots:
        L += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    skips = _skip_summary(skipped)
    if skips:
        L += ["## Not measured in this run", "", "```"] + skips + ["```", ""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def plot_scaling(records: List[dict], out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = scaling_series(records)
    written = []
    for axis in ("K", "B"):
        for metric, ylabel, get in (
            ("time", "median time per step (s)", lambda r: r["median"]),
            (
                "memory",
                "peak transient memory (MiB)",
                lambda r: None if r.get("peak_bytes") is None else r["peak_bytes"] / MiB,
            ),
        ):
            keys = [k for k in series if k[0] == axis]
            if not keys:
                continue
            dtypes = sorted({k[1] for k in keys}, key=lambda d: DTYPE_ORDER.get(d, 9))
            fig, axes = plt.subplots(1, len(dtypes), figsize=(5.5 * len(dtypes), 4), squeeze=False)
            for ax, dt in zip(axes[0], dtypes):
                for k in sorted((k for k in keys if k[1] == dt), key=lambda k: _pkey(k[2])):
                    pts = [(v, get(r)) for v, r in series[k] if get(r) is not None]
                    if pts:
                        ax.plot(
                            [p[0] for p in pts],
                            [max(p[1], 1e-6) for p in pts],
                            marker="o",
                            label=k[2],
                            color=COLORS.get(k[2]),
                        )
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel(axis)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{metric} vs {axis} ({dt})")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend()
            fig.tight_layout()
            name = f"scaling_{metric}_vs_{axis}.png"
            fig.savefig(os.path.join(out, name), dpi=110)
            plt.close(fig)
            written.append(name)
    return written


def plot_speedup(records: List[dict], out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = grouped([r for r in records if r.get("family") in ("ops", "methods")])
    provs = [p for p in PROVIDER_ORDER if p != "eager" and any(p in g for g in groups.values())]
    if not groups or not provs:
        return []
    names = list(groups)
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(names) + 1.5))
    h = 0.8 / len(provs)
    for i, p in enumerate(provs):
        ys = [j + i * h for j in range(len(names))]
        xs = [groups[g].get(p, {}).get("vs_eager") or float("nan") for g in names]
        ax.barh(ys, xs, height=h, label=p, color=COLORS.get(p))
    ax.set_yticks([j + 0.4 - h / 2 for j in range(len(names))])
    ax.set_yticklabels(names, fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("speedup vs eager (eager median / provider median)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "speedup.png"), dpi=110)
    plt.close(fig)
    return ["speedup.png"]


def write_csv(records: List[dict], path: str) -> None:
    cols = [
        "family",
        "op",
        "case",
        "size",
        "dtype",
        "provider",
        "median",
        "iqr",
        "min",
        "rounds",
        "vs_eager",
        "vs_compile",
        "peak_bytes",
        "analytic_bytes",
        "bytes_read",
        "GBps",
        "roofline",
        "copy_bw_GBps",
        "N",
        "B",
        "K",
        "M",
        "D",
        "device_name",
        "size_set",
        "compile_backend",
        "compile_s",
    ]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow(r)


def build(paths: List[str], out: str) -> str:
    """Write report.md, results.csv and the PNGs into ``out``; returns the markdown path."""
    benches, skipped, machine, meta = load(paths)
    os.makedirs(out, exist_ok=True)
    records = [record(b) for b in benches]
    grouped(records)  # fills vs_eager / vs_compile on the records
    plots = plot_scaling(records, out) + plot_speedup(records, out)
    md = markdown(benches, skipped, machine, meta, plots)
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write(md)
    write_csv(records, os.path.join(out, "results.csv"))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark JSON files (--benchmark-json) of this suite")
    ap.add_argument("--out", required=True, help="output folder, e.g. benchmarks/results/cpu/")
    ap.add_argument("--quiet", action="store_true", help="do not print the summary")
    args = ap.parse_args(argv)
    path = build(args.json, args.out)
    if not args.quiet:
        benches, skipped, machine, _ = load(args.json)
        info = (machine or {}).get("dcdkernels", {})
        for line in summary_lines(
            benches, skipped, size_set=info.get("size_set", "?"), device=info.get("device_name", "?")
        ):
            print(line)
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
