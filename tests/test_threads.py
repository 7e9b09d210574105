"""Kernel calls from several Python threads at once (the native calls release the GIL, so
they really overlap) give the bytes of the same calls made one after another: quantize,
dequantize (allocating and out=), matmul forward and backward."""

from __future__ import annotations

import threading

import torch

import qengine

THREADS = 6


def _cases():
    """(name, inputs) pairs: small calls (run on the calling thread, truly concurrent) and
    large ones (split over the kernel thread pool)."""
    g = torch.Generator().manual_seed(5)
    cases = []
    for i, (shape, fmt, bs, dq, dtype) in enumerate([
        ((33, 65), "nf4", 64, False, torch.float32),
        ((7, 128), "int8", 32, True, torch.bfloat16),
        ((300, 129), "uint4", None, True, torch.float16),
        ((1024, 257), "fp4", 128, True, torch.float32),  # > 16k elements: threaded kernels
        ((96, 256), "nf4", 64, True, torch.bfloat16),
        ((64, 512), "uint8", 256, False, torch.float32),
    ]):
        w = (torch.randn(shape, generator=g) * (i + 1)).to(dtype)
        x = torch.randn(1 + 5 * i, shape[-1], generator=g).to(dtype)
        cases.append((w, fmt, bs, dq, x))
    return cases


def _work(case):
    """Every kernel on one case; returns the results as bit patterns."""
    w, fmt, bs, dq, x = case
    q = qengine.quantize(w, fmt, bs, double_quant=dq)
    out = torch.empty(w.shape, dtype=torch.float32)
    q.dequantize(out=out)
    xg = x.clone().requires_grad_()
    y = qengine.matmul(xg, q)
    y.float().square().sum().backward()
    res = [q.packed, q.dequantize(), out, y.detach(), xg.grad]
    if dq:
        res += [q.scales.quantized.packed, q.scales.quantized.scales]
    else:
        res.append(q.scales)
    return [t.reshape(-1).view(torch.uint8).clone() if t.dtype != torch.uint8 else t.clone() for t in res]


def test_concurrent_calls_match_serial():
    cases = _cases()
    serial = [_work(c) for c in cases]
    rounds = 3
    results: dict = {}
    errors = []
    barrier = threading.Barrier(THREADS)

    def run(tid):
        try:
            barrier.wait()
            for r in range(rounds):
                for j in range(len(cases)):
                    k = (j + tid + r) % len(cases)  # threads start on different cases
                    results[(tid, r, k)] = _work(cases[k])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(results) == THREADS * rounds * len(cases)
    for (tid, r, k), got in results.items():
        for i, (a, b) in enumerate(zip(got, serial[k])):
            assert torch.equal(a, b), f"thread {tid} round {r} case {k} result {i} differs from the serial call"


def test_isa_and_thread_count_changes_while_running(isa_restore, threads_restore):
    """set_cpu_isa / set_num_threads from one thread while others compute: every result is
    still the serial one (all ISAs produce the same bytes for quantize/dequantize)."""
    cases = _cases()[:4]
    serial = [_work(c)[:3] for c in cases]
    stop = threading.Event()
    errors = []

    def churn():
        isas = qengine.build_info()["supported_cpu_isas"]
        i = 0
        while not stop.is_set():
            qengine.set_cpu_isa(isas[i % len(isas)])
            qengine.set_num_threads(1 + i % 3)
            i += 1

    def run(tid):
        try:
            for r in range(3):
                for k, c in enumerate(cases):
                    got = _work(c)[:3]
                    for a, b in zip(got, serial[k]):
                        assert torch.equal(a, b), f"thread {tid} case {k}"
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    changer = threading.Thread(target=churn)
    workers = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    changer.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    changer.join()
    assert not errors, errors


def test_torch_openmp_runtime_is_shared_and_gives_the_same_bytes(tmp_path):
    """Where torch runs on OpenMP, qengine's parallel regions run on torch's OpenMP team
    (thread_pool.h); QENGINE_OWN_THREADS=1 keeps the own pool. Both give the same bytes for
    threaded quantize, dequantize, the small- and large-batch products and the 8-bit step."""
    import os
    import subprocess
    import sys

    script = r'''
import sys, torch, qengine
torch.manual_seed(0)
out = {"runtime": qengine._C.openmp_runtime()}
w = torch.randn(1024, 512)
q = qengine.quantize(w, "nf4", 64, double_quant=True)
out["packed"] = q.packed
out["deq"] = q.dequantize(torch.bfloat16)
for m in (3, 40):
    out[f"mm{m}"] = qengine.matmul(torch.randn(m, 512).to(torch.bfloat16), q)
p = torch.nn.Parameter(torch.randn(70000))
opt = qengine.optim.PagedAdamW8bit([p], lr=1e-2)
p.grad = torch.randn(70000)
opt.step()
out["param"] = p.detach().clone()
torch.save(out, sys.argv[1])
'''
    results = []
    for own in ("", "1"):
        path = tmp_path / f"own{own or 0}.pt"
        env = {**os.environ, "QENGINE_OWN_THREADS": own, "QENGINE_NUM_THREADS": "2"}
        subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, timeout=300)
        results.append(torch.load(path))
    shared, own = results
    assert own["runtime"] == ""
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert "omp" in os.path.basename(shared["runtime"])
    for key in shared:
        if key != "runtime":
            assert torch.equal(shared[key], own[key]), key


def test_unknown_openmp_runtime_is_refused_and_changes_nothing():
    before = qengine._C.openmp_runtime()
    assert not qengine._C.use_openmp_runtime("/nonexistent/libgomp.so.1")
    assert qengine._C.openmp_runtime() == before
