"""Measurement machinery shared by the benchmark files: providers, skips, peak memory, copy
bandwidth, the compile guard and :class:`Bench`, which runs one (op, size, dtype, provider).

Providers (one per benchmark row; speed is always a ratio between rows of the same run):

* ``eager``   the user-style baseline of ``benchmarks/baselines.py`` (RepDistiller, MoCo, ...).
* ``compile`` ``torch.compile`` of that same eager code (marked ``compile`` everywhere; the
  backend is recorded: inductor for real runs, dynamo's ``eager`` backend in smoke runs, where
  inductor's CPU compile time would dominate). Compilation is warmed up outside the timing and a
  size whose compilation exceeds ``--bench-compile-timeout`` (120 s) is skipped with the reason.
* ``cpu``, ``triton``, ``cuda``: this library's fused kernels (``backend=`` of the public ops).
  A provider that cannot run here is skipped with the reason from ``dcdkernels.availability()``
  (or the missing per-op kernel), so the suite measures each kernel as soon as it lands.

Peak transient memory of one step (recorded in ``benchmark.extra_info``):

* CUDA: ``torch.cuda.reset_peak_memory_stats()``, then ``max_memory_allocated() - allocated``
  around one synchronised step.
* CPU: the CPU allocator's allocation/free events, recorded by ``torch.profiler`` with
  ``profile_memory=True`` around one step; the peak of their running sum. This counts every
  tensor allocated through torch's CPU allocator (eager temporaries, inductor buffers, outputs
  and tensors the C++ kernels create with ``at::empty``) exactly and per step, with no
  interference from the process's earlier peak (which makes ``ru_maxrss`` useless in-process).
  It does not count raw ``malloc``/``std::vector`` scratch inside C++ kernels (O(threads x D)
  accumulators in ours). The analytic transient bytes of the dominant buffers are recorded too.
"""

import contextlib
import math
import signal
import threading
import time
from typing import Callable, Dict, Iterable, Optional

import pytest
import torch

import dcdkernels

PROVIDERS = ("eager", "compile", "cpu", "triton", "cuda")
FUSED = ("cpu", "triton", "cuda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ELEM = {"fp32": 4, "bf16": 2}


# ---------------------------------------------------------------------------------------------
# configuration (filled by conftest from the command line / environment)
# ---------------------------------------------------------------------------------------------
class Config:
    size_set = "smoke"
    device = torch.device("cpu")
    compile_backend = "eager"
    compile_timeout = 120.0
    providers = PROVIDERS
    target_s = 1.0  # time budget per benchmark (pytest-benchmark's --benchmark-max-time)
    min_rounds = 5  # --benchmark-min-rounds
    max_rounds = 500
    disabled = True  # --benchmark-disable: every step runs once, nothing is timed
    threads = 0  # torch.set_num_threads inside each benchmark test (0: leave as is)
    skipped = []  # (nodeid, params, reason) of every skipped benchmark, for the report
    _copy_bw = None


CFG = Config()


def sync():
    if CFG.device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------
def skip_reason(provider: str, ops: Iterable[str]) -> Optional[str]:
    """Why ``provider`` cannot run ``ops`` on the benchmark device here, or None."""
    why = _unavailable(provider, list(ops))
    if why is None and provider not in CFG.providers:
        why = f"{provider}: deselected (--bench-providers={','.join(CFG.providers)})"
    return why


def _unavailable(provider: str, ops) -> Optional[str]:
    dev = CFG.device.type
    if provider in ("eager", "compile"):
        return None
    avail = dcdkernels.availability()
    if provider == "cpu":
        if dev != "cpu":
            return "cpu: the C++ kernels are benchmarked in a CPU session (--bench-device=cpu)"
        return None  # the C++ CPU kernels are a required part of the build: missing ones fail the run
    if provider == "cuda":
        if dev != "cuda":
            return f"cuda: {avail['cuda'][1]}" if not avail["cuda"][0] else "cuda: CPU session (--bench-device=cpu)"
        return None  # a GPU is here: CUDA kernels that did not build fail the run, they are not skipped
    if provider == "triton":
        if dev != "cuda":
            return (
                "triton: no GPU; on CPU Triton runs only under the interpreter (TRITON_INTERPRET=1), "
                "a correctness tool that is not benchmarked"
            )
        try:
            import triton  # noqa: F401
        except ImportError as exc:  # an optional dependency
            return f"triton: not installed ({exc})"
        return None
    return f"unknown provider {provider!r}"


class CompileTimeout(BaseException):
    """Raised by the alarm when torch.compile's warm-up runs past the limit (a BaseException, so
    that no ``except Exception`` inside dynamo swallows it)."""


@contextlib.contextmanager
def _alarm(seconds: Optional[float]):
    usable = (
        seconds and seconds > 0 and hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    )
    if not usable:
        yield
        return

    def handler(signum, frame):
        raise CompileTimeout()

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of an eager baseline (function or module), with the session's backend.
    Dynamo's caches are reset first, so no earlier test's recompilations count against the
    recompile limit (past it dynamo would silently run eager code)."""
    torch._dynamo.reset()
    return torch.compile(fn, backend=CFG.compile_backend, dynamic=False)


# ---------------------------------------------------------------------------------------------
# memory and bandwidth
# ---------------------------------------------------------------------------------------------
def _cpu_peak_bytes(step: Callable) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        if e.device_type() == torch._C._autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return int(peak)


def peak_transient_bytes(step: Callable) -> Dict[str, object]:
    """Peak bytes allocated above the starting point during one step, and how it was measured."""
    if CFG.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return {
            "peak_bytes": int(torch.cuda.max_memory_allocated() - base),
            "peak_method": "torch.cuda.max_memory_allocated delta after reset_peak_memory_stats",
        }
    return {
        "peak_bytes": _cpu_peak_bytes(step),
        "peak_method": "torch.profiler(profile_memory=True): peak running sum of CPU allocator events",
    }


def copy_bandwidth_GBps() -> float:
    """Device copy bandwidth of this session, (read + written bytes) / s of ``dst.copy_(src)``:
    the memory roofline the report measures kernels against. Measured once, lazily."""
    if CFG._copy_bw is not None:
        return CFG._copy_bw
    dev = CFG.device
    if CFG.size_set == "smoke":
        nbytes = 16 << 20
    else:
        nbytes = (1 << 30) if dev.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).fill_(1.0)
    dst = torch.empty_like(src)
    best = math.inf
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(3):
            dst.copy_(src)
        for _ in range(10):
            start.record()
            dst.copy_(src)
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    else:
        dst.copy_(src)
        for _ in range(5):
            t = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - t)
    del src, dst
    CFG._copy_bw = 2 * nbytes / best / 1e9
    return CFG._copy_bw


def device_name(threads: Optional[int] = None) -> str:
    if CFG.device.type == "cuda":
        return torch.cuda.get_device_name()
    import platform

    n = threads or torch.get_num_threads()
    return f"CPU {platform.processor() or platform.machine()} ({n} thread{'s' if n != 1 else ''})"


# ---------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------
class Bench:
    """One benchmark: ``run(step, ...)`` warms up (compiling if needed), measures the transient
    memory of one step, then times synchronised steps with ``benchmark.pedantic``."""

    def __init__(self, benchmark):
        self.benchmark = benchmark

    def run(
        self,
        step: Callable[[], object],
        *,
        family: str,
        op: str,
        case: str,
        size,
        dtype: str,
        provider: str,
        bytes_read: Optional[int] = None,
        analytic_bytes: Optional[int] = None,
        analytic_note: str = "",
        params: Optional[dict] = None,
    ) -> None:
        bm = self.benchmark
        group = f"{op}{'/' + case if case else ''} {size.id} {dtype}"
        bm.group = group

        def timed():
            step()
            sync()

        info = {
            "family": family,
            "op": op,
            "case": case,
            "size": size.id,
            **size.dims(),
            "dtype": dtype,
            "provider": provider,
            "device": CFG.device.type,
            "device_name": device_name(),
            "size_set": CFG.size_set,
            "group": group,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            **(params or {}),
        }
        if provider == "compile":
            info["compile_backend"] = CFG.compile_backend
        t0 = time.perf_counter()
        try:
            with _alarm(CFG.compile_timeout if provider == "compile" else None):
                timed()  # first call: compiles (compile provider), allocates, loads kernels
        except CompileTimeout:
            torch._dynamo.reset()
            pytest.skip(
                f"compile: torch.compile ({CFG.compile_backend}) took more than "
                f"{CFG.compile_timeout:.0f} s to compile at this size (--bench-compile-timeout)"
            )
        except Exception as exc:
            if provider != "compile":
                raise
            torch._dynamo.reset()
            first_line = (str(exc).strip().splitlines() or [""])[0][:200]
            pytest.skip(
                f"compile: torch.compile ({CFG.compile_backend}) failed on this code: "
                f"{type(exc).__name__}: {first_line}"
            )
        est = time.perf_counter() - t0
        if provider == "compile":  # the first call compiled: time a second one for the estimate
            info["compile_s"] = round(est, 3)
            t0 = time.perf_counter()
            timed()
            est = time.perf_counter() - t0
        est = max(est, 1e-6)
        info.update(peak_transient_bytes(step))
        if analytic_bytes is not None:
            info["analytic_bytes"] = int(analytic_bytes)
            info["analytic_note"] = analytic_note
        if bytes_read is not None:
            info["bytes_read"] = int(bytes_read)
            info["copy_bw_GBps"] = round(copy_bandwidth_GBps(), 2)
        bm.extra_info.update(info)
        rounds = int(min(CFG.max_rounds, max(CFG.min_rounds, math.ceil(CFG.target_s / est))))
        bm.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)


def grad_step(loss_fn: Callable[[], torch.Tensor], inputs) -> Callable[[], None]:
    """A step = forward + backward to ``inputs`` (leaves that require grad), via autograd.grad
    (no .grad accumulation between rounds)."""
    inputs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        loss = loss_fn()
        torch.autograd.grad(loss, inputs)

    return step
