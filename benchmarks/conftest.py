"""pytest configuration of the benchmark suite (pytest-benchmark).

Size sets (``--bench-sizes``, env ``DCDK_BENCH_SIZES``; default ``auto``):
  ``auto``  -> ``smoke`` unless ``--benchmark-only`` is given (so ``pytest benchmarks
             --benchmark-disable`` is a fast CI smoke), and with ``--benchmark-only`` the real
             sizes: ``gpu`` (docs/math.md §7) when the benchmark device is CUDA, else ``cpu``.
Device (``--bench-device``, env ``DCDK_BENCH_DEVICE``): ``auto`` = CUDA when available.
Providers (``--bench-providers``, env ``DCDK_BENCH_PROVIDERS``): ``eager,compile,cpu,triton,cuda``.
torch.compile backend (``--bench-compile-backend``): ``auto`` = inductor, or dynamo's ``eager``
backend in smoke runs; ``--bench-compile-timeout`` (120 s) skips sizes that compile longer.

Display: pytest-benchmark's per-group table is replaced by one compact summary (time, speedup
vs eager and vs torch.compile, peak transient memory) printed at the end; ``--bench-table``
shows pytest-benchmark's own table as well (median, IQR, rounds). ``--benchmark-json FILE``
saves everything for ``python -m benchmarks.report``.
"""

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU memory profiler is chatty otherwise

import pytest  # noqa: E402
import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import CFG, PROVIDERS  # noqa: E402

_PARAM_NAMES = ("case", "size", "dtype", "provider")


def pytest_addoption(parser):
    g = parser.getgroup("dcdkernels-bench", "dcdkernels benchmark suite")
    g.addoption(
        "--bench-sizes",
        default=os.environ.get("DCDK_BENCH_SIZES", "auto"),
        choices=("auto", "smoke", "cpu", "gpu"),
        help="size set: smoke (tiny, CI), cpu (CPU-sized), gpu (docs/math.md §7); auto = smoke unless "
        "--benchmark-only, then gpu on CUDA else cpu",
    )
    g.addoption("--bench-device", default=os.environ.get("DCDK_BENCH_DEVICE", "auto"), choices=("auto", "cpu", "cuda"))
    g.addoption(
        "--bench-providers",
        default=os.environ.get("DCDK_BENCH_PROVIDERS", ",".join(PROVIDERS)),
        help="comma-separated subset of eager,compile,cpu,triton,cuda",
    )
    g.addoption(
        "--bench-compile-backend",
        default=os.environ.get("DCDK_BENCH_COMPILE_BACKEND", "auto"),
        help="torch.compile backend of the 'compile' provider (auto: inductor; dynamo 'eager' in smoke runs)",
    )
    g.addoption(
        "--bench-compile-timeout",
        type=float,
        default=float(os.environ.get("DCDK_BENCH_COMPILE_TIMEOUT", "120")),
        help="skip a size whose torch.compile warm-up takes longer (seconds)",
    )
    g.addoption(
        "--bench-threads",
        type=int,
        default=int(os.environ.get("DCDK_BENCH_THREADS", "0")),
        help="torch.set_num_threads for the benchmarks (0: torch's default; smoke runs use 1). On a "
        "shared, loaded machine OpenMP barriers stall for whole scheduler slices: use 1 there",
    )
    g.addoption(
        "--bench-table", action="store_true", default=False, help="also print pytest-benchmark's own per-group table"
    )


def _opt(config, name, default=None):
    try:
        return config.getoption(name)
    except ValueError:
        return default


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "bench(family, table, ops, cases, dtypes, providers): parametrize a benchmark over sizes x dtypes x providers",
    )
    if _opt(config, "bench_sizes") is None:  # this conftest was not loaded as an initial conftest
        return
    disabled = bool(_opt(config, "benchmark_disable")) and not _opt(config, "benchmark_enable")
    only = bool(_opt(config, "benchmark_only"))
    dev = _opt(config, "bench_device")
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device=cuda but torch.cuda.is_available() is False")
    CFG.device = torch.device(dev)
    size_set = _opt(config, "bench_sizes")
    if size_set == "auto":
        size_set = "smoke" if (disabled or not only) else ("gpu" if dev == "cuda" else "cpu")
    CFG.size_set = size_set
    backend = _opt(config, "bench_compile_backend")
    CFG.compile_backend = ("eager" if size_set == "smoke" else "inductor") if backend == "auto" else backend
    CFG.compile_timeout = _opt(config, "bench_compile_timeout")
    provs = tuple(p.strip() for p in _opt(config, "bench_providers").split(",") if p.strip())
    bad = [p for p in provs if p not in PROVIDERS]
    if bad:
        raise pytest.UsageError(f"--bench-providers: unknown {bad}; choose from {PROVIDERS}")
    CFG.providers = provs
    CFG.disabled = disabled
    # Smoke shapes gain nothing from threads, and on a shared CI machine OpenMP barriers stall.
    CFG.threads = _opt(config, "bench_threads") or (1 if size_set == "smoke" else 0)
    CFG.target_s = float(_opt(config, "benchmark_max_time", 1.0) or 1.0)
    CFG.min_rounds = int(_opt(config, "benchmark_min_rounds", 5) or 5)
    if dev == "cpu":
        CFG.max_rounds = 50
    # One-screen defaults: compact columns, fastest first within a group.
    if getattr(config.option, "benchmark_columns", "x") is None:
        config.option.benchmark_columns = ["median", "iqr", "min", "rounds"]
    if hasattr(config.option, "benchmark_name") and config.option.benchmark_name == "normal":
        config.option.benchmark_name = "short"
    if hasattr(config.option, "benchmark_quiet") and not _opt(config, "bench_table"):
        config.option.benchmark_quiet = True


def _label(v):
    return getattr(v, "id", v) or "-"


def pytest_generate_tests(metafunc):
    """Parametrise every ``@pytest.mark.bench`` test over case x size x dtype x provider.
    Providers that cannot run here are collected as skipped, with the reason."""
    mark = metafunc.definition.get_closest_marker("bench")
    if mark is None:
        return
    kw = mark.kwargs
    table = kw["table"]
    cases = kw.get("cases", [""])
    dtypes = kw.get("dtypes", ["fp32", "bf16"])
    providers = kw.get("providers", PROVIDERS)
    ops = kw["ops"]
    size_list = table[CFG.size_set] if isinstance(table, dict) else table
    params = []
    for case in cases:
        case_sizes = size_list(case) if callable(size_list) else size_list
        case_ops = ops(case) if callable(ops) else ops
        for size in case_sizes:
            for dtype in dtypes(case) if callable(dtypes) else dtypes:
                for prov in providers(case) if callable(providers) else providers:
                    base = prov.split("-")[0] if prov.startswith("eager") else prov
                    why = harness.skip_reason(base, case_ops)
                    if not why and prov == "compile" and CFG.size_set == "smoke":
                        if not kw.get("smoke_compile", True):
                            why = (
                                "compile: skipped in smoke runs (dynamo tracing of a whole method step takes "
                                "seconds; the compile path is smoke-tested on the ops)"
                            )
                        elif dtype != "fp32":
                            why = "compile: smoke runs exercise torch.compile at fp32 only (compile time dominates)"
                    marks = [pytest.mark.skip(reason=why)] if why else []
                    ident = "-".join(str(x) for x in (case, _label(size), dtype, prov) if x)
                    params.append(pytest.param(case, size, dtype, prov, id=ident, marks=marks))
    metafunc.parametrize(",".join(_PARAM_NAMES), params)


@pytest.fixture
def bench(benchmark):
    """The runner of one benchmark (see ``benchmarks/harness.py``)."""
    return harness.Bench(benchmark)


@pytest.fixture(autouse=True)
def _bench_seed_and_threads():
    """Seed every benchmark; apply --bench-threads (1 in smoke runs) to this folder's tests only,
    so other test folders collected in the same session keep torch's default."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    if CFG.threads:
        torch.set_num_threads(CFG.threads)
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and hasattr(item, "callspec") and item.get_closest_marker("bench") is not None:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason[len("Skipped: ") :] if reason.startswith("Skipped: ") else reason
        p = item.callspec.params
        CFG.skipped.append(
            {
                "nodeid": item.nodeid,
                "test": item.originalname,
                "case": p["case"],
                "size": _label(p["size"]),
                "dtype": p["dtype"],
                "provider": p["provider"],
                "reason": reason,
            }
        )


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["dcdkernels"] = {
        "device": CFG.device.type,
        "device_name": harness.device_name(CFG.threads or None),
        "size_set": CFG.size_set,
        "torch": torch.__version__,
        "threads": CFG.threads or torch.get_num_threads(),
        "compile_backend": CFG.compile_backend,
        "copy_bw_GBps": round(harness.copy_bandwidth_GBps(), 2) if not CFG.disabled else None,
        "availability": {k: list(v) for k, v in __import__("dcdkernels").availability().items()},
    }


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["dcdkernels_skipped"] = list(CFG.skipped)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or _opt(config, "bench_sizes") is None:
        return
    benches = [b.as_dict(include_data=False) for b in bs.benchmarks if b and getattr(b, "stats", None)]
    if not benches:
        if CFG.skipped or CFG.disabled:
            terminalreporter.write_line(
                f"dcdkernels benchmarks: size set '{CFG.size_set}' on {CFG.device.type}; "
                f"{'timing disabled (--benchmark-disable)' if CFG.disabled else 'nothing timed'}"
            )
        return
    from benchmarks import report

    terminalreporter.write_sep("=", "dcdkernels benchmark summary")
    device = harness.device_name(CFG.threads or None)
    for line in report.summary_lines(benches, CFG.skipped, size_set=CFG.size_set, device=device):
        terminalreporter.write_line(line)
    json_path = _opt(config, "benchmark_json")
    if json_path:
        name = getattr(json_path, "name", None) if hasattr(json_path, "write") else str(json_path)
        terminalreporter.write_line(
            f"saved: {name}  ->  python -m benchmarks.report {name} --out benchmarks/results/<device>/"
        )
