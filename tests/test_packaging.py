"""The wheel carries the CUDA sources (the PyPI wheel of an earlier port lacked them) and, as the editable wheel
does, the start-up hook that registers ks2py with SpikeInterface; the GPU op table defines every op of the CPU
one."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_wheel_contains_every_cuda_source(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True)
    wheel = next(tmp_path.glob("si_ks2py-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "src" / "si_ks2py" / "gpu").glob("*.cu"))
    assert sources, "no .cu sources found"
    assert {f"si_ks2py/gpu/{name}" for name in sources} <= names
    assert "si_ks2py/gpu/ops.py" in names and "si_ks2py/cpu/ops.py" in names
    assert_start_up_hook_at_the_root(zipfile.ZipFile(wheel))


def assert_start_up_hook_at_the_root(wheel: zipfile.ZipFile):
    """A wheel's root is site-packages, the only folder whose .pth files Python runs at start-up."""
    assert wheel.read("si_ks2py.pth").decode() == "import _si_ks2py_startup\n"
    record = wheel.read(next(n for n in wheel.namelist() if n.endswith(".dist-info/RECORD"))).decode()
    assert "si_ks2py.pth," in record  # so pip uninstall removes it


@pytest.mark.slow
def test_editable_wheel_installs_the_start_up_hook(tmp_path):
    """PEP 660 editable installs link the sources and skip build_lib: setup.py puts the .pth in the wheel itself,
    and the editable path entry makes _si_ks2py_startup importable from src/."""
    from build import ProjectBuilder
    from build.env import DefaultIsolatedEnv

    with DefaultIsolatedEnv() as env:
        builder = ProjectBuilder.from_isolated_env(env, ROOT)
        env.install(builder.build_system_requires)
        env.install(builder.get_requires_for_build("editable"))
        wheel = zipfile.ZipFile(builder.build("editable", tmp_path))
    assert_start_up_hook_at_the_root(wheel)
    editable_pth = next(n for n in wheel.namelist() if n.startswith("__editable__") and n.endswith(".pth"))
    assert (ROOT / "src").resolve() in [Path(p).resolve() for p in wheel.read(editable_pth).decode().split()]
    assert editable_pth < "si_ks2py.pth"  # site runs .pth files in name order: src/ is on sys.path first


def test_every_cpu_op_is_defined_by_the_gpu_op_table():
    """Read from gpu/ops.py's source (and the sibling modules it imports ops from), so that a machine without CuPy
    catches an op the GPU table lost (the GPU parity tests check the same on a GPU)."""
    import ast

    from si_ks2py.cpu import ops as cpu

    gpu = ROOT / "src" / "si_ks2py" / "gpu"

    def module_body(name):
        return ast.parse((gpu / f"{name}.py").read_text()).body

    def functions(body):
        return {node.name for node in body if isinstance(node, ast.FunctionDef)}

    body = module_body("ops")
    defined = functions(body)
    for node in body:  # ops imported from a sibling module count where that module defines them
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            defined |= {alias.name for alias in node.names} & functions(module_body(node.module))
    ops = {name for name in dir(cpu) if not name.startswith("_") and callable(getattr(cpu, name))}
    assert ops - defined == set()
