import torch

from .. import functional as NF
from ..ops.batch_norm import sync_batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "SyncBatchNorm"]


class _BatchNormForward:
    """torch.nn.modules.batchnorm._BatchNorm.forward, with nnkernels' batch_norm: the same
    momentum / cumulative average (momentum=None), num_batches_tracked and train/eval rules."""

    def _batch_norm_state(self):
        """(running_mean, running_var, use batch statistics, momentum factor) for this call, as
        torch's _BatchNorm.forward derives them (counting the batch in num_batches_tracked)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        rm = self.running_mean if use_running else None
        rv = self.running_var if use_running else None
        return rm, rv, bn_training, factor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        rm, rv, bn_training, factor = self._batch_norm_state()
        return NF.batch_norm(input, rm, rv, self.weight, self.bias, bn_training, factor, self.eps)


class BatchNorm1d(_BatchNormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by nnkernels (constructor, buffers and state_dict are
    torch's, num_batches_tracked included)."""


class BatchNorm2d(_BatchNormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by nnkernels (constructor, buffers and state_dict are
    torch's, num_batches_tracked included)."""


class SyncBatchNorm(_BatchNormForward, torch.nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm computed by nnkernels: in training under torch.distributed, the
    per-channel statistics (and the input gradient's sums) are combined across the process group,
    on CPU (gloo) as on CUDA (NCCL); otherwise it is BatchNorm. Same constructor and state_dict as
    torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        running_mean, running_var, bn_training, factor = self._batch_norm_state()

        dist = torch.distributed
        need_sync = bn_training and self.training and dist.is_available() and dist.is_initialized()
        if need_sync:
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
            need_sync = world_size > 1
        if not need_sync:
            return NF.batch_norm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                bn_training,
                factor,
                self.eps,
            )
        return sync_batch_norm(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            self.eps,
            factor,
            group,
            world_size,
        )

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replaces every BatchNorm*d in `module` (torch's or nnkernels') with an
        nnkernels.nn.SyncBatchNorm that shares its parameters and buffers, as
        torch.nn.SyncBatchNorm.convert_sync_batchnorm does; returns the converted module."""
        out = module
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
            module, cls
        ):
            out = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            if module.affine:
                with torch.no_grad():
                    out.weight = module.weight
                    out.bias = module.bias
            out.running_mean = module.running_mean
            out.running_var = module.running_var
            out.num_batches_tracked = module.num_batches_tracked
            out.training = module.training
            if hasattr(module, "qconfig"):
                out.qconfig = module.qconfig
        for name, child in module.named_children():
            out.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return out
