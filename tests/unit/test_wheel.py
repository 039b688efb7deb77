"""The built wheel ships kernels/ and passes/ as autocp.kernels / autocp.passes.

Builds a wheel from a copy of the sources (so the shared checkout gets no build/
artefacts), installs it into a throw-away target dir, and imports from there in a fresh
interpreter whose working directory is *not* the repository. A broken package-dir
mapping, a missing sub-package or a generic top-level ``kernels``/``passes`` fails.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _copy_sources(dst: Path) -> dict:
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pkg_dir = cfg["tool"]["setuptools"].get("package-dir", {})
    for name in ("pyproject.toml", "README.md", "LICENSE", "setup.py", "setup.cfg", "MANIFEST.in"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for folder in sorted({v.split("/")[0] for v in pkg_dir.values()} | {"autocp"}):
        shutil.copytree(ROOT / folder, dst / folder, ignore=ignore)
    return pkg_dir


@pytest.mark.slow
def test_wheel_ships_kernels_and_passes_inside_autocp(tmp_path):
    src, wheels, target, elsewhere = (tmp_path / d for d in ("src", "wheels", "target", "elsewhere"))
    for d in (src, wheels, target, elsewhere):
        d.mkdir()
    _copy_sources(src)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(wheels)],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert build.returncode == 0, f"pip wheel failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    (whl,) = wheels.glob("autocp-*.whl")

    # the wheel's contents: every .py of kernels/ and passes/ under autocp/, no top-level names
    names = set(zipfile.ZipFile(whl).namelist())
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "passes" not in tops, f"generic top-level packages in the wheel: {sorted(tops)}"
    for folder in ("kernels", "passes"):
        for f in (ROOT / folder).rglob("*.py"):
            rel = f"autocp/{folder}/{f.relative_to(ROOT / folder).as_posix()}"
            assert rel in names, f"{rel} is missing from the wheel (sub-package not listed in pyproject?)"

    inst = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(whl)],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300,
    )
    assert inst.returncode == 0, f"pip install failed:\n{inst.stdout[-3000:]}\n{inst.stderr[-3000:]}"
    installed = {p.name for p in target.iterdir()}
    assert "autocp" in installed
    assert "kernels" not in installed and "passes" not in installed, sorted(installed)

    # import in a fresh interpreter: no site (so the editable install of the checkout is
    # not on the path), the target dir first, then the site-packages that hold torch
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
            if os.path.isdir(p)]
    code = (
        "import sys; sys.path.extend(%r)\n"
        "import autocp, autocp.kernels, autocp.passes\n"
        "print(autocp.__file__); print(autocp.kernels.__file__); print(autocp.passes.__file__)\n"
        "import importlib.util as u\n"
        "print(u.find_spec('kernels') is None, u.find_spec('passes') is None)\n"
        "print(autocp.kernels.select('tri_mm', *[__import__('torch').ones(1, 2, 2)] * 2, None).name)\n"
    ) % (deps,)
    env_run = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env_run["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, env=env_run,
                         cwd=str(elsewhere), timeout=300)
    assert run.returncode == 0, f"import from the installed wheel failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    lines = run.stdout.strip().splitlines()
    for path in lines[:3]:
        assert Path(path).resolve().is_relative_to(target.resolve()), f"{path} was not imported from the wheel"
    assert lines[3] == "True True", "a top-level `kernels` or `passes` package is importable"
    assert lines[4]  # the registry works from the installed copy
