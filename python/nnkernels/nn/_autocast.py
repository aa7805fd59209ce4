import torch


def autocast_on(x) -> bool:
    """Whether torch.autocast is active for x's device. Under autocast, torch computes Linear,
    Conv2d and the LSTMs in a lower precision (float16 / bfloat16) that nnkernels does not, so
    those layers defer to torch's own forward there instead of returning a different dtype."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if x.is_cuda else torch.is_autocast_cpu_enabled()
