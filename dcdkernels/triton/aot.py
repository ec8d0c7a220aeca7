"""Ahead-of-time compile of every Triton kernel at every configuration its launcher can choose,
without a GPU (issue 18).

1. **Record.** Each launcher (``dcdkernels.triton.*``) is called over a sweep of shapes, dtypes
   and flags on fake CUDA tensors (``FakeTensorMode``: no GPU, no memory), with the device's SM
   count given (132: H100/H200). The kernels are replaced by recorders, so the launchers' own
   heuristics (block sizes, warps, chunking, dot dtypes, the GPU-only branches) choose every
   configuration; no list of configurations is kept by hand.
2. **Specialise** each launch as the JIT would: constexprs, pointer dtypes (16-byte aligned),
   integers equal to 1 as constants, integers divisible by 16 marked so (except
   ``do_not_specialize``). Launches with the same specialisation are one *variant*.
3. **Compile** each variant with ``triton.compile(ASTSource(...), target=GPUTarget(...))`` for
   sm_90 and sm_80, in this process or (``--python``/``--pythonpath``) in a child process with
   another Triton on its path (CI: triton 3.6 next to the venv's 3.8). A compile error names
   the kernel and the variant.

``python -m dcdkernels.triton.aot [--arch 90 80] [--pythonpath DIR] [--json OUT]`` prints one line
per variant (registers, spills, shared memory) and exits 1 on any compile error.
"""

import argparse
import contextlib
import itertools
import json
import os
import re
import subprocess
import sys
import time

import torch

H100_SMS = 132
_TRITON_MODULES = ("bank_update", "dense_contrast", "sampled_contrast", "dual_sampled_contrast", "supcon_contrast")
_DTYPE_NAMES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
    torch.uint8: "u8",
}


# ----------------------------------------------------------------------------------------------
# 1. Record
# ----------------------------------------------------------------------------------------------
class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records and launches nothing."""

    def __init__(self, module, name, fn, log):
        self.module, self.name, self.fn, self.log = module, name, fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            entry = _specialise(self.module, self.name, self.fn, grid, args, kwargs)
            entry["call"] = _CALL[0]
            self.log.append(entry)

        return launch


_CALL = [None]  # the sweep call being recorded: (op, {shape, dtypes, flags})


def _kernels(module):
    """The module's kernels as JIT functions (under ``TRITON_INTERPRET=1`` they are interpreted
    functions: their JIT twin gives the parameters, and the compile runs in a child without it)."""
    import triton

    out = {}
    for name, obj in vars(module).items():
        if not name.endswith("_kernel"):
            continue
        if isinstance(obj, triton.runtime.JITFunction):
            out[name] = obj
        elif hasattr(obj, "fn") and hasattr(obj, "rewriter"):  # triton.runtime.interpreter.InterpretedFunction
            out[name] = triton.runtime.JITFunction(obj.fn, do_not_specialize=obj.kwargs.get("do_not_specialize"))
    return out


def _modules():
    import importlib

    return {m: importlib.import_module(f"dcdkernels.triton.{m}") for m in _TRITON_MODULES}


@contextlib.contextmanager
def _recording(sm_count):
    """Kernels replaced by recorders, the GPU's SM count given, and no real CUDA call."""
    from . import _common

    log, saved = [], []
    mods = _modules()
    try:
        for mname, mod in mods.items():
            for kname, fn in _kernels(mod).items():
                saved.append((mod, kname, getattr(mod, kname)))
                setattr(mod, kname, _Recorder(mname, kname, fn, log))
            if hasattr(mod, "device_guard"):
                saved.append((mod, "device_guard", mod.device_guard))
                mod.device_guard = lambda tensor: contextlib.nullcontext()
        saved.append((_common, "_sm_count", _common._sm_count))
        _common._sm_count = lambda index: sm_count
        saved.append((torch.cuda, "current_device", torch.cuda.current_device))
        torch.cuda.current_device = lambda: 0
        yield log
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def _value_spec(value):
    """(signature type, constant or None, divisible by 16) of one runtime argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPE_NAMES[value.dtype], None, True
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -(2**31) <= value < 2**31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    if value is None:
        return "constexpr", None, False
    raise TypeError(f"cannot specialise an argument of type {type(value).__name__}")


def _constexpr_value(value):
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, tl.dtype):
        return {"tl": value.name}
    return value


def _specialise(module, name, fn, grid, args, kwargs):
    params = fn.params
    names = [p.name for p in params]
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    bound = dict(zip(names, args))
    bound.update(kwargs)
    signature, constexprs, divisible = {}, {}, []
    for i, p in enumerate(params):
        if p.name not in bound:  # a default
            if p.is_constexpr:
                constexprs[p.name] = _constexpr_value(p.default)
                signature[p.name] = "constexpr"
            continue
        value = bound[p.name]
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = _constexpr_value(value)
            continue
        ty, const, div16 = _value_spec(value)
        if i in fn.do_not_specialize or p.name in fn.do_not_specialize:
            if ty == "constexpr":
                ty, const = "i32", None
            div16 = False
        signature[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = const
        if div16:
            divisible.append(i)
    grid = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
    return {
        "module": module,
        "kernel": name,
        "signature": signature,
        "constexprs": constexprs,
        "divisible": divisible,
        "num_warps": int(options.get("num_warps", 4)),
        "num_stages": int(options.get("num_stages", 3)),
        "grid": grid,
        **({"maxnreg": int(options["maxnreg"])} if options.get("maxnreg") else {}),
    }


def variant_key(launch):
    return json.dumps(
        {
            k: launch.get(k)
            for k in ("module", "kernel", "signature", "constexprs", "divisible", "num_warps", "num_stages", "maxnreg")
        },
        sort_keys=True,
    )


def _compile_one(job):
    v, arch, keep_asm = job
    try:
        return compile_variant(v, arch, keep_asm), None
    except Exception as exc:  # noqa: BLE001 -- every compile error is reported, by name
        msg = str(exc).strip().splitlines()
        return None, f"{describe(v)} sm_{arch}: {type(exc).__name__}: {msg[-1] if msg else ''}"


# The sweep: every regime the launchers distinguish. Block sizes follow powers of two of D (and
# of B, M for the dense kernels); the sampled kernels' chunk count (the merge's BLOCK_C) follows
# B and K against the SM count, so (B, K) pairs span 1 to 128 chunks; every flag; the dtype
# pairs that change the code (shared 16-bit dtypes take the tensor-core dot). The headline sizes
# (B = 64/256, K = 16,384, M = 65,536, D = 128/2,048) are included.
SWEEP_D = (3, 16, 64, 128, 130, 256, 512, 1024, 2048, 4096)
SWEEP_BK = ((1, 16384), (64, 16384), (256, 16384), (1024, 100), (4, 1))
SWEEP_BM = ((1, 7), (16, 4096), (64, 65536), (256, 65536), (1024, 4096))
# supcon_contrast: R anchors (self-contrast, or against R/2 keys), SupCon's and PCKD's sizes
SWEEP_SUPCON_R = (1, 16, 1024, 4096)
DTYPE_PAIRS = (
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
)
# No dot in the sampled kernels: the dtypes change no constexpr but the dual partial's NUM_STAGES
# (from the tile's bytes: fp32 and bf16 banks).
SAMPLED_DTYPE_PAIRS = DTYPE_PAIRS[:2] + DTYPE_PAIRS[3:]
BANK_ROWS = 65536
SEED, OFFSET = 2**40 + 7, 2**33 + 5  # as in training: 64-bit seeds and offsets


def _sweep_calls(mods):
    """(op name, description, thunk); each thunk calls one launcher once, making its (fake) tensors."""
    dev = "cuda"

    def rows(n, D, dtype):
        return torch.empty((n, D), dtype=dtype, device=dev)

    def scale():
        return torch.tensor(14.0, device=dev)

    def sampled_call(B, K, D, adt, bdt, loss, sampled, bias, grad):
        index = torch.empty((B,) if sampled else (B, K + 1), dtype=torch.int64, device=dev)
        mods["sampled_contrast"].sampled_contrast(
            rows(B, D, adt),
            rows(BANK_ROWS, D, bdt),
            index,
            scale(),
            scale() if bias else None,
            torch.tensor(1.0, device=dev) if loss else None,
            loss,
            K if sampled else 0,
            SEED,
            OFFSET,
            grad,
        )

    def dual_call(B, K, D, adt, bdt, loss, sampled, bias, grad, kl):
        index = torch.empty((B,) if sampled else (B, K + 1), dtype=torch.int64, device=dev)
        mods["dual_sampled_contrast"].dual_sampled_contrast(
            rows(B, D, adt),
            rows(B, D, adt),
            rows(BANK_ROWS, D, bdt),
            rows(BANK_ROWS, D, bdt),
            index,
            scale(),
            scale() if bias else None,
            torch.zeros(2, device=dev) if loss else None,
            loss,
            kl,
            K if sampled else 0,
            SEED,
            OFFSET,
            grad,
        )

    def dense_call(B, M, D, adt, bdt, positive, bias, grad):
        dense = mods["dense_contrast"]
        target = None if positive else torch.empty((B,), dtype=torch.int64, device=dev)
        pos = rows(B, D, bdt) if positive else None
        b = scale() if bias else None
        _, lse, *_ = dense.dense_contrast(rows(B, D, adt), rows(M, D, bdt), target, pos, scale(), b, grad)
        if grad:
            dense.dense_contrast_backward_keys(
                rows(B, D, adt), rows(M, D, bdt), target, pos, scale(), b, lse, torch.empty((B,), device=dev)
            )

    def bank_call(B, D, adt, bdt):
        mods["bank_update"].bank_momentum_update_(
            rows(BANK_ROWS, D, bdt), torch.empty((B,), dtype=torch.int64, device=dev), rows(B, D, adt), 0.5
        )

    def supcon_call(R, N, D, adt, bdt, exclude_self, keys_grad):
        sup = mods["supcon_contrast"]
        anchors, keys = rows(R, D, adt), rows(N, D, bdt)
        labels, key_labels = (torch.empty((n,), dtype=torch.int64, device=dev) for n in (R, N))
        _, stats = sup.supcon_contrast(anchors, labels, keys, key_labels, scale(), 1e-7, exclude_self)
        sup.supcon_contrast_backward(
            anchors, labels, keys, key_labels, scale(), stats, torch.empty((R,), device=dev), exclude_self, keys_grad
        )

    flags = list(itertools.product((0, 1), (False, True), (False, True), (False, True)))
    for D, (adt, bdt) in itertools.product(SWEEP_D, DTYPE_PAIRS):
        for (B, K), f in itertools.product(SWEEP_BK if (adt, bdt) in SAMPLED_DTYPE_PAIRS else (), flags):
            desc = dict(
                B=B,
                K=K,
                D=D,
                anchor=_DTYPE_NAMES[adt],
                bank=_DTYPE_NAMES[bdt],
                loss=f[0],
                sampled=f[1],
                bias=f[2],
                grad=f[3],
            )
            yield "sampled_contrast", desc, lambda a=(B, K, D, adt, bdt, *f): sampled_call(*a)
            for kl in (False, True):
                yield "dual_sampled_contrast", dict(desc, kl=kl), lambda a=(B, K, D, adt, bdt, *f, kl): dual_call(*a)
        for (B, M), positive, bias, grad in itertools.product(SWEEP_BM, (False, True), (False, True), (False, True)):
            desc = dict(
                B=B, M=M, D=D, anchor=_DTYPE_NAMES[adt], bank=_DTYPE_NAMES[bdt], positive=positive, bias=bias, grad=grad
            )
            yield "dense_contrast", desc, lambda a=(B, M, D, adt, bdt, positive, bias, grad): dense_call(*a)
        for B, _ in SWEEP_BK:
            desc = dict(B=B, D=D, anchor=_DTYPE_NAMES[adt], bank=_DTYPE_NAMES[bdt])
            yield "bank_momentum_update_", desc, lambda a=(B, D, adt, bdt): bank_call(*a)
        for R, exclude_self, keys_grad in itertools.product(SWEEP_SUPCON_R, (False, True), (False, True)):
            N = R if exclude_self else max(1, R // 2)  # self-contrast: keys = anchors; else a second set
            desc = dict(
                R=R,
                N=N,
                D=D,
                anchor=_DTYPE_NAMES[adt],
                keys=_DTYPE_NAMES[bdt],
                exclude_self=exclude_self,
                keys_grad=keys_grad,
            )
            yield "supcon_contrast", desc, lambda a=(R, N, D, adt, bdt, exclude_self, keys_grad): supcon_call(*a)


def record(sm_count=H100_SMS):
    """Every launch the launchers make over the sweep, as specialisation dicts (with grids), on a
    GPU with ``sm_count`` SMs (132 is also what every GPU's grids use under
    ``torch.use_deterministic_algorithms``). Shapes a launcher rejects are skipped."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with _recording(sm_count) as log, FakeTensorMode(allow_non_fake_inputs=True):
        for op, desc, call in _sweep_calls(_modules()):
            _CALL[0] = (op, desc)
            try:
                call()
            except (NotImplementedError, ValueError):
                pass
        _CALL[0] = None
    return log


def variants(launches):
    """One launch per distinct specialisation (what the JIT would compile), in a stable order."""
    out = {}
    for launch in launches:
        out.setdefault(variant_key(launch), launch)
    return [out[k] for k in sorted(out)]


# ----------------------------------------------------------------------------------------------
# 3. Compile
# ----------------------------------------------------------------------------------------------
def _tools():
    import triton

    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return {t: os.path.join(base, t) for t in ("cuobjdump", "nvdisasm", "ptxas")}


def describe(v):
    cs = ",".join(
        f"{k}={(c['tl'] if isinstance(c, dict) else c)}" for k, c in sorted(v["constexprs"].items()) if k.isupper()
    )
    ptrs = ",".join(f"{k}:{t[1:]}" for k, t in v["signature"].items() if t.startswith("*"))
    return f"{v['kernel']}[{cs}; warps={v['num_warps']}; {ptrs}]"


def _resources_from_cubin(cubin, name):
    """(registers, stack bytes, spill stores, spill loads) of the kernel from its cubin: REG and
    STACK from ``cuobjdump --dump-resource-usage``, spills as the SASS's local stores/loads."""
    import tempfile

    tools = _tools()
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run(
            [tools["cuobjdump"], "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
        sass = subprocess.run([tools["cuobjdump"], "-sass", f.name], capture_output=True, text=True, check=True).stdout
    reg = int(re.search(r"REG:(\d+)", res).group(1))
    stack = int(re.search(r"STACK:(\d+)", res).group(1))
    return reg, stack, len(re.findall(r"\bSTL(\.\w+)*\b", sass)), len(re.findall(r"\bLDL(\.\w+)*\b", sass))


def compile_variant(v, arch, keep_asm=False):
    """Compile one variant for sm_``arch``; returns a dict of its resources (raises on error)."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"dcdkernels.triton.{v['module']}")
    fn = getattr(mod, v["kernel"])
    constexprs = {k: (tl.dtype(c["tl"]) if isinstance(c, dict) else c) for k, c in v["constexprs"].items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i in v["divisible"]}
    src = ASTSource(fn=fn, signature=dict(v["signature"]), constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", int(arch), 32),
        options={
            "num_warps": v["num_warps"],
            "num_stages": v["num_stages"],
            **({"maxnreg": v["maxnreg"]} if v.get("maxnreg") else {}),
        },
    )
    reg, stack, stl, ldl = _resources_from_cubin(kernel.asm["cubin"], v["kernel"])
    out = {
        "kernel": v["kernel"],
        "variant": describe(v),
        "arch": int(arch),
        "triton": triton.__version__,
        "registers": reg,
        "stack": stack,
        "spill_stores": stl,
        "spill_loads": ldl,
        "shared": int(kernel.metadata.shared),
        # gathers software-pipelined into shared memory (cp.async), for the in-flight bytes
        "async_copies": kernel.asm["ttgir"].count("async_copy_global_to_local"),
        "num_warps": v["num_warps"],
        "grid": v.get("grid"),
    }
    if keep_asm:
        out["ttgir"], out["ptx"] = kernel.asm["ttgir"], kernel.asm["ptx"]
    return out


def compile_all(vs, archs, jobs=1, progress=True, keep_asm=False):
    """Compile every variant for every arch (``jobs`` processes); returns (results, errors as
    'kernel[constexprs; warps; pointer dtypes] sm_XX: message')."""
    work = [(v, a, keep_asm) for v in vs for a in archs]
    results, errors = [], []
    if jobs > 1:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            outs = pool.map(_compile_one, work, chunksize=4)
            for i, (r, e) in enumerate(outs):
                (results.append(r) if r else errors.append(e))
                if progress and (i + 1) % 50 == 0:
                    print(f"  compiled {i + 1}/{len(work)}", file=sys.stderr, flush=True)
    else:
        for i, job in enumerate(work):
            r, e = _compile_one(job)
            (results.append(r) if r else errors.append(e))
            if progress and (i + 1) % 50 == 0:
                print(f"  compiled {i + 1}/{len(work)}", file=sys.stderr, flush=True)
    return results, errors


def compile_in_subprocess(vs, archs, pythonpath="", python=sys.executable, timeout=1800, jobs=1, keep_asm=False):
    """Compile in a child (without ``TRITON_INTERPRET``) whose ``sys.path`` starts with
    ``pythonpath`` when given (another Triton). Returns (results, errors, its Triton version)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "variants.json"), os.path.join(tmp, "results.json")
        with open(src, "w") as f:
            json.dump(vs, f)
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(
            ([pythonpath] if pythonpath else []) + [root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
        )
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run(
            [
                python,
                "-m",
                "dcdkernels.triton.aot",
                "--from-json",
                src,
                "--results",
                dst,
                "--jobs",
                str(jobs),
                *(["--keep-asm"] if keep_asm else []),
                "--arch",
                *map(str, archs),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if not os.path.exists(dst):
            raise RuntimeError(f"the compile child failed (rc {proc.returncode}): {proc.stderr[-3000:]}")
        with open(dst) as f:
            out = json.load(f)
        return out["results"], out["errors"], out["triton"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["90", "80"])
    ap.add_argument("--pythonpath", help="compile in a child process with this directory first on sys.path")
    ap.add_argument("--from-json", help="compile these variants (instead of recording)")
    ap.add_argument("--results", help="write the results as JSON here")
    ap.add_argument("--jobs", type=int, default=1, help="compile processes")
    ap.add_argument("--keep-asm", action="store_true", help="keep the TTGIR and PTX in the results")
    ap.add_argument("--all", action="store_true", help="every specialisation, not only one per tile key")
    ap.add_argument("--launches", help="read the recorded launches from this JSON (written with --save-launches)")
    ap.add_argument("--save-launches", help="write the recorded launches (with grids) as JSON here")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    import triton

    t0 = time.time()
    if args.from_json:
        with open(args.from_json) as f:
            vs = json.load(f)
    else:
        if args.launches:
            with open(args.launches) as f:
                launches = json.load(f)
        else:
            launches = record()
        if args.save_launches:
            with open(args.save_launches, "w") as f:
                json.dump(launches, f)
        vs = select(launches, every=args.all)
        print(f"{len(launches)} launches, {len(vs)} variants to compile ({time.time() - t0:.0f} s)", flush=True)
    if args.pythonpath:
        results, errors, version = compile_in_subprocess(vs, args.arch, args.pythonpath, jobs=args.jobs)
    else:
        results, errors = compile_all(vs, args.arch, jobs=args.jobs, keep_asm=args.keep_asm)
        version = triton.__version__
    if args.results:
        with open(args.results, "w") as f:
            json.dump({"results": results, "errors": errors, "triton": version}, f)
    if not args.from_json:
        for r in results:
            print(
                f"triton {r['triton']} sm_{r['arch']} regs {r['registers']:3d} stack {r['stack']:5d} "
                f"spills {r['spill_stores']}/{r['spill_loads']} smem {r['shared']:6d} {r['variant']}"
            )
        print(f"triton {version}: {len(results)} compiled, {len(errors)} errors, {time.time() - t0:.0f} s")
        for e in errors:
            print("COMPILE ERROR", e)
    return 1 if errors else 0


def tile_key(launch):
    """The kernel, its tiling constexprs (``BLOCK_*``, ``NUM_STAGES``), dot dtype, bank dtype, role
    (``MERGE``: the dense forward's merge of its key splits, another program in the same kernel) and
    warps: what sets the register and shared-memory footprint (the boolean flags add or drop code inside it)."""
    tiles = {
        k: v
        for k, v in launch["constexprs"].items()
        if k.startswith("BLOCK_") or k in ("DOT_DTYPE", "BANK_IS_BF16", "NUM_STAGES", "MERGE")
    }
    return json.dumps({"kernel": launch["kernel"], "tiles": tiles, "num_warps": launch["num_warps"]}, sort_keys=True)


def _weight(v):
    """The heaviest variant first: most flags on (NCE, KL, bias, gradients, sampling), then the most
    dtype conversions (mixed fp32/16-bit pointers: the worst spills in the review)."""
    flags = sum(
        1
        for k, c in v["constexprs"].items()
        if k.isupper() and not k.startswith("BLOCK_") and isinstance(c, (bool, int)) and not isinstance(c, dict) and c
    )
    ptrs = {t for t in v["signature"].values() if t in ("*fp32", "*bf16", "*fp16")}
    return (flags, len(ptrs), variant_key(v))


def select(launches, every=False):
    """The variants CI compiles: every specialisation with ``every``; else, per tile key
    (:func:`tile_key`), the heaviest recorded variant, which bounds the registers and spills of
    the others with the same tiles."""
    vs = variants(launches)
    if every:
        return vs
    out = {}
    for v in vs:
        k = tile_key(v)
        if k not in out or _weight(v) > _weight(out[k]):
            out[k] = v
    return [out[k] for k in sorted(out)]


if __name__ == "__main__":
    sys.exit(main())
