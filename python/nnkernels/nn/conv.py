import torch

from .. import functional as NF

__all__ = ["Conv2d"]


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d computed by nnkernels: same constructor (padding_mode 'zeros', 'reflect',
    'replicate', 'circular'), parameters, init and state_dict; isinstance(m, torch.nn.Conv2d)
    holds. Non-zero padding modes pad explicitly first, exactly as torch.nn.Conv2d does."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(
                input, self._reversed_padding_repeated_twice, mode=self.padding_mode
            )
            return NF.conv2d(
                input, self.weight, self.bias, self.stride, 0, self.dilation, self.groups
            )
        return NF.conv2d(
            input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )
