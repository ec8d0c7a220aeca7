"""The report of a run: the results table (``summary.txt``), ``results.json`` and the learning
curves (``curves.png``)."""

import math
import os

from .checkpoint import write_json


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0


def _f(v, spec):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def format_table(results):
    ph = results["phases"]
    rows = [
        ("model", "method", "backend", "test acc %", "best %", "epochs", "train s", "steps/s", "samples/s", "peak mem")
    ]
    for key in ("teacher", "baseline", "student", "student_eager"):
        r = ph.get(key)
        if not r:
            continue
        label = {
            "teacher": "teacher",
            "baseline": "student (no distill)",
            "student": "student",
            "student_eager": "student",
        }[key]
        method = "ce" if key in ("teacher", "baseline") else r["method"]
        if key == "teacher" and not r.get("trained", True):
            method = "loaded"
        rows.append(
            (
                f"{label} {r['arch']}",
                method,
                r.get("backend_resolved", "-"),
                _f(r["test_acc"], ".2f"),
                _f(r.get("best_acc"), ".2f"),
                str(r.get("epochs", "-")),
                _f(r.get("train_time_s"), ".1f"),
                _f(r.get("steps_per_s"), ".1f"),
                _f(r.get("samples_per_s"), ".0f"),
                fmt_bytes(r.get("peak_memory_bytes")),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    line = "+".join("-" * (w + 2) for w in widths)
    out = [line]
    for j, row in enumerate(rows):
        out.append("|".join(f" {c:<{w}} " if i < 3 else f" {c:>{w}} " for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            out.append(line)
    out.append(line)
    cfg = results["config"]
    head = (
        f"{results['dataset']['name']}: {results['dataset']['n_train']} train / {results['dataset']['n_test']} test; "
        f"weights gamma(CE) {cfg['gamma']:g}, alpha(KD) {cfg['alpha']:g}, beta({cfg['method']}) {cfg['beta']:g}; "
        f"peak mem = {(ph.get('student') or {}).get('memory_kind', '')}"
    )
    out.insert(0, head)
    s, e = ph.get("student"), ph.get("student_eager")
    if s and e:
        sp = (s["steps_per_s"] / e["steps_per_s"]) if s.get("steps_per_s") and e.get("steps_per_s") else float("nan")
        mem_s, mem_e = s.get("peak_memory_bytes"), e.get("peak_memory_bytes")
        out.append(
            f"{s['backend_resolved']} vs eager: accuracy {s['test_acc']:.2f}% vs {e['test_acc']:.2f}% "
            f"(diff {s['test_acc'] - e['test_acc']:+.2f}), train time {s['train_time_s']:.1f}s vs "
            f"{e['train_time_s']:.1f}s (speed-up x{sp:.2f}), peak memory {fmt_bytes(mem_s)} vs {fmt_bytes(mem_e)}"
        )
        if "eager" in str(s.get("backend_resolved", "")):
            out.append("note: no fused kernel is available here, so both runs used the eager losses")
    return "\n".join(out)


def plot_curves(results, path):
    """Test accuracy and training loss per epoch of every trained phase (PNG, Agg backend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - optional
        return None
    phases = [(k, r) for k, r in results["phases"].items() if r.get("history")]
    if not phases:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for key, r in phases:
        ep = [h["epoch"] for h in r["history"]]
        method = r["method"] if key.startswith("student") else "ce"
        label = f"{key}: {r['arch']} {method} ({r.get('backend_resolved', '-')})"
        style = dict(
            linestyle="--" if key == "student_eager" else "-",
            marker=("x" if key == "student_eager" else "o") if len(ep) <= 40 else None,
            markersize=4,
        )
        axes[0].plot(ep, [h["test_acc"] for h in r["history"]], label=label, **style)
        axes[1].plot(ep, [h["loss"] for h in r["history"]], label=label, **style)
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    axes[1].set(xlabel="epoch", ylabel="training loss", title="training loss (total)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{results['dataset']['name']} - {results['config']['method']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results, out_dir):
    """``results.json``, the table (printed and in ``summary.txt``) and ``curves.png`` (rank 0)."""
    write_json(results, os.path.join(out_dir, "results.json"))
    table = format_table(results)
    print(table, flush=True)
    with open(os.path.join(out_dir, "summary.txt"), "w") as fh:
        fh.write(table + "\n")
    png = plot_curves(results, os.path.join(out_dir, "curves.png"))
    if png:
        print(f"learning curves: {png}")
    print(f"results: {os.path.join(out_dir, 'results.json')}")
