"""The installed package: one version everywhere, the supported torch range declared and checked
at import, the native module's dependencies (C/C++ runtime only, libcuda opened lazily), and,
in CI, that the suite runs against the installed wheel rather than the source tree."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import qengine
from qengine import _version, cli

ROOT = Path(__file__).resolve().parents[1]
try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def pyproject() -> dict:
    """The source checkout's pyproject.toml (the tests always run from one)."""
    if tomllib is None:
        pytest.skip("tomllib needs Python >= 3.11")
    path = ROOT / "pyproject.toml"
    if not path.exists():
        pytest.skip(f"no pyproject.toml next to the tests ({path})")
    with open(path, "rb") as f:
        return tomllib.load(f)


def distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution(_version.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"qengine is importable but not installed as {_version.DISTRIBUTION} (no metadata)")


# ---------------------------------------------------------------------------- distribution name
def test_distribution_name_is_declared_once():
    # "qengine" on PyPI is an unrelated project: the distribution is torch-qengine, the import
    # name qengine. pyproject.toml and the code that names it in install hints must agree.
    assert pyproject()["project"]["name"] == _version.DISTRIBUTION == "torch-qengine"
    assert distribution().metadata["Name"] == _version.DISTRIBUTION


def test_install_hints_name_this_package():
    hint = _version.install_hint("hf")
    declared = pyproject()["project"]["optional-dependencies"]["hf"]
    for requirement in declared:
        assert f"'{requirement.replace(' ', '')}'" in hint, (requirement, hint)
    assert "qengine[" not in hint.replace(_version.DISTRIBUTION + "[", "")


def test_no_message_installs_the_unrelated_project():
    # Installing the name "qengine" with an extra would fetch PyPI's unrelated project: no file may suggest it.
    offenders = []
    for path in list((ROOT / "python").rglob("*.py")) + list((ROOT / "tests").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"pip install ['\"]?qengine\[", line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}")
    assert not offenders, offenders


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"qengine {qengine.__version__} (distribution {_version.DISTRIBUTION})"


# ---------------------------------------------------------------------------- version
def test_version_is_single_sourced():
    project = pyproject()
    assert "version" not in project["project"], "pyproject.toml must not repeat the version"
    assert "version" in project["project"]["dynamic"]
    provider = project["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["input"] == "python/qengine/_version.py"
    text = (ROOT / provider["input"]).read_text()
    assert re.search(r'^__version__ = "([^"]+)"$', text, re.M).group(1) == qengine.__version__


def test_version_agrees_everywhere(capsys):
    version = qengine.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([ab]\d+|rc\d+|\.dev\d+)?", version), version
    assert distribution().version == version
    assert qengine.build_info()["version"] == version
    assert cli.main(["info"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == f"qengine {version}"


def test_changelog_has_an_entry_for_this_version():
    path = ROOT / "CHANGELOG.md"
    if not path.exists():
        pytest.skip(f"no CHANGELOG.md next to the tests ({path})")
    headings = re.findall(r"^## \[?([^\]\s]+)", path.read_text(), re.M)
    assert headings and headings[0] == qengine.__version__, f"latest CHANGELOG entry {headings[:1]}"


# ---------------------------------------------------------------------------- torch range
def test_torch_range_declared_equals_checked():
    requirement = _version.torch_requirement()
    assert requirement == "torch>=2.4,<3"
    assert requirement in pyproject()["project"]["dependencies"]
    declared = [r.replace(" ", "") for r in distribution().requires or [] if re.match(r"torch\b", r)]
    assert len(declared) == 1 and declared[0].startswith("torch"), declared
    # Metadata may reorder the specifiers ('torch<3,>=2.4').
    assert set(declared[0][len("torch"):].split(",")) == set(requirement[len("torch"):].split(","))


@pytest.mark.parametrize("version", ["2.4.0", "2.4.0a0", "2.13.0+cpu", "2.14.1", "2.15.0.dev20270101+cu130", "2.99.1"])
def test_supported_torch_versions_pass(version):
    _version.check_torch_version(version)


@pytest.mark.parametrize("version", ["2.3.1", "1.13.1+cu117", "3.0.0", "10.0", "garbage", ""])
def test_unsupported_torch_versions_raise_a_clear_error(version):
    with pytest.raises(ImportError) as info:
        _version.check_torch_version(version)
    message = str(info.value)
    assert _version.torch_requirement() in message and repr(version)[1:-1] in message


def test_import_refuses_an_unsupported_torch():
    """The check runs at `import qengine`, before the native module is loaded."""
    code = "import torch; torch.__version__ = '2.3.1'; import qengine"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: qengine ") and "torch>=2.4,<3" in last and "2.3.1" in last, proc.stderr


# ---------------------------------------------------------------------------- native module
# The C/C++ runtime; libpthread, libdl and librt are separate libraries on glibc < 2.34.
RUNTIME_LIBRARIES = {"libc.so.6", "libm.so.6", "libstdc++.so.6", "libgcc_s.so.1", "libpthread.so.0",
                     "libdl.so.2", "librt.so.1", "ld-linux-x86-64.so.2"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF dependencies are Linux-only")
@pytest.mark.skipif(shutil.which("readelf") is None, reason="binutils' readelf is not on PATH")
def test_native_module_needs_only_the_c_runtime():
    out = subprocess.run(["readelf", "-d", qengine._C.__file__], capture_output=True, text=True, check=True).stdout
    needed = set(re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out))
    assert needed, out
    assert needed <= RUNTIME_LIBRARIES, f"unexpected dependencies: {sorted(needed - RUNTIME_LIBRARIES)}"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_DEBUG is glibc's")
@pytest.mark.skipif(not qengine.build_info()["cuda_compiled"], reason="qengine was built without CUDA kernels")
def test_libcuda_is_opened_only_at_the_first_cuda_call():
    """The static CUDA runtime dlopens the driver when first used; importing qengine on a
    machine without one must not look for it (the loader's own trace shows each search)."""
    code = ("import sys, qengine; sys.stderr.write('@@imported@@\\n'); sys.stderr.flush(); "
            "qengine._C.cuda.device_count()")
    env = dict(os.environ, LD_DEBUG="libs")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, marker, after = proc.stderr.partition("@@imported@@")
    assert marker, proc.stderr[-2000:]
    assert "libcuda.so" not in before
    assert "libcuda.so.1" in after


def test_cuda_architectures_agree():
    """pyproject.toml passes QENGINE_CUDA_ARCHITECTURES to CMake; both defaults must agree."""
    define = pyproject()["tool"]["scikit-build"]["cmake"]["define"]["QENGINE_CUDA_ARCHITECTURES"]
    cmake = (ROOT / "cmake" / "cuda.cmake").read_text()
    default = re.search(r'set\(QENGINE_CUDA_ARCHITECTURES "([^"]+)" CACHE', cmake).group(1)
    assert define["default"] == default == "75;80;86;89;90"


# ---------------------------------------------------------------------------- installed wheel
@pytest.mark.skipif(os.environ.get("QENGINE_EXPECT_INSTALLED") != "1",
                    reason="checks the installed-wheel CI run only (QENGINE_EXPECT_INSTALLED=1)")
def test_suite_runs_against_the_installed_wheel():
    package = Path(qengine.__file__).resolve().parent
    site = {Path(sysconfig.get_paths()[k]).resolve() for k in ("purelib", "platlib")}
    assert package.parent in site, f"qengine imported from {package}, not from {sorted(map(str, site))}"
    assert package != (ROOT / "python" / "qengine").resolve()
    assert Path(qengine._C.__file__).resolve().parent == package

