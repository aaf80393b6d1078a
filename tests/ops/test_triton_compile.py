"""Every Triton kernel in triton_kernels/ compiled ahead of time for Hopper (sm_90), no GPU needed.

The parity tests run the Triton kernels in Triton's CPU interpreter when there is no GPU, and the
interpreter compiles nothing: a kernel can pass them and still fail to compile on a GPU. Here each kernel
goes through Triton's real compiler (source -> TTIR -> TTGIR -> LLVM IR -> PTX -> ptxas -> cubin) for a
CUDA sm_90 target, at the argument dtypes, constexpr values, block sizes and launch options its launcher
really uses on a GPU, so such a kernel fails `make test` on any machine.

How:
- The compiles run in a subprocess (this file run as a script) with TRITON_INTERPRET removed from its
  environment. In-process compiling is not possible once tests/conftest.py has set TRITON_INTERPRET=1:
  Triton reads it when a function is decorated, so `@triton.jit` returned InterpretedFunction objects,
  not JITFunctions, both for the kernels here *and* for triton.language's own jitted library (tl.sum's
  combine functions, tl.cdiv, ...). Re-importing only our modules with the variable unset would still
  compile against that interpreted triton.language (the JIT's binder imports triton.experimental.gluon,
  which asserts that tl's functions are JITFunctions), and wrapping `fn.fn` in a JITFunction would leave
  the helpers it calls interpreted. A fresh Python, where triton is imported with the interpreter off, is
  the robust way; it costs one import of torch and triton (about 5 s; all compiles about 10 s more).
- In the subprocess each case calls the kernel's `JITFunction.warmup(*args, grid=..., **kwargs)`: the path
  of a real `kernel[grid](...)` launch (the JIT's own binder turns the arguments into the signature,
  constexprs and specialisation attributes, e.g. `*i16` for a bfloat16 tensor's int16 view, i32 / i64 for
  Python ints, 16-byte divisibility of pointers and ints), ending in
  `triton.compile(ASTSource(...), target=..., options=...)`, but without a launch. The only stand-in is
  Triton's driver, whose current device/stream/target `run` asks for: a stub reporting
  GPUTarget("cuda", 90, 32). Pointer arguments are small CPU tensors of the launcher's dtypes (only their
  dtype and data_ptr alignment are read); sizes are Python ints, so a 2^31-element case costs nothing.
- The arguments are built as the launchers build them, with the launchers' own constants and helpers
  (_GPU_BLOCK / _GPU_WARPS..., _launch_config(cuda), _work, _mask_arg, _use_i64, _FORMATS, _EXP_MASKS,
  bits_view, _i32 / _i64; the masked ops' shared ones from masked_elements, which their modules import):
  when a launcher changes a block size, the compile here follows it. Where a launcher computes values
  inline (radix_histogram's prefix masks, ig_accumulate's chunk), the builder repeats that computation,
  with the launcher's constants.
- Checked per case: PTX (.target sm_90a, one entry) and a cubin were produced for GPUTarget cuda/90, the
  launcher's num_warps / enable_fp_fusion reached the compiler, and the kernel's shared memory fits an
  sm_90 block. Register counts and loading the cubin need a GPU: the gpu-marked parity tests do that.
- Triton's cache is redirected to a pytest tmp dir (TRITON_CACHE_DIR, TRITON_HOME), so every run compiles.
- Every @triton.jit function of every module in simu_fast.triton_kernels is enumerated; a kernel (one that
  is launched with `kernel[grid](...)`, or that no other jitted function calls) without a case in CASES
  fails test_every_kernel_has_a_compile_case. Device helpers (load_f32, _keys, ...) are compiled inside
  the kernels that call them.
- Skips only when triton, its NVIDIA backend or its ptxas is missing; a kernel that fails to compile
  fails its test with the compiler's error.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

PACKAGE = "simu_fast.triton_kernels"
TARGET = ("cuda", 90, 32)  # backend, compute capability (sm_90 = H100 / H200), warp size
HOPPER_SMS = 132  # multiprocessors of an H100 / H200 SXM, where a launcher sizes its grid by the SM count
HOPPER_MAX_SHARED = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB, opt-in)
WORKER_TIMEOUT_S = 600

BIG = 2**31  # elements: past int32 offsets (the launchers switch to int64, USE_I64 / int64 arguments)

# ----------------------------------------------------------------------------------------------
# the cases: (module, kernel, case parameters); the arguments are built from them in the subprocess
# ----------------------------------------------------------------------------------------------

F32, BF16, F16 = "float32", "bfloat16", "float16"


def _cases():
    cases = []

    def add(module, kernel, **params):
        ident = ",".join(f"{k}={v}" for k, v in params.items())
        cases.append(pytest.param(module, kernel, params, id=f"{module}.{kernel}[{ident}]"))

    # ig_accumulate: act / grad float32, bfloat16 (as int16) or float16; aligned and odd sizes
    for dtype, rows, seq, features in [(F32, 8, 512, 11008), (BF16, 8, 512, 11008), (F16, 3, 77, 1000),
                                       (BF16, 1, 33, 4097)]:
        add("ig_accumulate", "_ig_accumulate_kernel", dtype=dtype, rows=rows, seq=seq, features=features)

    # radix select: every format, both modes and both ABSOLUTE values, first passes (no prefix) and later
    # passes (a prefix: masks as signed 32-bit, or 64-bit index masks), 64-bit index offsets
    for dtype, mode, absolute, shift, prefix_bits, index_offset in [
            (F32, "KEYS", True, 24, 0, 0), (F32, "INDICES", False, 24, 8, 3 * BIG),
            (BF16, "KEYS", False, 0, 8, 0), (BF16, "INDICES", True, 8, 0, 1000),
            (F16, "KEYS", True, 8, 8, 0), (F16, "INDICES", False, 8, 8, 0)]:
        add("radix_select", "_radix_histogram_kernel", dtype=dtype, mode=mode, absolute=absolute, shift=shift,
            prefix_bits=prefix_bits, index_offset=index_offset, numel=1_000_003)
    for dtype, absolute, numel in [(F32, False, 1_000_003), (F32, True, BIG + 7), (BF16, False, 4096),
                                   (BF16, True, 1_000_003), (F16, False, 1_000_003), (F16, True, 4096)]:
        add("radix_select", "_select_mask_kernel", dtype=dtype, absolute=absolute, numel=numel)
        add("radix_select", "_bracket_mask_kernel", dtype=dtype, absolute=absolute, numel=numel)

    # the masked SophiaG ops (sophia_step, hessian_ema, nonfinite_check): every mask kind x parameter dtype,
    # gradient dtypes and flags spread over them; "big" parameters have 2^31 elements (USE_I64; the work
    # count itself int64 for FULL / DENSE)
    for kind, p, g, maximize, update_h, stochastic, big in [
            ("FULL", F32, F32, False, False, False, True), ("FULL", BF16, BF16, False, True, True, False),
            ("FULL", F16, F16, True, False, False, False), ("ROWS", F32, BF16, False, True, False, False),
            ("ROWS", BF16, F32, True, False, False, True), ("ROWS", F16, F32, False, False, False, False),
            ("COLS", F32, F16, True, False, False, False), ("COLS", BF16, BF16, False, True, True, True),
            ("COLS", F16, BF16, False, True, False, False), ("DENSE", F32, F32, False, True, False, False),
            ("DENSE", BF16, F16, True, False, True, False), ("DENSE", F16, F16, False, False, False, True)]:
        add("sophia_step", "_sophia_step_kernel", kind=kind, p=p, g=g, maximize=maximize, update_h=update_h,
            stochastic=stochastic, big=big)
    for kind, g, big in [("FULL", F32, False), ("ROWS", BF16, False), ("COLS", F16, False),
                         ("DENSE", BF16, False), ("FULL", BF16, True), ("COLS", F32, True)]:
        add("hessian_ema", "_hessian_ema_kernel", kind=kind, g=g, big=big)
    # out_index: count_nonfinite hands the kernel out[i:], an int64 pointer 8 * i bytes into its output
    for kind, g, big, out_index in [("FULL", F32, False, 0), ("ROWS", BF16, False, 1), ("COLS", F16, False, 2),
                                    ("DENSE", F32, False, 3), ("FULL", BF16, True, 0), ("DENSE", F16, True, 1)]:
        add("nonfinite_check", "_count_nonfinite_kernel", kind=kind, g=g, big=big, out_index=out_index)

    # ssiuu_regularize: g, phi, d dtypes (each its own), both penalties
    for g, p, d, squared, numel in [(F32, F32, F32, True, 4096), (BF16, BF16, BF16, False, 1_000_003),
                                    (F16, F16, F16, True, 4096), (BF16, F32, F16, False, BIG + 5),
                                    (F32, BF16, BF16, True, 1_000_003), (F16, BF16, F32, False, 4096)]:
        add("ssiuu_regularize", "_ssiuu_kernel", g=g, p=p, d=d, squared=squared, numel=numel)
    return cases


CASES = _cases()
CASE_IDS = [c.id for c in CASES]

# ----------------------------------------------------------------------------------------------
# argument builders (run in the subprocess, on the modules imported with the interpreter off): each
# returns (args, kwargs) of the kernel launch exactly as the launcher's `kernel[grid](...)` call
# ----------------------------------------------------------------------------------------------


def _tensor(dtype, n=1):
    """A small CPU stand-in for a launch argument: the JIT reads only its dtype and data_ptr."""
    import torch

    return torch.empty(n, dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)


def _cuda():
    import torch

    return torch.device("cuda")  # only its .type is read by the launch-config helpers: no GPU needed


def _args_ig_accumulate(mod, dtype, rows, seq, features):
    import triton

    act = _tensor(dtype)
    positions = rows * seq
    # the launcher's GPU branch (ig_accumulate in triton_kernels/ig_accumulate.py)
    block_f, block_p = mod._GPU_BLOCK_F, mod._GPU_BLOCK_P
    tiles = triton.cdiv(features, block_f)
    chunks = max(1, min(triton.cdiv(8 * HOPPER_SMS, tiles), triton.cdiv(positions, mod._GPU_MIN_CHUNK), 65535))
    chunk = triton.cdiv(triton.cdiv(positions, chunks), block_p) * block_p
    args = (_tensor("float32"), mod.bits_view(act), mod.bits_view(_tensor(dtype)), _tensor("float32"),
            _tensor("uint8"), seq, features, positions, chunk)
    return args, dict(IS_BF16=dtype == BF16, BLOCK_P=block_p, BLOCK_F=block_f, num_warps=mod._GPU_WARPS)


def _args_radix_histogram(mod, dtype, mode, absolute, shift, prefix_bits, index_offset, numel):
    import torch

    view_dtype, sign, inf, wide = mod._FORMATS[getattr(torch, dtype)]
    mode = getattr(mod, mode)
    # the prefix: of the keys (KEYS, 32-bit) or of the global indices (INDICES, the middle of this chunk)
    key_prefix = 0x5A5A5A5A if mode == mod.KEYS else index_offset + numel // 2
    # mask / target, first / end, as radix_histogram computes them
    high = shift + 8
    mask = ((1 << 64) - (1 << high)) if prefix_bits > 0 and high < 64 else 0
    target = (key_prefix & ((1 << 64) - 1)) & mask
    key_mask = key_target = key_equal32 = 0
    first, end = 0, numel
    if mode == mod.KEYS:
        key_mask, key_target = (0, 1) if target >> 32 else (mask & 0xFFFFFFFF, target)
    else:
        key_equal32 = 0x3C01  # a key of every format
        if mask:
            low = mod._i64(target) - int(index_offset)
            first, end = max(0, low), min(numel, low + (1 << high))
    assert first < end, "a launch the launcher would skip"
    args = (_tensor(view_dtype), _tensor("int64", 257), first, end, mod._i32(key_mask), mod._i32(key_target),
            shift if shift < 32 else 0, 0xFF if shift < 32 else 0, mod._i32(key_equal32), int(index_offset),
            mod._i64(mask), mod._i64(target), min(shift, 63))
    return args, dict(MODE=mode, ABSOLUTE=bool(absolute), SIGN=sign, INF=inf, WIDE=wide, BLOCK=mod._GPU_HIST_BLOCK,
                      num_warps=mod._GPU_HIST_WARPS)


def _args_select_mask(mod, dtype, absolute, numel):
    import torch

    view_dtype, sign, inf, wide = mod._FORMATS[getattr(torch, dtype)]
    full = (1 << (32 if wide else 16)) - 1
    kth, cut = full - 0x1234, numel // 3  # a key with the sign bit set: passed as a negative int32
    args = (_tensor(view_dtype), _tensor("uint8"), numel, mod._i32(kth), cut)
    return args, dict(ABSOLUTE=bool(absolute), SIGN=sign, INF=inf, WIDE=wide, BLOCK=mod._GPU_SELECT_BLOCK,
                      num_warps=mod._GPU_SELECT_WARPS)


def _args_bracket_mask(mod, dtype, absolute, numel):
    import torch

    view_dtype, sign, inf, wide = mod._FORMATS[getattr(torch, dtype)]
    full = (1 << (32 if wide else 16)) - 1
    lo, hi = full - 0x4321, full - 0x1234  # keys with the sign bit set: passed as negative int32
    args = (_tensor(view_dtype), _tensor("uint8"), _tensor("int64"), _tensor(view_dtype), _tensor("int64", 3), numel,
            mod._i32(lo), mod._i32(hi), numel // 16)
    return args, dict(ABSOLUTE=bool(absolute), SIGN=sign, INF=inf, WIDE=wide, BLOCK=mod._GPU_SELECT_BLOCK,
                      num_warps=mod._GPU_SELECT_WARPS)


def _mask_layout(mod, kind, big, dummy):
    """(kind code, mask tensor handed to the kernel, n_index, row_len, numel) of a parameter: [4096, 1024]
    (or [2^17, 2^14] = 2^31 elements when big), 300 rows / columns selected for ROWS / COLS. The kind codes
    come from masked_elements (shared by the masked ops' modules), the mask argument from mod's launcher."""
    import importlib

    masked = importlib.import_module(f"{PACKAGE}.masked_elements")
    rows, row_len = (2**17, 2**14) if big else (4096, 1024)
    code = getattr(masked, kind)
    mask_tensor = {masked.ROWS: _tensor("int64", 300), masked.COLS: _tensor("int64", 300),
                   masked.DENSE: _tensor("uint8"), masked.FULL: _tensor("int64", 0)}[code]
    mask_arg, n_index = mod._mask_arg(code, mask_tensor, dummy)
    return code, mask_arg, n_index, row_len, rows * row_len


def _args_sophia_step(mod, kind, p, g, maximize, update_h, stochastic, big):
    h = _tensor("float32")
    kind, mask_arg, n_index, row_len, numel = _mask_layout(mod, kind, big, h)
    work = mod._work(kind, numel, n_index, row_len)
    block, opts = mod._launch_config(_cuda(), work)
    stochastic = p == BF16 and stochastic
    beta2 = 0.99 if update_h else 0.0
    args = (mod.bits_view(_tensor(p)), mod.bits_view(_tensor(g)), _tensor("float32"), h, mask_arg, _tensor("int64"),
            _tensor("int64"), work, n_index, row_len, 1e-4, 1.0 - 1e-5, 0.965, 1.0 - 0.965, beta2, 1.0 - beta2 if update_h else 0.0,
            0.04 * 480, 1e-15, mod._i32(0xDEADBEEF) if stochastic else 0)
    return args, dict(KIND=kind, P_BF16=p == BF16, G_BF16=g == BF16, MAXIMIZE=bool(maximize), UPDATE_H=bool(update_h),
                      STOCHASTIC=stochastic, USE_I64=mod._use_i64(numel, block), BLOCK=block, **opts)


def _args_hessian_ema(mod, kind, g, big):
    h = _tensor("float32")
    kind, mask_arg, n_index, row_len, numel = _mask_layout(mod, kind, big, h)
    work = mod._work(kind, numel, n_index, row_len)
    block, opts = mod._launch_config(_cuda(), work)
    args = (h, mod.bits_view(_tensor(g)), mask_arg, work, n_index, row_len, 0.99, 1.0 - 0.99)
    return args, dict(KIND=kind, G_BF16=g == BF16, USE_I64=mod._use_i64(numel, block), BLOCK=block, **opts)


def _args_count_nonfinite(mod, kind, g, big, out_index):
    import torch

    grad = _tensor(g)
    kind, mask_arg, n_index, row_len, numel = _mask_layout(mod, kind, big, grad)
    work = mod._work(kind, numel, n_index, row_len)
    block, opts = mod._launch_config(_cuda(), work)
    view_dtype, exp_mask = mod._EXP_MASKS[getattr(torch, g)]
    out = _tensor("int64", 8)
    args = (grad.view(view_dtype), mask_arg, out[out_index:], work, n_index, row_len)
    return args, dict(EXP_MASK=exp_mask, KIND=kind, USE_I64=mod._use_i64(numel, block), BLOCK=block, **opts)


def _args_ssiuu(mod, g, p, d, squared, numel):
    import torch

    block, opts = mod._launch_config(_cuda(), numel)
    scale = float(torch.tensor(2.0 * 1e-3 if squared else 1e-3, dtype=torch.float32))
    args = (mod.bits_view(_tensor(g)), mod.bits_view(_tensor(p)), mod.bits_view(_tensor(d)), mod.bits_view(_tensor(p)),
            mod.bits_view(_tensor(d)), numel, scale)
    return args, dict(G_BF16=g == BF16, P_BF16=p == BF16, D_BF16=d == BF16, SQUARED=bool(squared),
                      USE_I64=numel + block > mod._I32_LIMIT, BLOCK=block, **opts)


BUILDERS = {
    ("ig_accumulate", "_ig_accumulate_kernel"): _args_ig_accumulate,
    ("radix_select", "_radix_histogram_kernel"): _args_radix_histogram,
    ("radix_select", "_select_mask_kernel"): _args_select_mask,
    ("radix_select", "_bracket_mask_kernel"): _args_bracket_mask,
    ("sophia_step", "_sophia_step_kernel"): _args_sophia_step,
    ("hessian_ema", "_hessian_ema_kernel"): _args_hessian_ema,
    ("nonfinite_check", "_count_nonfinite_kernel"): _args_count_nonfinite,
    ("ssiuu_regularize", "_ssiuu_kernel"): _args_ssiuu,
}

# ----------------------------------------------------------------------------------------------
# the subprocess: enumerate the kernels, compile every case, write the results as JSON
# ----------------------------------------------------------------------------------------------


def _unavailable():
    """Why this machine cannot compile for sm_90 (None when it can): triton, its NVIDIA backend, ptxas."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    from triton.backends import backends

    if "nvidia" not in backends:
        return f"triton's NVIDIA backend is not installed (backends: {sorted(backends)})"
    try:
        from triton import knobs

        knobs.nvidia.ptxas.path  # noqa: B018 (resolves and runs `ptxas --version`; raises when missing)
    except Exception as e:  # noqa: BLE001
        return f"triton's ptxas is unavailable: {e}"
    return None


def _enumerate_kernels():
    """(kernels, helpers): "module.name" of every @triton.jit function of the package's modules. Kernels are
    the ones launched as `name[grid](...)` in a module, or called by no other jitted function."""
    import ast
    import importlib
    import inspect
    import pkgutil
    import textwrap

    from triton.runtime.jit import JITFunction

    package = importlib.import_module(PACKAGE)
    jitted, launched = {}, set()
    for info in pkgutil.iter_modules(package.__path__):
        mod = importlib.import_module(f"{PACKAGE}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                jitted[f"{info.name}.{name}"] = obj
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript) \
                    and isinstance(node.func.value, ast.Name):
                launched.add(f"{info.name}.{node.func.value.id}")
    called = set()
    for fn in jitted.values():
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))):
            if isinstance(node, ast.Name) and isinstance(fn.fn.__globals__.get(node.id), JITFunction) \
                    and node.id != fn.fn.__name__:
                called.add(id(fn.fn.__globals__[node.id]))
    kernels = sorted(k for k, fn in jitted.items() if k in launched or id(fn) not in called)
    return kernels, sorted(set(jitted) - set(kernels))


class _Sm90Driver:
    """Stand-in for Triton's active driver: JITFunction.run asks it only for the current device, stream and
    target (it loads nothing in warmup mode), so compiles target sm_90 with or without a GPU here."""

    def __init__(self, target):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def _compile_case(module, kernel, params):
    import importlib

    mod = importlib.import_module(f"{PACKAGE}.{module}")
    args, kwargs = BUILDERS[(module, kernel)](mod, **params)
    compiled = getattr(mod, kernel).warmup(*args, grid=(1,), **kwargs)
    asm, meta = compiled.asm, compiled.metadata
    ptx = asm.get("ptx", "")
    return {
        "asm": sorted(asm.keys()),
        "ptx_targets": [line.split()[1] for line in ptx.splitlines() if line.startswith(".target")],
        "ptx_entries": ptx.count(".entry "),
        "cubin_bytes": len(asm.get("cubin", b"")),
        "target": [meta.target.backend, meta.target.arch, meta.target.warp_size],
        "signature": {k: str(v) for k, v in compiled.src.signature.items()},
        "num_warps": meta.num_warps,
        "enable_fp_fusion": meta.enable_fp_fusion,
        "shared": meta.shared,
        "requested": {k: kwargs[k] for k in ("num_warps", "enable_fp_fusion") if k in kwargs},
    }


def _worker(out_path):
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "the compile worker needs the interpreter off"
    report = {"unavailable": _unavailable(), "kernels": [], "helpers": [], "cases": {}}
    if report["unavailable"] is None:
        from triton.backends.compiler import GPUTarget
        from triton.runtime.driver import driver

        driver.set_active(_Sm90Driver(GPUTarget(*TARGET)))
        report["kernels"], report["helpers"] = _enumerate_kernels()
        for case in CASES:
            module, kernel, params = case.values
            try:
                result = _compile_case(module, kernel, params)
            except Exception:  # noqa: BLE001 (reported as that case's failure)
                result = {"error": traceback.format_exc(limit=-8)}
            report["cases"][case.id] = result
    with open(out_path, "w") as f:
        json.dump(report, f)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compile_report(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed")
    tmp = tmp_path_factory.mktemp("triton_sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_HOME=str(tmp))  # a cold cache: every run compiles
    out = tmp / "report.json"
    try:
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], env=env, capture_output=True,
                              text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the sm_90 compile worker ran past {WORKER_TIMEOUT_S} s:\n{e.stderr or ''}")
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"the sm_90 compile worker failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    report = json.loads(out.read_text())
    if report["unavailable"]:
        pytest.skip(report["unavailable"])
    return report


def test_every_kernel_has_a_compile_case(compile_report):
    covered = {f"{module}.{kernel}" for module, kernel, _ in (c.values for c in CASES)}
    kernels = set(compile_report["kernels"])
    assert kernels, "no @triton.jit kernel found in simu_fast.triton_kernels"
    missing = sorted(kernels - covered)
    assert not missing, (f"Triton kernels with no sm_90 compile case in {os.path.basename(__file__)}: {missing}; "
                         "add cases at the dtypes / constexprs / block sizes their launchers use")
    stale = sorted(covered - kernels)
    assert not stale, f"compile cases for kernels that no longer exist: {stale}"


@pytest.mark.parametrize("module, kernel, params", CASES)
def test_kernel_compiles_for_sm90(compile_report, request, module, kernel, params):
    result = compile_report["cases"][request.node.callspec.id]
    if "error" in result:
        pytest.fail(f"{module}.{kernel} {params} does not compile for sm_90:\n{result['error']}", pytrace=False)
    assert {"ptx", "cubin"} <= set(result["asm"]), result["asm"]
    assert result["target"] == list(TARGET)
    assert result["ptx_targets"] and all(t.startswith("sm_90") for t in result["ptx_targets"]), result["ptx_targets"]
    assert result["ptx_entries"] == 1 and result["cubin_bytes"] > 0
    for option, value in result["requested"].items():  # the launcher's options reached the compiler
        assert result[option] == value, (option, result[option], value)
    assert result["shared"] <= HOPPER_MAX_SHARED, f"needs {result['shared']} bytes of shared memory per block"


if __name__ == "__main__":
    _worker(sys.argv[1])
