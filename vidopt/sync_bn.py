"""BatchNorm with batch statistics over the whole process group on CPU (gloo), where torch's nn.SyncBatchNorm refuses to
run: with it, 2 data-parallel workers with half the batch each take the same steps as 1 worker with the whole batch.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """nn.SyncBatchNorm in plain torch ops (tested on CPU, gloo) plus two collectives per layer and step: the forward
    all-gathers each rank's (count, mean, biased variance) per channel, the backward all-reduces sum(dy) and
    sum(dy * x_hat). Input [n, c, *] (BatchNorm1d's [n, c] and [n, c, l], 2d, 3d; channels_last kept).

    In training mode with an initialised process group of world size > 1 it normalises with the global batch mean and
    biased variance, updates running_mean / running_var as nn.BatchNorm would for the global batch (unbiased variance
    with the global count, momentum or momentum=None's cumulative average), and its input gradient is that of the SUM
    of the ranks' losses, torch SyncBatchNorm's convention: weight / bias gradients stay local sums, DDP averages all
    parameter gradients, and the step equals one worker's on the whole batch with the mean loss.
    Otherwise (eval mode, no process group, world size 1) it runs nn.BatchNorm's own forward, bit for bit.

    Contract, as for nn.SyncBatchNorm: while training, every rank of the group calls every such layer in the same
    order, forward and backward (the collectives pair up by order; a rank that skips one hangs the others). A rank
    with 0 samples still takes part and counts for nothing; the global batch needs > 1 value per channel.
    DDP cannot hold nn.SyncBatchNorm on CPU (it raises), which is why this is not a subclass of it.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"CpuSyncBatchNorm: expected input [n, c, ...] with at least 2 dims, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self._sync_group()
        if group is None:
            return super().forward(input)   # nn.BatchNorm's forward, so eval / unsynced runs are identical to it
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:   # as _BatchNorm.forward
            self.num_batches_tracked.add_(1)
            if self.momentum is None:   # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        running_mean = self.running_mean if self.track_running_stats else None
        running_var = self.running_var if self.track_running_stats else None
        return _SyncBatchNormFunction.apply(input, self.weight, self.bias, running_mean, running_var, self.eps,
                                            momentum, group)

    def _sync_group(self) -> dist.ProcessGroup | None:
        """The group to synchronise over, or None where plain BatchNorm applies."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        # x: [n, c, *]; statistics per channel over n and *. bf16 / fp16 activations (CPU autocast) in float32.
        channels, reduce_dims = x.shape[1], [0, *range(2, x.dim())]
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        local_count = x.numel() // channels if channels else 0
        if local_count:
            var, mean = torch.var_mean(xf, dim=reduce_dims, correction=0)
        else:   # var_mean of nothing is nan; zeros with count 0 drop out of the merge below
            var = mean = xf.new_zeros(channels)
        # One all_gather of every rank's [count, mean (c), biased var (c)] in float64, then a count-weighted merge
        # (Chan et al.): no sum-of-squares cancellation, and uneven shards weigh by their counts.
        count_column = torch.tensor([local_count], dtype=torch.float64, device=x.device)
        local = torch.cat([count_column, mean.double(), var.double()])
        gathered = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, local, group=group)
        stats = torch.stack(gathered)   # [world, 1 + 2c]
        counts, means, variances = stats[:, :1], stats[:, 1:1 + channels], stats[:, 1 + channels:]
        count = float(counts.sum())
        if count <= 1:   # every rank sees the same count, so every rank raises
            raise ValueError(f"CpuSyncBatchNorm: expected more than 1 value per channel over the process group when "
                             f"training, got {count:.0f}; give the ranks larger batches")
        global_mean = (counts * means).sum(0) / count
        global_var = (counts * (variances + (means - global_mean) ** 2)).sum(0) / count   # biased
        if running_mean is not None:
            with torch.no_grad():
                running_mean.copy_((1 - momentum) * running_mean.double() + momentum * global_mean)
                running_var.copy_((1 - momentum) * running_var.double()
                                  + momentum * global_var * (count / (count - 1)))   # unbiased, global count

        mean = global_mean.to(xf.dtype)
        invstd = torch.rsqrt(global_var + eps).to(xf.dtype)
        scale = invstd if weight is None else invstd * weight.to(xf.dtype)
        shift = -mean * scale if bias is None else bias.to(xf.dtype) - mean * scale
        per_channel = (1, channels) + (1,) * (x.dim() - 2)   # [c] -> broadcastable over [n, c, *]
        y = xf * scale.view(per_channel) + shift.view(per_channel)   # elementwise: keeps channels_last
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        return y.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, weight, mean, invstd = ctx.saved_tensors
        channels, reduce_dims = x.shape[1], [0, *range(2, x.dim())]
        per_channel = (1, channels) + (1,) * (x.dim() - 2)
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        dy = grad_output.to(xf.dtype)
        x_hat = (xf - mean.view(per_channel)) * invstd.view(per_channel)
        sum_dy = dy.sum(reduce_dims)
        sum_dy_xhat = (dy * x_hat).sum(reduce_dims)

        grad_input = None
        if ctx.needs_input_grad[0]:
            # The other ranks' outputs depend on this rank's x through the global mean and variance: their terms
            # arrive through the all-reduced sums, making grad_input that of the sum of all ranks' losses.
            sums = torch.cat([sum_dy, sum_dy_xhat]).double()
            dist.all_reduce(sums, group=ctx.group)
            mean_dy, mean_dy_xhat = (sums / ctx.count).to(xf.dtype).split(channels)
            scale = invstd if weight is None else invstd * weight.to(xf.dtype)
            grad_input = ((dy - mean_dy.view(per_channel) - x_hat * mean_dy_xhat.view(per_channel))
                          * scale.view(per_channel)).to(x.dtype)
        # weight / bias: this rank's sums; DDP's gradient all-reduce does the rest
        grad_weight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_bias = sum_dy.to(weight.dtype) if weight is not None and ctx.needs_input_grad[2] else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Every BatchNorm1d/2d/3d in `module` replaced by nn.SyncBatchNorm where its tensors are on CUDA (torch's kernels),
    else by CpuSyncBatchNorm, sharing its parameters (requires_grad and optimizer references kept) and running stats.
    As nn.SyncBatchNorm.convert_sync_batchnorm: call it before wrapping in DDP; returns `module` changed in place,
    or the new layer if `module` itself is a BatchNorm. Each new layer records its plain class for
    revert_sync_batchnorm."""
    def convert(layer: nn.Module) -> nn.Module | None:
        if not isinstance(layer, PLAIN_BATCHNORMS):
            return None
        first = next(itertools.chain(layer.parameters(), layer.buffers()), None)
        sync_class = nn.SyncBatchNorm if first is not None and first.is_cuda else CpuSyncBatchNorm
        synced = sync_class(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                            process_group)
        synced.plain_batchnorm_class = next(c for c in PLAIN_BATCHNORMS if isinstance(layer, c))
        return _take_state(layer, synced)

    return _replace_layers(module, convert)


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """convert_sync_batchnorm undone: each nn.SyncBatchNorm / CpuSyncBatchNorm back to the BatchNorm1d/2d/3d it was,
    with the same tensors, so state_dict keys and the architecture record match the unconverted model."""
    def revert(layer: nn.Module) -> nn.Module | None:
        if not isinstance(layer, (nn.SyncBatchNorm, CpuSyncBatchNorm)):
            return None
        plain_class = getattr(layer, "plain_batchnorm_class", None)
        if plain_class is None:
            raise ValueError(f"revert_sync_batchnorm: {type(layer).__name__}({layer.num_features}) does not record "
                             f"whether it was BatchNorm1d, 2d or 3d; only layers made by convert_sync_batchnorm can be "
                             f"reverted (or set its plain_batchnorm_class)")
        plain = plain_class(layer.num_features, layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
        return _take_state(layer, plain)

    return _replace_layers(module, revert)


def _replace_layers(module: nn.Module, replace) -> nn.Module:
    """`module` with every submodule m for which replace(m) is not None swapped for it, recursively."""
    replaced = replace(module)
    if replaced is None:
        replaced = module
    for name, child in module.named_children():
        replaced.add_module(name, _replace_layers(child, replace))
    return replaced


def _take_state(source: nn.Module, target: nn.Module) -> nn.Module:
    """target holding source's parameters and buffers (the same tensors, not copies) and its training flag."""
    if source.affine:
        target.weight, target.bias = source.weight, source.bias
    target.running_mean, target.running_var = source.running_mean, source.running_var
    target.num_batches_tracked = source.num_batches_tracked
    target.training = source.training
    if hasattr(source, "qconfig"):
        target.qconfig = source.qconfig
    return target
