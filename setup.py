"""Build: the pure-Python package, `kernels/` installed as `densegrpo_fast.kernels`, and the optional C++/CUDA ops.

The C++ CPU extension (`densegrpo_fast._C`, csrc/sde_ops.cpp, OpenMP) is built when torch is importable at build
time (`pip install --no-build-isolation`). The CUDA extension (`densegrpo_fast._C_cuda`) is built only when nvcc and
a CUDA build of torch are both present. A failed optional build prints a warning and the package falls back to
the Triton / torch paths at run time; it never fails the install.
"""
import os
import shutil
import sys
import warnings

from setuptools import find_packages, setup


def _extensions():
    if os.environ.get("DENSEGRPO_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # torch missing in an isolated build env
        warnings.warn(f"densegrpo_fast: torch not importable at build time ({exc}); C++ ops not built")
        return [], {}

    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if os.environ.get("DENSEGRPO_NATIVE", "1") == "1":
        flags.append("-march=native")
    exts = [CppExtension("densegrpo_fast._C", ["csrc/sde_ops.cpp"], extra_compile_args=flags,
                         extra_link_args=["-fopenmp"])]
    if torch.version.cuda and shutil.which("nvcc"):
        exts.append(CUDAExtension("densegrpo_fast._C_cuda", ["csrc/sde_ops_cuda.cpp", "csrc/sde_ops_kernels.cu"],
                                  extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]}))

    class OptionalBuildExt(BuildExtension):
        failed: dict = {}

        def run(self):
            super().run()
            # What this install attempted and what failed: the ops dispatch warns, and the tests fail, when an
            # attempted backend cannot be imported (densegrpo_fast/ops/__init__.py: build_info).
            import json
            info = {"attempted": [e.name for e in exts], "failed": self.failed}
            with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "densegrpo_fast",
                                   "_build_info.json"), "w") as f:
                json.dump(info, f, indent=1)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                self.failed[ext.name] = f"{type(exc).__name__}: {exc}"
                print(f"WARNING: optional extension {ext.name} failed to build ({exc}); "
                      "falling back to Triton/torch ops", file=sys.stderr)

        def _built(self):
            return [e for e in self.extensions if e.name not in self.failed]

        def copy_extensions_to_source(self):
            self.extensions = self._built()
            super().copy_extensions_to_source()

        def get_outputs(self):
            self.extensions = self._built()
            return super().get_outputs()

        def get_output_mapping(self):
            self.extensions = self._built()
            return super().get_output_mapping()

    return exts, {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(
    packages=find_packages(include=["densegrpo_fast", "densegrpo_fast.*"]) + ["densegrpo_fast.kernels"],
    package_dir={"densegrpo_fast.kernels": "kernels"},
    package_data={"densegrpo_fast": ["assets/**/*"], "densegrpo_fast.experiments": ["methods/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
