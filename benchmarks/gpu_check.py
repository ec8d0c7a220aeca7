"""The whole GPU proof in one call, for a bare H100/H200 (no internet, nothing of this repo installed):

    python -m benchmarks.gpu_check [OUTDIR]        # OUTDIR defaults to $OUT, else ./gpu_check_out

Parts, in order, each with a time budget (seconds; the whole run stays under 8 minutes):

1. ``build`` (200): ``_C`` with the CUDA kernels for sm_90 (``setup.py build_ext --inplace``).
2. ``info`` (20): ``python -m dcdkernels.info``.
3. ``tests`` (120): the CUDA, Triton and deferred-check tests, natively.
4. ``multi_device`` (20): a deferred check with tensors on cuda:1 while cuda:0 is current (only
   with two GPUs).
5. ``sanitizer`` (70): ``compute-sanitizer`` memcheck and racecheck over a small fixed subset
   (every fused op once per backend at small shapes: ``--subset``).
6. ``determinism`` (20): every fused op, five runs at GPU sizes, bitwise equal (``--determinism``).
7. ``bench`` (130): the GPU-size benchmarks (CIFAR-100 and ImageNet CRD, MoCo and CoCoRD dense,
   the bank update, ``CRDLoss``) against eager and ``torch.compile``, with the fraction of the
   HBM bandwidth (``benchmarks.report``'s roofline column).

It writes at most 8 files to OUTDIR: ``report.md`` (rewritten after every part, so whatever was
done survives a kill; SIGTERM is caught and recorded), ``log.txt`` (every child's output),
``sanitizer.txt``, ``results.csv`` and up to two plots of the benchmark report, and
``determinism.json``. Without a CUDA GPU it says so, writes a one-line report and exits 0
(CI runs that path: ``benchmarks/test_gpu_check.py``).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET = 470.0  # seconds: 8 minutes less a margin for start-up and the last write
BUDGETS = {"build": 200, "info": 20, "tests": 120, "multi_device": 20, "sanitizer": 70, "determinism": 20, "bench": 130}
MAX_FILES = 8
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]  # every pytest child run
# The kernel test grid (every backend x dtype x shape); with -k below only its GPU backends run.
TEST_FILES = [
    "python_tests/test_sampled_contrast.py",
    "python_tests/test_dual_sampled_contrast.py",
    "python_tests/test_dense_contrast.py",
    "python_tests/test_bank_update.py",
    "python_tests/test_dual_absent.py",
    "python_tests/test_deferred_checks.py",
    "python_tests/test_build_flags.py",
]
BENCH_FILTER = (
    "(test_sampled_contrast and nce and not sampler) or (test_dual_sampled_contrast and nce) or "
    "(test_dense_contrast and queue) or test_bank_update or (test_method_step and crd and not sampler)"
)


class Run:
    """The report of one run, rewritten to disk after every change."""

    def __init__(self, out):
        self.out = out
        self.start = time.time()
        self.parts = []  # (name, status, seconds, summary lines)
        self.current = None
        os.makedirs(out, exist_ok=True)
        self.log = open(os.path.join(out, "log.txt"), "a", buffering=1)

    def left(self):
        return TOTAL_BUDGET - (time.time() - self.start)

    def write(self, note=""):
        lines = [
            "# gpu_check report",
            "",
            f"- started: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(self.start))}",
            f"- elapsed: {time.time() - self.start:.0f} s (budget {TOTAL_BUDGET:.0f} s)",
            f"- python: {sys.version.split()[0]}",
        ]
        lines += [f"- {k}: {v}" for k, v in _device_facts().items()]
        if note:
            lines += ["", f"**{note}**"]
        lines += ["", "| part | status | seconds |", "|---|---|---|"]
        lines += [f"| {n} | {st} | {sec:.0f} |" for n, st, sec, _ in self.parts]
        if self.current:
            lines.append(f"| {self.current} | running (not finished) | {time.time() - self.current_t0:.0f} |")
        for n, st, sec, summary in self.parts:
            if summary:
                lines += ["", f"## {n}", "", "```", *summary, "```"]
        tmp = os.path.join(self.out, ".report.md.tmp")
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, os.path.join(self.out, "report.md"))

    def part(self, name, fn):
        budget = min(BUDGETS[name], max(0.0, self.left()))
        if budget < 5:
            self.parts.append((name, "skipped: out of time", 0.0, []))
            self.write()
            return
        print(f"[gpu_check {time.time() - self.start:5.0f} s] {name} (budget {budget:.0f} s)", flush=True)
        self.current, self.current_t0 = name, time.time()
        self.write()
        try:
            status, summary = fn(self, budget)
        except Exception as exc:  # noqa: BLE001 -- a part's failure is reported, the run goes on
            status, summary = f"error: {type(exc).__name__}: {exc}", []
        self.parts.append((name, status, time.time() - self.current_t0, summary))
        self.current = None
        self.write()
        print(f"[gpu_check {time.time() - self.start:5.0f} s] {name}: {status}", flush=True)

    def sh(self, cmd, timeout, env=None, tail=40):
        """Run ``cmd``; its output goes to log.txt; returns (rc or 'timeout', last lines)."""
        self.log.write(f"\n===== {' '.join(cmd)}\n")
        full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        full_env.update(env or {})
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        _CHILD[0] = proc
        lines, deadline = [], time.time() + timeout
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        rc = None
        while True:
            if time.time() > deadline:
                _kill(proc)
                rc = "timeout"
                break
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if not line:
                    rc = proc.wait()
                    break
                self.log.write(line)
                lines.append(line.rstrip())
                lines = lines[-400:]
        _CHILD[0] = None
        return rc, lines[-tail:]


_CHILD = [None]


def _kill(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _device_facts():
    try:
        import torch

        facts = {"torch": torch.__version__, "cuda": torch.version.cuda}
        if torch.cuda.is_available():
            facts["devices"] = ", ".join(
                f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())
            )
        try:
            import triton

            facts["triton"] = triton.__version__
        except ImportError:
            facts["triton"] = "not installed"
        return facts
    except Exception as exc:  # noqa: BLE001
        return {"torch": f"unavailable ({exc})"}


# ----------------------------------------------------------------------------------------------
# Parts
# ----------------------------------------------------------------------------------------------
def _build(run, budget):
    env = {"DCDKERNELS_CUDA": "1", "DCDKERNELS_CUDA_ARCH": "90", "MAX_JOBS": str(os.cpu_count() or 4)}
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    rc, tail = run.sh([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], budget, env=env, tail=15)
    return ("ok" if rc == 0 else f"FAILED (rc {rc})"), tail


def _info(run, budget):
    rc, tail = run.sh([sys.executable, "-m", "dcdkernels.info"], budget, tail=60)
    return ("ok" if rc == 0 else f"FAILED (rc {rc})"), tail


def _tests(run, budget):
    rc, tail = run.sh(
        [*PYTEST, "--tb=short", "-k", "not cpu", *TEST_FILES],
        budget,
        tail=30,
    )
    return ("passed" if rc == 0 else f"FAILED (rc {rc})"), tail


def _multi_device(run, budget):
    import torch

    if torch.cuda.device_count() < 2:
        return "skipped: one GPU", []
    rc, tail = run.sh(
        [*PYTEST, "-rs", "python_tests/test_deferred_checks.py", "-k", "non_current_device or flags_device"],
        budget,
    )
    return ("passed" if rc == 0 else f"FAILED (rc {rc})"), tail


def _sanitizer(run, budget):
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        return "skipped: no compute-sanitizer", []
    summary = []
    status = "clean"
    for which in ("memcheck", "racecheck"):
        rc, tail = run.sh(
            [
                tool,
                "--tool",
                which,
                "--error-exitcode",
                "9",
                "--print-limit",
                "20",
                "--target-processes",
                "all",
                sys.executable,
                "-m",
                "benchmarks.gpu_check",
                "--subset",
            ],
            budget / 2,
            env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
            tail=25,
        )
        summary += [f"--- {which}: rc {rc}", *tail]
        if rc != 0:
            status = f"{which} FAILED (rc {rc})" if status == "clean" else status + f", {which} rc {rc}"
    with open(os.path.join(run.out, "sanitizer.txt"), "w") as f:
        f.write("\n".join(summary) + "\n")
    return status, summary[-20:]


def _determinism(run, budget):
    path = os.path.join(run.out, "determinism.json")
    rc, tail = run.sh([sys.executable, "-m", "benchmarks.gpu_check", "--determinism", path], budget, tail=30)
    return ("deterministic" if rc == 0 else f"FAILED (rc {rc})"), tail


def _bench(run, budget):
    tmp = tempfile.mkdtemp(prefix="gpu_check_bench_")
    js = os.path.join(tmp, "bench.json")
    rc, tail = run.sh(
        [
            *PYTEST,
            "benchmarks/test_bench_ops.py",
            "benchmarks/test_bench_methods.py",
            "--benchmark-only",
            "--bench-sizes=gpu",
            "--bench-providers=eager,compile,triton,cuda",
            "--bench-compile-timeout=40",
            "--benchmark-max-time=0.2",
            "--benchmark-min-rounds=3",
            f"--benchmark-json={js}",
            "-k",
            BENCH_FILTER,
        ],
        budget - 10,
        tail=40,
    )
    if os.path.exists(js):
        rep = os.path.join(tmp, "report")
        run.sh([sys.executable, "-m", "benchmarks.report", js, "--out", rep, "--quiet"], 30)
        taken = len([f for f in os.listdir(run.out) if not f.startswith(".")])
        for name in ("results.csv", "speedup.png"):
            if os.path.exists(os.path.join(rep, name)) and taken < MAX_FILES:
                shutil.copy(os.path.join(rep, name), os.path.join(run.out, name))
                taken += 1
        if os.path.exists(os.path.join(rep, "report.md")):
            with open(os.path.join(rep, "report.md")) as f:
                tail = f.read().splitlines()[:80]
    return ("ok" if rc == 0 else f"incomplete (rc {rc})"), tail


# ----------------------------------------------------------------------------------------------
# Child modes
# ----------------------------------------------------------------------------------------------
def _fused_calls(small):
    """(name, thunk) per fused op and backend; each thunk returns the tensors it computed."""
    import torch
    import torch.nn.functional as F

    import dcdkernels as dk

    dev = "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    B, N, K, D, M = (4, 64, 15, 32, 48) if small else (256, 50_000, 16_384, 128, 65_536)

    def unit(*shape, grad=False):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1).to(dev).requires_grad_(grad)

    bank, bank_t = unit(N, D), unit(N, D)
    idx = torch.randint(N, (B, K + 1), generator=g).to(dev)
    keys = unit(M, D)
    calls = []
    for backend in ("cuda", "triton"):

        def sampled(backend=backend):
            q = q0.detach().clone().requires_grad_(True)
            loss = dk.sampled_contrast(q, bank, idx, logit_scale=1 / 0.07, backend=backend).sum()
            return [loss, *torch.autograd.grad(loss, q)]

        def dual(backend=backend):
            zs, zt = q0.detach().clone().requires_grad_(True), q1.detach().clone().requires_grad_(True)
            out = dk.dual_sampled_contrast(
                zs, zt, bank, bank_t, idx, logit_scale=1 / 0.07, consistency=0.5, backend=backend
            )
            loss = (out.loss_s + out.loss_t + out.consistency).sum()
            return [loss, *torch.autograd.grad(loss, [zs, zt])]

        def dense(backend=backend):
            q = q0.detach().clone().requires_grad_(True)
            loss = dk.dense_contrast(q, keys, positive=q1, logit_scale=1 / 0.07, backend=backend).sum()
            return [loss, *torch.autograd.grad(loss, q)]

        def update(backend=backend):
            b = bank.clone()
            dk.bank_momentum_update_(b, idx[:, 0], q0.detach(), 0.5, backend=backend)
            return [b]

        calls += [
            (f"sampled_contrast/{backend}", sampled),
            (f"dual_sampled_contrast/{backend}", dual),
            (f"dense_contrast/{backend}", dense),
            (f"bank_momentum_update_/{backend}", update),
        ]
    q0, q1 = unit(B, D), unit(B, D)
    return calls


def subset():
    """Every fused op once per backend at small shapes (the sanitizer's workload)."""
    import torch

    failures = 0
    for name, call in _fused_calls(small=True):
        try:
            call()
            torch.cuda.synchronize()
            print("ran", name, flush=True)
        except Exception as exc:  # noqa: BLE001
            failures += 1
            print("FAILED", name, type(exc).__name__, exc, flush=True)
    return 1 if failures else 0


def determinism(path, repeats=5):
    import torch

    results = {}
    for name, call in _fused_calls(small=False):
        try:
            first = [t.detach().clone() for t in call()]
            same = all(all(torch.equal(a, b) for a, b in zip(first, call())) for _ in range(repeats - 1))
            results[name] = "bitwise equal" if same else "DIFFERS"
        except Exception as exc:  # noqa: BLE001
            results[name] = f"error: {type(exc).__name__}: {exc}"
        print(name, results[name], flush=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    return 0 if all(v == "bitwise equal" for v in results.values()) else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--subset"]:
        return subset()
    if argv[:1] == ["--determinism"]:
        return determinism(argv[1])
    out = argv[0] if argv else os.environ.get("OUT") or os.path.join(os.getcwd(), "gpu_check_out")
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    run = Run(out)
    if not has_gpu:
        msg = "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check, exiting cleanly"
        print(msg)
        run.write(note=msg)
        return 0

    def on_term(signum, frame):
        if _CHILD[0] is not None:
            _kill(_CHILD[0])
        run.write(note=f"killed by signal {signum} during part {run.current!r}; the parts above finished")
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    for name, fn in (
        ("build", _build),
        ("info", _info),
        ("tests", _tests),
        ("multi_device", _multi_device),
        ("sanitizer", _sanitizer),
        ("determinism", _determinism),
        ("bench", _bench),
    ):
        run.part(name, fn)
        if name == "build" and not run.parts[-1][1].startswith("ok"):
            run.write(note="the CUDA build failed: the other parts need it")
            break
    run.write(note="done")
    print(f"gpu_check: wrote {out}/report.md ({time.time() - run.start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
