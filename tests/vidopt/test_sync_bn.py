"""CpuSyncBatchNorm in real gloo process groups (2 spawned ranks on 127.0.0.1): DDP with the global batch split over
the ranks takes the same steps as one process with the whole batch; eval / world size 1 are plain BatchNorm."""
from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from tests.conftest import free_port
from vidopt.sync_bn import CpuSyncBatchNorm, convert_sync_batchnorm, revert_sync_batchnorm

GLOBAL_BATCH = 8
STEPS = 3
TOL = dict(atol=1e-5, rtol=1e-5)


# ---- shared by the spawned ranks and the single-process reference (module level: spawn imports them) -----------

def small_net() -> nn.Module:
    """Conv2d -> BN2d -> ReLU -> pool -> Linear -> BN1d -> Linear, the same weights wherever it is built."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(),   # [n, 8, 8, 8] -> [n, 8]
                        nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    for bn in (net[1], net[6]):   # not 1 and 0, so that mixing up weight and bias shows
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.normal_(bn.bias, 0.0, 0.2)
    return net


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=g) * 2 + 0.5, torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)


def shard(tensor: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    return tensor.split(list(sizes))[rank]


def train(model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor, world: int, steps: int) -> dict:
    """`steps` SGD steps of `model` (net, or DDP around it) on this rank's (x, y). The loss is the local sum times
    world / global batch, i.e. the local mean scaled by n_local * world / n_global (defined for n_local = 0 too):
    DDP's average of the gradients is then that of the global mean loss. -> the first step's output, gradients and
    buffers, and net's state_dict after the last step (sync layers reverted, as a checkpoint would save it)."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    first = {}
    for step in range(steps):
        out = model(x)
        loss = F.cross_entropy(out, y, reduction="sum") * (world / GLOBAL_BATCH)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first = {"output": out.detach().clone(),
                     "grads": {name: p.grad.clone() for name, p in net.named_parameters()},
                     "buffers": {name: b.clone() for name, b in net.named_buffers()}}
        optimizer.step()
    return {**first, "state": {k: v.clone() for k, v in revert_sync_batchnorm(net).state_dict().items()}}


def ddp_rank(rank: int, world: int, sizes: tuple[int, ...], sync: bool) -> dict:
    x, y = global_batch()
    net = small_net()
    if sync:
        net = convert_sync_batchnorm(net)
    model = nn.parallel.DistributedDataParallel(net)   # [Torch DDP] averages gradients over the ranks
    return train(model, net, shard(x, sizes, rank), shard(y, sizes, rank), world, STEPS)


# (input shape, memory format, layer options): BatchNorm1d on [n, c] and [n, c, l], 2d and 3d in channels_last
LAYER_CASES = [((GLOBAL_BATCH, 6), torch.contiguous_format, {}),
               ((GLOBAL_BATCH, 6, 5), torch.contiguous_format, {"momentum": None}),
               ((GLOBAL_BATCH, 6, 4, 3), torch.channels_last, {}),
               ((GLOBAL_BATCH, 6, 3, 4, 2), torch.channels_last_3d, {"affine": False}),
               ((GLOBAL_BATCH, 6, 4, 3), torch.contiguous_format, {"track_running_stats": False})]
PLAIN_FOR_DIMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def layer_run(layer: nn.Module, case: int, sizes: tuple[int, ...], rank: int) -> dict:
    """Two training steps of one BatchNorm layer on this rank's shard of fixed inputs, with the loss sum(y * g) of
    fixed upstream gradients g; -> outputs, input gradients, parameter gradients and buffers."""
    shape, memory_format, _ = LAYER_CASES[case]
    g = torch.Generator().manual_seed(10 + case)
    result = {"outputs": [], "input_grads": []}
    for _ in range(2):
        x = (torch.randn(shape, generator=g) * 3 + 1).contiguous(memory_format=memory_format)
        upstream = torch.randn(shape, generator=g)
        x_local = shard(x, sizes, rank).clone(memory_format=torch.preserve_format).requires_grad_()
        out = layer(x_local)
        (out * shard(upstream, sizes, rank)).sum().backward()
        result["outputs"].append(out.detach())
        result["input_grads"].append(x_local.grad)
    result["grads"] = {name: p.grad.clone() for name, p in layer.named_parameters()}
    result["buffers"] = {name: b.clone() for name, b in layer.named_buffers()}
    result["keeps_memory_format"] = out.is_contiguous(memory_format=memory_format)
    return result


def seeded_layer(layer_class: type, case: int) -> nn.Module:
    shape, _, options = LAYER_CASES[case]
    torch.manual_seed(20 + case)
    layer = layer_class(shape[1], **options)
    if layer.affine:
        nn.init.uniform_(layer.weight, 0.5, 1.5)
        nn.init.normal_(layer.bias, 0.0, 0.2)
    return layer


def layers_rank(rank: int, world: int, sizes: tuple[int, ...]) -> list[dict]:
    return [layer_run(seeded_layer(CpuSyncBatchNorm, case), case, sizes, rank) for case in range(len(LAYER_CASES))]


def run_rank(rank: int, world: int, port: int, job: str, kwargs: dict, out_dir: str) -> None:
    """One spawned rank: join the gloo group, run `job`, write its result to out_dir/rank<r>.pt."""
    torch.set_num_threads(1)   # 2 ranks on 2 cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))   # a collective left unpaired fails instead of hanging
    try:
        result = {"ddp": ddp_rank, "layers": layers_rank}[job](rank, world, **kwargs)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn_ranks(job: str, out_dir: Path, world: int = 2, timeout_s: float = 90, **kwargs) -> list:
    """`job` on `world` spawned ranks; -> each rank's result. Kills the ranks and fails if they take > timeout_s."""
    out_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(run_rank, args=(world, free_port(), job, kwargs, str(out_dir)), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):   # raises if a rank failed, with its traceback
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{job}: the {world} ranks did not finish within {timeout_s:.0f} s (a collective hung?)")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


def max_abs_diff(a, b) -> float:
    """Largest |a - b| over tensors or (nested) dicts / lists of them with the same structure."""
    if isinstance(a, dict):
        return max(max_abs_diff(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return max(max_abs_diff(u, v) for u, v in zip(a, b))
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_all(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **TOL, msg=lambda m, key=key: f"{key}: {m}")


def ddp_reference() -> dict:
    """One process, plain BatchNorm, the whole batch, mean loss."""
    x, y = global_batch()
    net = small_net()
    return train(net, net, x, y, world=1, steps=STEPS)


def joined_output(ranks: list[dict]) -> torch.Tensor:
    return torch.cat([r["output"] for r in ranks])


# ---- DDP with 2 ranks of 4 == 1 process with 8 ------------------------------------------------------------------

@pytest.fixture(scope="module")
def even_ranks(tmp_path_factory) -> dict:
    """2 ranks of 4 samples, with sync BatchNorm and (to show the difference) without."""
    out = tmp_path_factory.mktemp("sync_bn")
    return {sync: spawn_ranks("ddp", out / str(sync), sizes=(4, 4), sync=sync) for sync in (True, False)}


def test_ddp_with_sync_bn_matches_one_process_with_the_whole_batch(even_ranks):
    reference, ranks = ddp_reference(), even_ranks[True]
    torch.testing.assert_close(joined_output(ranks), reference["output"], **TOL)
    for rank in ranks:   # DDP's averaged gradients and the (global) running stats are the same on every rank
        assert_close_all(rank["grads"], reference["grads"])
        assert_close_all(rank["buffers"], reference["buffers"])
    assert ranks[0]["buffers"]["1.num_batches_tracked"].item() == 1

    # without the sync each rank normalises over its 4 samples: 100x the tolerance and more (measured: outputs 0.4,
    # gradients 0.7, running stats 0.02 apart)
    unsynced = even_ranks[False]
    for key in ("output", "grads", "buffers"):
        assert max_abs_diff(unsynced[0][key], reference[key][:4] if key == "output" else reference[key]) > 1e-3, key


def test_three_sgd_steps_with_sync_bn_match_one_process(even_ranks):
    reference, ranks = ddp_reference(), even_ranks[True]
    for rank in ranks:
        assert_close_all(rank["state"], reference["state"])   # parameters and running stats after 3 steps
    assert max_abs_diff(even_ranks[False][0]["state"], reference["state"]) > 1e-3


@pytest.mark.parametrize("sizes", [(5, 3), (8, 0)], ids=["5+3", "8+0"])
def test_uneven_shards_match_one_process(sizes, tmp_path):
    """Counts are all-reduced, so shards may differ; a rank with no samples still joins every collective."""
    reference = ddp_reference()
    ranks = spawn_ranks("ddp", tmp_path, sizes=sizes, sync=True)
    torch.testing.assert_close(joined_output(ranks), reference["output"], **TOL)
    for rank in ranks:
        assert_close_all(rank["grads"], reference["grads"])
        assert_close_all(rank["state"], reference["state"])


# ---- one layer: 1d / 2d / 3d, channels_last, momentum=None, affine=False, track_running_stats=False -------------

def test_layer_matches_batchnorm_on_the_global_batch(tmp_path):
    sizes = (5, 3)
    ranks = spawn_ranks("layers", tmp_path, sizes=sizes)
    for case, (shape, memory_format, options) in enumerate(LAYER_CASES):
        expected = layer_run(seeded_layer(PLAIN_FOR_DIMS[len(shape)], case), case, (GLOBAL_BATCH,), 0)
        got = [rank[case] for rank in ranks]
        for key in ("outputs", "input_grads"):
            joined = [torch.cat([r[key][step] for r in got]) for step in range(2)]
            torch.testing.assert_close(joined, expected[key], **TOL, msg=lambda m: f"case {case} {key}: {m}")
        # the loss is the sum over ranks, so the ranks' local weight / bias gradients add up to plain BN's
        summed_grads = {name: sum(r["grads"][name] for r in got) for name in expected["grads"]}
        assert_close_all(summed_grads, expected["grads"])
        for r in got:
            assert_close_all(r["buffers"], expected["buffers"])
            assert r["keeps_memory_format"], f"case {case}: output lost {memory_format}"


# ---- no sync: bit-identical to nn.BatchNorm -----------------------------------------------------------------------

def plain_and_sync_pair() -> tuple[nn.Module, nn.Module]:
    plain = seeded_layer(nn.BatchNorm2d, 2)
    return plain, convert_sync_batchnorm(seeded_layer(nn.BatchNorm2d, 2))


def assert_bit_identical(plain: nn.Module, synced: nn.Module, train_mode: bool) -> None:
    plain.train(train_mode)
    synced.train(train_mode)
    x = torch.randn(4, 6, 5, 5).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        outs = []
        for layer in (plain, synced):
            x_in = x.clone(memory_format=torch.preserve_format).requires_grad_()
            out = layer(x_in)
            (out * torch.arange(out.numel()).view_as(out).cos()).sum().backward()
            outs.append((out, x_in.grad))
        assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    for a, b in zip(plain.state_dict().values(), synced.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(plain.parameters(), synced.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_without_process_group_and_in_eval_it_is_plain_batchnorm():
    assert not dist.is_initialized()
    assert_bit_identical(*plain_and_sync_pair(), train_mode=True)
    assert_bit_identical(*plain_and_sync_pair(), train_mode=False)


def test_world_size_one_is_plain_batchnorm():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert_bit_identical(*plain_and_sync_pair(), train_mode=True)
    finally:
        dist.destroy_process_group()


# ---- convert / revert ---------------------------------------------------------------------------------------------

def test_convert_then_revert_keeps_the_state_dict():
    net = nn.Sequential(small_net(), nn.Sequential(nn.BatchNorm3d(4, momentum=None), nn.BatchNorm2d(4, affine=False)))
    net[0][0].weight.requires_grad_(False)
    net[0][1].eps = 1e-3
    before = {k: v.clone() for k, v in net.state_dict().items()}
    weight = net[0][1].weight

    synced = convert_sync_batchnorm(net)
    assert synced is net   # changed in place, as torch's convert_sync_batchnorm
    assert [type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [CpuSyncBatchNorm] * 4
    assert synced[0][1].weight is weight and synced[0][1].eps == 1e-3 and synced[1][0].momentum is None
    assert synced[1][1].weight is None and not synced[1][1].affine

    reverted = revert_sync_batchnorm(synced)
    assert [type(m) for m in reverted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [nn.BatchNorm2d, nn.BatchNorm1d, nn.BatchNorm3d, nn.BatchNorm2d]
    assert list(reverted.state_dict()) == list(before)
    assert all(torch.equal(reverted.state_dict()[k], v) for k, v in before.items())
    assert not reverted[0][0].weight.requires_grad and reverted[0][1].weight is weight

    assert isinstance(convert_sync_batchnorm(nn.BatchNorm1d(3)), CpuSyncBatchNorm)   # a bare layer is replaced
    with pytest.raises(ValueError, match="BatchNorm1d, 2d or 3d"):
        revert_sync_batchnorm(CpuSyncBatchNorm(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_convert_on_cuda_uses_torch_sync_batchnorm():
    synced = convert_sync_batchnorm(small_net().cuda())
    assert [type(m) for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == \
        [nn.SyncBatchNorm] * 2
    assert [type(m) for m in revert_sync_batchnorm(synced).modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [nn.BatchNorm2d, nn.BatchNorm1d]
