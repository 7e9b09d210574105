"""QLoRA under torch.distributed on the CPU (gloo, two spawned processes): DDP, and FSDP2
(fully_shard) with the packed codes stored as int32 so they are sharded like any parameter.
Both must end with the same adapters as one process training on the whole batch."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import qengine
from support import Tiny

WORLD = 2
STEPS = 3

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")


def _model(quant_storage):
    torch.manual_seed(0)
    model = qengine.quantize_model(Tiny(vocab=64, d=128, h=256), quant_storage=quant_storage, progress=False)
    return qengine.add_lora(model, r=4, alpha=8)


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (2 * WORLD, 9), generator=g)


def _loss(model, ids):
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model, ids, params):
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = _loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _run(mode, rank):
    """Trains on this rank's half of the batch; returns (losses, full LoRA tensors, info)."""
    model = _model(torch.int32 if mode == "fsdp" else torch.uint8)
    ids = _batch().chunk(WORLD)[rank]
    info = {}
    if mode == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)
        losses = _train(wrapped, ids, qengine.lora_parameters(model))
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    else:
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        packed = model.layers[0].up_proj.base_layer.weight_packed
        info["packed_local"] = packed.to_local().numel()
        info["packed_global"] = packed.numel()
        losses = _train(model, ids, qengine.lora_parameters(model))
        lora = {n: p.detach().full_tensor().clone() for n, p in model.named_parameters() if "lora_" in n}
    return {"losses": losses, "lora": lora, **info}


def _worker(rank, store_path, out_path):
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    exits = dist.FileStore(store_path + ".exit", WORLD)
    try:
        torch.set_num_threads(1)
        qengine.set_num_threads(1)
        results = {mode: _run(mode, rank) for mode in ("ddp", "fsdp")}  # one spawn serves both
        if rank == 0:
            torch.save(results, out_path)
        # Tear down only once both ranks are past their last collective: a rank that closes its
        # gloo connections while the other still talks to it can abort the other process
        # ("terminate called without an active exception"). The barrier's last message may still
        # be in flight when one rank returns from it, so each rank then also waits, through a
        # file store (no gloo traffic), until the other has returned too. (A rank that failed
        # skips this; spawn then terminates the one left waiting.)
        dist.barrier()
        exits.set(f"past_barrier{rank}", "1")
        exits.wait([f"past_barrier{r}" for r in range(WORLD)], timedelta(seconds=120))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp / "rank0.pt")), nprocs=WORLD, join=True,
                       start_method="spawn")
    return torch.load(tmp / "rank0.pt")


def _single_process():
    model = _model(torch.uint8)
    ids = _batch()
    # The mean over the whole batch: what averaging the ranks' gradients (equal shards) computes.
    _train(model, ids, qengine.lora_parameters(model))
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_qlora_two_processes_match_single_process(mode, distributed_results):
    result = distributed_results[mode]
    assert result["losses"][-1] < result["losses"][0]
    reference = _single_process()
    assert result["lora"].keys() == reference.keys()
    for name, value in reference.items():
        assert torch.allclose(result["lora"][name], value, rtol=1e-4, atol=1e-5), name
    if mode == "fsdp":  # the 4-bit codes really are sharded (int32 storage, split on dim 0)
        assert result["packed_local"] == -(-result["packed_global"] // WORLD)
