"""make gpu-check's preflight (firmware/gpu_preflight.py): each thing a GPU box can lack is named
with its fix. The import machinery, PATH and the filesystem are faked: this machine has none of
TensorRT, pycuda, the CUDA toolkit or an NVIDIA driver."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from firmware import gpu_preflight as pf

PY_INCLUDE = Path("/usr/include/python3.10")
TOOLKIT = {
    "/usr/local/cuda/bin/nvcc",
    "/usr/local/cuda/include/cuda.h",
    "/proc/driver/nvidia/version",
    str(PY_INCLUDE / "Python.h"),
}


def machine(
    *,
    files: set[str] = TOOLKIT,
    on_path: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    modules: dict[str, Any] | None = None,
) -> pf.Machine:
    """A box with ``files``, programs ``on_path`` and importable ``modules`` (a value that is an
    exception is raised on import, as a broken install does)."""
    path = {"g++": "/usr/bin/g++", "nvcc": "/usr/local/cuda/bin/nvcc"}
    path.update(on_path or {})
    found = dict(modules or {})

    def import_module(name: str) -> Any:
        value = found.get(name)
        if value is None:
            raise ModuleNotFoundError(f"No module named '{name}'")
        if isinstance(value, BaseException):
            raise value
        return value

    return pf.Machine(
        env=env or {},
        which=lambda name: path.get(name) or None,
        exists=lambda p: str(p) in files,
        find_spec=lambda name: object() if name.split(".")[0] in found else None,
        import_module=import_module,
        python_include=PY_INCLUDE,
    )


TRT10 = SimpleNamespace(__version__="10.16.1.11")
WORKING = {"tensorrt": TRT10, "pycuda": SimpleNamespace(), "pycuda.driver": SimpleNamespace()}


def test_a_ready_machine_passes_both_phases(capsys: pytest.CaptureFixture[str]) -> None:
    box = machine(modules=WORKING)
    assert pf.preflight(box, before_install=True) == []
    assert pf.preflight(box, before_install=False) == []
    assert pf.main([], box) == pf.EXIT_OK
    assert capsys.readouterr().err == ""


def test_no_tensorrt_names_the_extra() -> None:
    box = machine(modules={"pycuda": SimpleNamespace(), "pycuda.driver": SimpleNamespace()})
    (problem,) = pf.preflight(box, before_install=False)
    assert "tensorrt) is not installed" in problem and ".[tensorrt]" in problem
    assert "r580" in problem  # the cu13 choice is named


def test_no_tensorrt_on_a_jetson_points_at_jetpack() -> None:
    box = machine(
        files=TOOLKIT | {"/etc/nv_tegra_release"},
        modules={"pycuda": SimpleNamespace(), "pycuda.driver": SimpleNamespace()},
    )
    (problem,) = pf.preflight(box, before_install=False)
    assert "python3-libnvinfer" in problem and "JETSON=1" in problem


def test_tensorrt_11_is_refused_with_the_pin_that_fixes_it() -> None:
    box = machine(modules=WORKING | {"tensorrt": SimpleNamespace(__version__="11.0.0.114")})
    (problem,) = pf.preflight(box, before_install=False)
    assert "TensorRT 11.0.0.114 is installed; edgeid needs TensorRT 10.x" in problem
    assert "tensorrt-cu12>=10,<11" in problem


def test_a_tensorrt_that_does_not_load_says_why() -> None:
    broken = OSError("libnvinfer.so.10: cannot open shared object file")
    (problem,) = pf.preflight(machine(modules=WORKING | {"tensorrt": broken}), before_install=False)
    assert "does not import (OSError: libnvinfer.so.10" in problem


def test_pycuda_without_any_toolkit() -> None:
    box = machine(
        files={"/proc/driver/nvidia/version", str(PY_INCLUDE / "Python.h")},
        on_path={"nvcc": ""},
        modules={"tensorrt": TRT10},
    )
    (before,) = pf.preflight(box, before_install=True)
    assert "no nvcc on PATH, CUDA_ROOT unset, nothing at /usr/local/cuda" in before
    assert "CUDA_INC_DIR alone is not enough" in before
    (after,) = pf.preflight(box, before_install=False)
    assert after.startswith("pycuda is not installed: ") and "no nvcc on PATH" in after


def test_pycuda_with_the_toolkit_off_path_says_which_path() -> None:
    box = machine(on_path={"nvcc": ""}, modules={"tensorrt": TRT10})
    (problem,) = pf.preflight(box, before_install=True)
    assert "/usr/local/cuda/bin/nvcc but not on PATH" in problem
    assert "export PATH=/usr/local/cuda/bin:$PATH" in problem


def test_pycuda_with_a_wrong_cuda_root_and_include_dir() -> None:
    box = machine(
        on_path={"nvcc": ""},
        env={"CUDA_ROOT": "/opt/cuda-12.4", "CUDA_INC_DIR": "/opt/include"},
        modules={"tensorrt": TRT10},
    )
    problems = pf.preflight(box, before_install=True)
    assert any("CUDA_ROOT=/opt/cuda-12.4 has no bin/nvcc" in p for p in problems)
    assert any("no cuda.h in /opt/include (CUDA_INC_DIR)" in p for p in problems)


def test_pycuda_build_needs_a_compiler_and_python_headers() -> None:
    box = machine(files=TOOLKIT - {str(PY_INCLUDE / "Python.h")}, on_path={"g++": ""})
    problems = pf.preflight(box, before_install=True)
    assert any("no C++ compiler" in p for p in problems)
    assert any("Python.h is missing: apt install python3-dev" in p for p in problems)


def test_an_installed_pycuda_skips_the_build_checks() -> None:
    box = machine(files={"/proc/driver/nvidia/version"}, on_path={"nvcc": "", "g++": ""})
    box = replace(box, find_spec=lambda name: object() if name == "pycuda" else None)
    assert pf.preflight(box, before_install=True) == []


def test_pycuda_without_the_driver_library() -> None:
    broken = ImportError("libcuda.so.1: cannot open shared object file")
    problems = pf.preflight(
        machine(modules=WORKING | {"pycuda.driver": broken}), before_install=False
    )
    (problem,) = problems
    assert "pycuda.driver does not import (ImportError: libcuda.so.1" in problem


def test_no_driver_and_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    box = machine(files=TOOLKIT - {"/proc/driver/nvidia/version"}, modules=WORKING)
    assert pf.main(["--before-install"], box) == pf.EXIT_MISSING
    err = capsys.readouterr().err
    assert "gpu-check preflight: no NVIDIA driver" in err
    assert "nothing was checked" in err
