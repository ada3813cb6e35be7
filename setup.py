"""Build script for lmkern.

What gets built is decided from the environment only: no GPU is queried and nothing is downloaded.

* ``lmkern._C`` (C++ CPU kernels) is always built when torch is importable at build time.
* The CUDA kernels are added when a CUDA build of torch and a CUDA toolkit (nvcc) are present,
  or when ``LMKERN_FORCE_CUDA=1``.  ``LMKERN_CUDA_ARCHS`` (e.g. ``"8.0;9.0a"``) picks the
  architectures; by default torch's own rule applies (``TORCH_CUDA_ARCH_LIST``, else the local GPU).
* ``LMKERN_NO_EXT=1`` installs pure Python (Triton and reference backends only).
* ``LMKERN_DEBUG_INFO=1`` keeps debug info in the C++ objects (built with ``-g0`` otherwise).
* ``LMKERN_EMULATE_AVX512=<SIMDe include dir>``, for tests only (``make test-avx512-emulated``):
  the AVX-512 copy of the CPU kernels runs on SIMDe's emulation of the instructions, on any x86-64
  CPU with AVX2 (csrc/cpu/avx512_emulation.h). Much slower; never for use.
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _extensions():
    if _flag("LMKERN_NO_EXT"):
        print("lmkern: LMKERN_NO_EXT=1, installing pure Python (no lmkern._C)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "lmkern: WARNING: torch is not importable in the build environment, so the C++/CUDA "
            "kernels are NOT built. Install with `pip install --no-build-isolation .` to build them.",
            file=sys.stderr,
        )
        return [], {}

    cpu_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")))
    cpu_sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cuda_sources += _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))

    with_cuda = _flag("LMKERN_FORCE_CUDA") or (
        torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno"]
    if not _flag("LMKERN_DEBUG_INFO"):
        # Python's CFLAGS carry -g: debug info doubled the C++ compile time (CI builds from
        # scratch) and made lmkern._C 30 MB. LMKERN_DEBUG_INFO=1 keeps it.
        cxx_flags.append("-g0")
    simde = os.environ.get("LMKERN_EMULATE_AVX512")
    if simde:
        include_dirs.append(simde)
        cxx_flags.append("-DLMKERN_EMULATE_AVX512")
    # Recorded in lmkern._C so `lmkern info` can tell a build against another torch.
    define_macros = [("LMKERN_TORCH_VERSION", '"%s"' % torch.__version__.split("+")[0])]

    if with_cuda:
        archs = os.environ.get("LMKERN_CUDA_ARCHS")
        if archs:
            # torch's build helper reads TORCH_CUDA_ARCH_LIST; without it, it uses the local GPU.
            os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        nvcc_flags = [
            "-O3",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            "-lineinfo",
        ]
        ext = cpp_extension.CUDAExtension(
            "lmkern._C",
            cpu_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=define_macros + [("LMKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "lmkern._C",
            cpu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "lmkern",
        "lmkern.reference",
        "lmkern.ops",
        "lmkern.nn",
        "lmkern.integrations",
        "lmkern.kernels",
    ],
    package_dir={"lmkern.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
