"""Builds simu_fast and its extension simu_fast._C.

C++ (OpenMP) kernels are always built. CUDA kernels are added when nvcc and a CUDA build of torch are
present; SIMU_FAST_CUDA=0 / 1 forces the choice. SIMU_FAST_NO_EXTENSION=1 installs the pure-Python
package only (reference and Triton backends).
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _cuda_home():
    # torch guesses CUDA_HOME from the nvcc path (/usr/local/bin/nvcc -> /usr/local), which breaks the
    # link on -lcudart; prefer the real toolkit directory.
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in ("/usr/local/cuda",):
        if os.path.isdir(os.path.join(candidate, "include")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _want_cuda(torch):
    forced = os.environ.get("SIMU_FAST_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and _cuda_home() is not None and shutil.which("nvcc") is not None


def _pip_cuda_includes():
    # CUDA's extra headers (cusparse.h, cublas_v2.h ...) that torch's headers include come from the
    # nvidia-* pip wheels, not always from the toolkit.
    dirs = []
    for path in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs.extend(d for d in glob.glob(os.path.join(path, pattern)) if os.path.isdir(d))
    return sorted(set(dirs))


def _gpu_targets(cpp_extension) -> str:
    """The -gencode targets torch's build will use, as "sm_90,compute_90" (machine code, PTX)."""
    targets = []
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except Exception:  # a private helper of torch: without it the extension reports no targets
        return ""
    for flag in flags:
        for part in flag.split("code=")[-1].strip("[]").split(","):
            if part.startswith(("sm_", "compute_")) and part not in targets:
                targets.append(part)
    return ",".join(targets)


def _extensions():
    if os.environ.get("SIMU_FAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        sys.exit("simu_fast builds its kernels against torch, which is not installed here: install torch first "
                 "(pip install torch), then pip install --no-build-isolation -e . ; or set "
                 "SIMU_FAST_NO_EXTENSION=1 for the pure-Python package")

    cuda = _want_cuda(torch)
    if cuda:
        os.environ["CUDA_HOME"] = _cuda_home()
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # torch adds the C++ standard it needs (C++20 from 2.10 on). No FMA contraction: the kernels round
    # exactly like the eager reference, which multiplies and adds in separate steps. No trapping math:
    # lets GCC if-convert the clip and sign selects, without which the hot loops do not vectorise.
    extra = {"cxx": ["-O3", "-ffp-contract=off", "-fno-trapping-math", *openmp]}
    macros = []
    include_dirs = [os.path.join(ROOT, "csrc")]
    if cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _pip_cuda_includes()
        macros.append(("SIMU_FAST_WITH_CUDA", None))
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not arch and not torch.cuda.is_available():
            # No GPU to query (CI): one architecture proves the kernels compile and link, at half the
            # build time. A machine with a GPU builds for its own architecture.
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
            print("simu_fast: no GPU to build for and TORCH_CUDA_ARCH_LIST unset: building the CUDA kernels for "
                  "sm_90 (Hopper) only; on another GPU they fall back to Triton. Set TORCH_CUDA_ARCH_LIST to "
                  "choose.", file=sys.stderr)
        targets = _gpu_targets(cpp_extension)
        macros.append(("SIMU_FAST_CUDA_ARCHS", f'"{targets}"'))
        extra["nvcc"] = ["-O3", "-lineinfo"]  # no fast-math: kernels must match the reference
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls(
        name="simu_fast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=openmp,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
