"""Atomic writes (qengine._io): a process killed with SIGKILL at random points while saving
leaves the previous checkpoint loadable and verified; failed writes leave no file behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import qengine
from qengine import QuantizedTensor
from qengine._io import atomic_write, load_tensors, save_tensors, torch_save

# Runs in a fresh interpreter (one torch import for all kill points; no qengine op is called
# there, the first op call is slow): for each file, a forked child saves version after version
# of an ~4 MB checkpoint; the parent kills it after a random delay and checks that the file on
# disk is one complete, verified version at least as new as the last save finished before.
_KILLER = textwrap.dedent(r"""
    import glob, json, os, random, signal, sys, time
    import torch
    # One intra-op thread: a forked child must not find an OpenMP team of the parent's.
    torch.set_num_threads(1)
    from qengine import QuantizedTensor
    from qengine._io import load_tensors, save_tensors

    source, kills, seed, paths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
    min_mid_write, max_kills = kills // 3, 4 * kills
    rng = random.Random(seed)
    base = load_tensors(source)  # a QuantizedTensor state dict

    def checkpoint(v):
        sd = dict(base)
        sd["filler"] = torch.full((1 << 20,), float(v))  # 4 MB: the write takes a while
        return sd

    def verify(path):
        sd = load_tensors(path)  # CRC-32 of every tensor checked
        qt = QuantizedTensor.from_state_dict(sd, "layer.")
        assert all(torch.equal(sd[k], base[k]) for k in base)
        filler = sd["filler"]
        v = int(filler[0])
        assert torch.equal(filler, torch.full_like(filler, float(v))), "a mix of two versions"
        return v

    report = {}
    for path in paths:
        save_tensors(checkpoint(0), path)
        t0 = time.perf_counter(); save_tensors(checkpoint(0), path); write_s = time.perf_counter() - t0
        results = []
        version = 0
        # At least `kills` kill points, and more (up to max_kills) until min_mid_write of them
        # fell inside a file write (on a loaded machine more land while the data is built).
        while len(results) < kills or (sum(r["mid_write"] for r in results) < min_mid_write
                                       and len(results) < max_kills):
            start = version + 1
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:  # the saving process: writes versions start, start+1, ... until killed
                os.close(r)
                v = start
                while True:
                    save_tensors(checkpoint(v), path)
                    os.write(w, v.to_bytes(8, "little"))  # v is complete on disk
                    v += 1
            os.close(w)
            time.sleep(rng.uniform(0.0, 2.5 * write_s))
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            done = b""
            while chunk := os.read(r, 4096):
                done += chunk
            os.close(r)
            finished = [int.from_bytes(done[i:i + 8], "little") for i in range(0, len(done) - 7, 8)]
            last_done = finished[-1] if finished else version
            tmp = glob.glob(os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".*.tmp"))
            v = verify(path)
            assert last_done <= v <= last_done + 1, (v, last_done)
            results.append({"version": v, "mid_write": bool(tmp)})
            for t in tmp:
                os.unlink(t)  # a killed writer cannot remove its temporary file
            version = v
        report[path] = {"write_s": write_s, "results": results}
    print(json.dumps(report))
""")


def test_killed_while_saving_leaves_previous_checkpoint(tmp_path):
    kills = 12  # per format: 24 kill points in all
    q = qengine.quantize(torch.randn(64, 64), "nf4", 64, double_quant=True)
    source = tmp_path / "source.pt"
    save_tensors(q.state_dict("layer."), source)
    paths = [str(tmp_path / "model.safetensors"), str(tmp_path / "model.pt")]
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(source), str(kills), "1", *paths],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for path in paths:
        results = report[path]["results"]
        assert len(results) >= kills
        # The kills really interrupted saves: some left the temporary file of a write behind
        # (the others fell while the checkpoint or its checksums were being built).
        assert sum(r["mid_write"] for r in results) >= kills // 3, results
        back = QuantizedTensor.from_state_dict(load_tensors(path), "layer.")
        assert torch.equal(back.dequantize(), q.dequantize())


def test_exception_while_writing_keeps_old_file(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write(b"new, half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.bin"]  # the temporary file is gone


def test_unwritable_directory(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write to a read-only directory")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError):
            save_tensors({"x": torch.zeros(3)}, ro / "x.safetensors")
    finally:
        ro.chmod(0o700)


def test_permissions_of_new_and_replaced_files(tmp_path):
    new = tmp_path / "new.pt"
    torch_save({"x": torch.zeros(2)}, new)
    umask = os.umask(0)
    os.umask(umask)
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask
    new.chmod(0o640)
    torch_save({"x": torch.ones(2)}, new)
    assert new.stat().st_mode & 0o777 == 0o640
    assert torch.equal(torch.load(new, weights_only=True)["x"], torch.ones(2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_tensors_round_trip_and_metadata(tmp_path, suffix):
    q = qengine.quantize(torch.randn(8, 64), "uint4", 32, double_quant=True)
    sd = {**q.state_dict("q."), "bf16": torch.randn(3, 5).to(torch.bfloat16), "empty": torch.zeros(0),
          "scalar": torch.tensor(1.5), "strided": torch.arange(12.0).reshape(3, 4).t()}
    path = tmp_path / f"t{suffix}"
    save_tensors(sd, path)
    back = load_tensors(path)
    assert back.keys() == sd.keys()
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    if suffix == ".safetensors":
        from safetensors import safe_open

        save_tensors(sd, path, metadata={"format": "pt"})
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "pt" and set(json.loads(meta["qengine.crc32"])) == set(sd)
    else:
        with pytest.raises(ValueError, match="metadata"):
            save_tensors(sd, path, metadata={"a": "b"})
    with pytest.raises(TypeError, match="dict of str -> torch.Tensor"):
        save_tensors({"a": 1.0}, path)
