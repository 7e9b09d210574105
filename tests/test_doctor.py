"""qengine.doctor() and `qengine doctor`: every kernel family on every CPU ISA (and GPU) passes
here; a deliberately broken kernel on one ISA gives FAIL rows and exit status 1; a kernel that
raises is a FAIL row; the CPU ISA and torch's thread count are restored, even on an error."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest
import torch

import qengine
from qengine.cli import main
from qengine.doctor_checks import FORMATS, KERNEL_NOTES

doctor_module = sys.modules["qengine.doctor"]  # qengine.doctor is the function
SUPPORTED = qengine.build_info()["supported_cpu_isas"]
SIMD_ISAS = [isa for isa in SUPPORTED if isa != "scalar"]
needs_simd = pytest.mark.skipif(not SIMD_ISAS, reason="this CPU supports only the scalar kernels (the reference)")
NO_GPU_LINE = "cuda: no GPU visible (skipped)"


@pytest.fixture(scope="module")
def full_run():
    threads = torch.get_num_threads()
    result = qengine.doctor()
    assert torch.get_num_threads() == threads
    return result


def test_every_check_passes_on_this_machine(full_run):
    bad = [f"{r.device} {r.kernel} {r.format}: {r.detail}" for r in full_run.failures]
    assert full_run.ok, "\n".join(bad)
    assert "PASS" in full_run.table()


def test_covers_every_isa_kernel_and_format(full_run):
    cpu_rows = [r for r in full_run if r.device.startswith("cpu:")]
    assert {r.device for r in cpu_rows} == {f"cpu:{isa}" for isa in SUPPORTED}
    for isa in SUPPORTED:
        rows = [r for r in cpu_rows if r.device == f"cpu:{isa}"]
        assert {r.kernel for r in rows} == set(KERNEL_NOTES)
        for kernel in KERNEL_NOTES:
            if kernel not in ("matmul_lora", "adamw", "adamw8bit"):
                assert {r.format for r in rows if r.kernel == kernel} == set(FORMATS), kernel
        expected = "ref" if isa == "scalar" else "ok"
        assert {r.result for r in rows} == {expected}
    assert all(r.seconds > 0 for r in cpu_rows)


def test_cuda_rows(full_run):
    cuda_rows = [r for r in full_run if r.device.startswith("cuda")]
    if qengine.cuda_available():
        for i in range(torch.cuda.device_count()):
            assert {r.kernel for r in cuda_rows if r.device == f"cuda:{i}"} == set(KERNEL_NOTES)
    elif not torch.cuda.is_available():
        assert len(cuda_rows) == 1 and cuda_rows[0].result == "skipped"
        assert full_run.table().count(NO_GPU_LINE) == 1


def test_runtime_is_a_few_seconds(full_run):
    assert full_run.seconds < 30  # ~7 s on a busy 2-core machine with 4 ISAs


def test_tables_and_json(full_run):
    grouped = full_run.table().splitlines()
    per_format = full_run.table(per_format=True).splitlines()
    assert "tolerance:" in full_run.table() and "0.0001 (f32)" in full_run.table()
    checked = [r for r in full_run if r.result != "skipped"]
    assert len(per_format) > len(grouped)
    assert sum(line.startswith("cpu:") for line in per_format) == sum(r.device.startswith("cpu:") for r in checked)
    d = json.loads(json.dumps(full_run.to_dict()))
    assert d["ok"] is True and len(d["rows"]) == len(full_run)


def test_silent_unless_verbose(capsys):
    qengine.doctor(kernels=["adamw"], isas=[])
    assert capsys.readouterr().out == ""
    qengine.doctor(verbose=True, kernels=["adamw"], isas=[])
    assert "cpu:scalar" in capsys.readouterr().out


# ---------------------------------------------------------------------------- broken kernels
def _break_dequantize_on(isa, monkeypatch):
    """Dequantize writes one wrong value under `isa` only."""
    real = qengine.ops.cpu.dequantize_into

    def broken(packed, table, scales, offsets, bits, blocksize, numel, out, stream=False):
        real(packed, table, scales, offsets, bits, blocksize, numel, out, stream)
        if qengine._C.cpu_isa() == isa and numel:
            out.view(-1)[numel // 2] += 1.0

    monkeypatch.setattr(qengine.ops.cpu, "dequantize_into", broken)


@needs_simd
def test_wrong_bytes_on_one_isa_fail(monkeypatch, isa_restore):
    victim = SIMD_ISAS[0]
    _break_dequantize_on(victim, monkeypatch)
    result = qengine.doctor(kernels=["dequantize", "quantize"], formats=["nf4", "uint8"])
    assert not result.ok
    assert {(r.device, r.kernel) for r in result.failures} == {(f"cpu:{victim}", "dequantize")}
    assert all("differ" in r.detail for r in result.failures)
    assert len(result.failures) == 2  # both formats
    assert qengine.build_info()["cpu_isa"] == isa_restore
    table = result.table()
    assert "FAIL" in table and f"cpu:{victim} dequantize nf4:" in table


@needs_simd
def test_cli_exits_1_on_a_mismatch(monkeypatch, capsys, tmp_path, isa_restore):
    _break_dequantize_on(SIMD_ISAS[-1], monkeypatch)
    path = tmp_path / "doctor.json"
    code = main(["doctor", "--kernels", "dequantize", "--formats", "fp4", "--json", str(path)])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out
    d = json.loads(path.read_text())
    assert d["ok"] is False and [r["device"] for r in d["rows"] if not r["ok"]] == [f"cpu:{SIMD_ISAS[-1]}"]
    assert qengine.build_info()["cpu_isa"] == isa_restore


@needs_simd
def test_a_kernel_that_raises_is_a_fail_row(monkeypatch, isa_restore):
    victim = SIMD_ISAS[0]
    real = qengine._C.matmul_cpu

    def raising(*args):
        if qengine._C.cpu_isa() == victim:
            raise RuntimeError("qengine: simulated kernel failure")
        return real(*args)

    monkeypatch.setattr(qengine._C, "matmul_cpu", raising)
    result = qengine.doctor(kernels=["matmul"], formats=["int4"])
    fails = result.failures
    assert [(r.device, r.kernel, r.format) for r in fails] == [(f"cpu:{victim}", "matmul", "int4")]
    assert "raised RuntimeError: qengine: simulated kernel failure" in fails[0].detail
    assert qengine.build_info()["cpu_isa"] == isa_restore


def test_isa_and_threads_restored_when_interrupted(monkeypatch, isa_restore):
    start = SIMD_ISAS[0] if SIMD_ISAS else "scalar"
    qengine.set_cpu_isa(start)
    threads = torch.get_num_threads()

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(qengine._C, "adamw_cpu", interrupt)
    with pytest.raises(KeyboardInterrupt):
        qengine.doctor(kernels=["adamw"])
    assert qengine.build_info()["cpu_isa"] == start
    assert torch.get_num_threads() == threads


def test_unknown_names_raise(capsys):
    with pytest.raises(ValueError, match="unknown kernel"):
        qengine.doctor(kernels=["gemm"])
    with pytest.raises(ValueError, match="unknown format"):
        qengine.doctor(formats=["nf3"])
    with pytest.raises(ValueError, match="not supported here"):
        qengine.doctor(isas=["avx9000"])
    assert main(["doctor", "--kernels", "gemm"]) == 2
    assert "unknown kernel" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the command
def test_cli_in_a_subprocess_prints_the_table():
    r = subprocess.run([sys.executable, "-m", "qengine", "doctor", "--kernels", "quantize,matmul,adamw8bit",
                        "--formats", "nf4,cb200"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.split()[:2] == ["device", "kernel"] for line in lines)
    for isa in SUPPORTED:
        assert any(line.startswith(f"cpu:{isa}") and "quantize" in line for line in lines), isa
    if not torch.cuda.is_available():
        assert NO_GPU_LINE in lines
    assert lines[-1].startswith("PASS")


# ---------------------------------------------------------------------------- error messages
def test_device_errors_suggest_the_doctor():
    meta = torch.empty(8, device="meta")
    with pytest.raises(ValueError, match="qengine doctor"):
        qengine.ops.check_device("x", meta)
    with pytest.raises(ValueError, match=r"meta.*qengine doctor"):
        qengine.optim.PagedAdamW([torch.nn.Parameter(meta)])
    if not qengine._C.cuda_compiled:
        fake = types.SimpleNamespace(device=torch.device("cuda", 0))
        assert "no CUDA kernels" in qengine.ops.unsupported_device_message("x", fake)
