"""A patched model trains under DistributedDataParallel and FSDP2 (``fully_shard``): two gloo
ranks on CPU, each on half of a global batch, end with the gradients one process computes on the
whole batch. Patch before wrapping: the wrappers keep the lightllm classes underneath."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import DEVICE
from torch import nn

import lightllm
from lightllm.testing import DispatchedOps

WORLD = 2
D, HEADS, FF, BATCH, SEQ = 32, 4, 64, 4, 9


def _model():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    lightllm.patch(model)
    return model


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, SEQ, D, generator=g)
    r = torch.randn(BATCH, SEQ, D, generator=g)
    return x, r


def _loss(model, x, r):
    return (model(x) * r).sum()


def _rank(rank: int, kind: str, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    try:
        model = _model()
        assert type(model.layers[0]) is lightllm.nn.TransformerEncoderLayer
        if kind == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (WORLD,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
            assert isinstance(model.layers[0], lightllm.nn.TransformerEncoderLayer)
        x, r = _batch()
        part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
        with DispatchedOps() as ops:
            loss = _loss(wrapped, x[part], r[part])
        assert ops.lightllm["sdpa_fwd"] == 2 and ops.lightllm["feed_forward_fwd"] == 2, ops.lightllm
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if hasattr(g, "full_tensor"):  # FSDP2: a sharded DTensor
                g = g.full_tensor()
            grads[name] = g.detach().clone()
        torch.save(grads, os.path.join(out_dir, f"{kind}{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(DEVICE != "cpu", reason="gloo ranks on CPU")
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_patched_model_trains_distributed(kind, tmp_path):
    mp.spawn(_rank, args=(kind, str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    model = _model()
    x, r = _batch()
    _loss(model, x, r).backward()
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"{kind}{rank}.pt")
        assert set(got) == {n for n, _ in model.named_parameters()}
        for name, p in model.named_parameters():
            # Both wrappers average over ranks: the global batch's gradient divided by WORLD.
            torch.testing.assert_close(got[name] * WORLD, p.grad, atol=2e-5, rtol=2e-5,
                                       msg=f"{kind} rank {rank}: {name}")
