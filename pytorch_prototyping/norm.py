"""BatchNorm whose batch statistics stay accurate in the channels-last layout on CPU.

ATen's CPU BatchNorm kernels for channels-last input sum each channel over all positions in the tensor's own
precision, one position after the other (forward: mean and variance; backward: ``sum(dy)`` and
``sum(dy * (x - mean))``), so their rounding error grows with the number of positions; the NCHW kernels the
original DeepVoxels ran on do not. The U-Nets pass that error on to the BatchNorms at their bottom, which
normalise over a handful of values and amplify it (docs/differences.md has the figures). Here the statistics
and the backward's two sums come from ATen's sums (pairwise summation, accurate in any layout): the mean,
then the mean square of ``x - mean``; the normalisation itself is ATen's batch_norm with those statistics, so
the layout is kept and no copy is made.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F


def _uses_accurate_statistics(x: torch.Tensor, batch_stats: bool) -> bool:
    """Batch statistics of a CPU float32/float64 tensor that is not NC(D)HW-contiguous (channels-last).
    Everything else (NCHW, CUDA whose kernels are accurate, autocast's narrow types) takes ATen's kernel."""
    return (batch_stats and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() > 2 and not x.is_contiguous())


def _channel_shape(x: torch.Tensor) -> list[int]:
    """Shape that broadcasts a per-channel vector over ``x`` (B, C, ...)."""
    return [1, -1] + [1] * (x.dim() - 2)


class _BatchStatisticsNorm(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` with per-channel batch statistics."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [0, *range(2, x.dim())]
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square_().mean(dim=dims)  # two passes, as the NCHW kernel makes them
        mean = mean.view(-1)
        # ATen's kernel with the given statistics (eval mode): the same normalisation arithmetic as in training.
        out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return out, mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_mean, _grad_var):
        x, weight, mean, invstd = ctx.saved_tensors
        dims = [0, *range(2, x.dim())]
        shape = _channel_shape(x)
        count = x.numel() // x.shape[1]
        centred = x - mean.view(shape)
        sum_dy = grad.sum(dim=dims)
        sum_dy_centred = (grad * centred).sum(dim=dims)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else weight * invstd
            # dx = scale * (dy - mean(dy) - (x - mean) * invstd^2 * mean(dy * (x - mean))), in place in `centred`
            grad_x = centred.mul_((-scale * (sum_dy_centred / count) * invstd * invstd).view(shape))
            grad_x.addcmul_(grad, scale.view(shape)).sub_((scale * (sum_dy / count)).view(shape))
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_centred * invstd
        if ctx.needs_input_grad[2]:
            grad_bias = sum_dy
        return grad_x, grad_weight, grad_bias, None


def batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], batch_stats: bool, momentum: float,
               eps: float) -> torch.Tensor:
    """``F.batch_norm`` with accurate channels-last batch statistics on CPU (see the module docstring)."""
    if not _uses_accurate_statistics(x, batch_stats):
        return F.batch_norm(x, running_mean, running_var, weight, bias, batch_stats, momentum, eps)
    out, mean, var = _BatchStatisticsNorm.apply(x, weight, bias, eps)
    if running_mean is not None and momentum:
        # Through ``.data``, whose version counter is its own: ATen's kernel updates the running statistics without
        # counting a change either, and an earlier call on the same module that took ATen's kernel (an NCHW
        # input) keeps them for its backward pass, which would otherwise refuse to run.
        count = x.numel() // x.shape[1]
        running_mean.data.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.data.mul_(1 - momentum).add_(var * (count / max(count - 1, 1)), alpha=momentum)
    return out


class _AccurateBatchNorm:
    """Mixin: ``nn.BatchNorm*d`` computing its batch statistics with ``batch_norm`` above. Same parameters,
    buffers and state_dict keys; the running statistics are updated as ``nn.BatchNorm*d`` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or self.running_mean is None
        if not _uses_accurate_statistics(x, batch_stats):
            return super().forward(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        track = self.running_mean if not self.training or self.track_running_stats else None
        return batch_norm(x, track, self.running_var if track is not None else None, self.weight, self.bias,
                          batch_stats, momentum, self.eps)


class BatchNorm2d(_AccurateBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with accurate channels-last batch statistics on CPU."""


class BatchNorm3d(_AccurateBatchNorm, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with accurate channels-last batch statistics on CPU."""
