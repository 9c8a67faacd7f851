"""`make gpu-check`'s preflight: says exactly what this machine lacks for TensorRT, before and
after ``pip install -e '.[tensorrt]'``.

* ``--before-install``: the NVIDIA driver, and what pycuda's source build needs (pycuda has no
  Linux wheel): the CUDA toolkit found through ``CUDA_ROOT`` or ``nvcc`` on ``PATH`` (pycuda's
  setup looks nowhere else; ``CUDA_INC_DIR`` alone is not enough), its ``cuda.h``, a C++
  compiler and Python's headers. Skipped for whatever already imports.
* after the install: ``tensorrt`` imports and is 10.x (11 removes what the backend uses), and
  ``pycuda.driver`` imports.

Each problem is one line naming the fix; exit 0 when nothing is missing, 2 otherwise (the same
"nothing was checked" status as gpu_check.py). Everything the checks read is passed in, so the
tests fake the import machinery and the filesystem.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EXIT_OK = 0
EXIT_MISSING = 2
SUPPORTED_TRT_MAJOR = 10
# Where NVIDIA's installers and JetPack put the toolkit (nvcc is not on PATH by default there).
DEFAULT_CUDA_ROOT = Path("/usr/local/cuda")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
JETSON_RELEASE_FILE = Path("/etc/nv_tegra_release")
INSTALL_HINT = (
    "pip install -e '.[tensorrt]' (TensorRT for CUDA 12, NVIDIA driver r525 or later; "
    "'.[tensorrt-cu13]' for CUDA 13, driver r580 or later)"
)
JETSON_HINT = (
    "on a Jetson TensorRT comes from JetPack: sudo apt install python3-libnvinfer, then "
    "make clean && make setup JETSON=1 (a venv that sees the system packages)"
)


@dataclass(frozen=True)
class Machine:
    """What the checks read: the environment, PATH look-ups, files and the import system."""

    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    which: Callable[[str], str | None] = shutil.which
    exists: Callable[[Path], bool] = Path.exists
    find_spec: Callable[[str], Any] = importlib.util.find_spec
    import_module: Callable[[str], Any] = importlib.import_module
    python_include: Path = field(default_factory=lambda: Path(sysconfig.get_paths()["include"]))

    @property
    def jetson(self) -> bool:
        return self.exists(JETSON_RELEASE_FILE)


def _importable(machine: Machine, name: str) -> bool:
    try:
        return machine.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def check_driver(machine: Machine) -> list[str]:
    if machine.jetson or machine.exists(DRIVER_VERSION_FILE) or machine.which("nvidia-smi"):
        return []
    return [
        "no NVIDIA driver: neither nvidia-smi nor /proc/driver/nvidia/version exists; install "
        "the NVIDIA driver for this GPU (r525 or later for TensorRT's CUDA 12 build) and reboot"
    ]


def check_pycuda_build(machine: Machine) -> list[str]:
    """What pycuda's source build will miss (nothing when pycuda already imports)."""
    if _importable(machine, "pycuda"):
        return []
    problems = []
    root_text = machine.env.get("CUDA_ROOT")
    nvcc = machine.which("nvcc")
    root: Path | None
    if root_text:
        root = Path(root_text)
        if not machine.exists(Path(root_text) / "bin" / "nvcc"):
            problems.append(
                f"CUDA_ROOT={root_text} has no bin/nvcc: point CUDA_ROOT at the CUDA toolkit "
                "(the folder holding bin/nvcc and include/cuda.h)"
            )
    elif nvcc:
        root = Path(nvcc).resolve().parent.parent
    else:
        root = None
        default_nvcc = DEFAULT_CUDA_ROOT / "bin" / "nvcc"
        if machine.exists(default_nvcc):
            problems.append(
                f"pycuda builds from source and needs nvcc, which is at {default_nvcc} but not "
                f"on PATH: export PATH={default_nvcc.parent}:$PATH (or CUDA_ROOT="
                f"{DEFAULT_CUDA_ROOT})"
            )
        else:
            problems.append(
                "pycuda builds from source and needs the CUDA toolkit, which is not installed: "
                "no nvcc on PATH, CUDA_ROOT unset, nothing at /usr/local/cuda. Install it "
                "(e.g. apt install cuda-toolkit-12-6, or nvidia-cuda-toolkit) and put its bin/ "
                "on PATH or set CUDA_ROOT; CUDA_INC_DIR alone is not enough for pycuda"
            )
    include_text = machine.env.get("CUDA_INC_DIR")
    include = Path(include_text) if include_text else (root / "include" if root else None)
    if include is not None and not machine.exists(include / "cuda.h"):
        source = "CUDA_INC_DIR" if include_text else "the toolkit"
        problems.append(
            f"no cuda.h in {include} ({source}): install the CUDA toolkit's headers or set "
            "CUDA_INC_DIR to the folder holding cuda.h"
        )
    if not (machine.which("g++") or machine.which("c++")):
        problems.append("pycuda builds C++ code and no C++ compiler is on PATH: apt install g++")
    if not machine.exists(machine.python_include / "Python.h"):
        problems.append(
            f"pycuda's build needs Python's headers and {machine.python_include}/Python.h is "
            "missing: apt install python3-dev"
        )
    return problems


def check_modules(machine: Machine) -> list[str]:
    """TensorRT 10 and pycuda, as installed."""
    problems = []
    hint = JETSON_HINT if machine.jetson else INSTALL_HINT
    if not _importable(machine, "tensorrt"):
        problems.append(f"TensorRT's Python package (tensorrt) is not installed: {hint}")
    else:
        try:
            trt = machine.import_module("tensorrt")
        except Exception as exc:  # ImportError, or OSError for a missing libnvinfer
            problems.append(
                f"tensorrt is installed but does not import ({type(exc).__name__}: {exc}): "
                "its libraries (libnvinfer) or the NVIDIA driver are missing or mismatched"
            )
        else:
            version = str(getattr(trt, "__version__", "unknown"))
            if version.split(".")[0] != str(SUPPORTED_TRT_MAJOR):
                problems.append(
                    f"TensorRT {version} is installed; edgeid needs TensorRT "
                    f"{SUPPORTED_TRT_MAJOR}.x: pip install 'tensorrt-cu12>={SUPPORTED_TRT_MAJOR}"
                    f",<{SUPPORTED_TRT_MAJOR + 1}' (or pip install -e '.[tensorrt]')"
                )
    if not _importable(machine, "pycuda"):
        build = check_pycuda_build(machine)
        problems.append(
            "pycuda is not installed"
            + (": " + "; ".join(build) if build else ": pip install -e '.[tensorrt]'")
        )
    else:
        try:
            machine.import_module("pycuda.driver")
        except Exception as exc:  # ImportError: libcuda.so.1 (the driver's library) not found
            problems.append(
                f"pycuda is installed but pycuda.driver does not import ({type(exc).__name__}: "
                f"{exc}): the NVIDIA driver's libcuda is missing, or pycuda was built against "
                "another CUDA (pip install --force-reinstall --no-binary pycuda pycuda)"
            )
    return problems


def preflight(machine: Machine, *, before_install: bool) -> list[str]:
    if before_install:
        return check_driver(machine) + check_pycuda_build(machine)
    return check_driver(machine) + check_modules(machine)


def main(argv: Sequence[str] | None = None, machine: Machine | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--before-install",
        action="store_true",
        help="check what installing edgeid[tensorrt] needs, not what it installed",
    )
    args = parser.parse_args(argv)
    problems = preflight(machine or Machine(), before_install=args.before_install)
    for problem in problems:
        print(f"gpu-check preflight: {problem}", file=sys.stderr)
    if problems:
        print("gpu-check: nothing was checked (see above)", file=sys.stderr)
        return EXIT_MISSING
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
