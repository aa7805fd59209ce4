"""A model with swapped nnkernels layers (conv2d, SyncBatchNorm, LSTM, linear, cross-entropy)
trained with DistributedDataParallel over two gloo processes on localhost: its gradients and, 3
SGD steps later, its parameters and running statistics match one process training the torch
model on the whole batch."""

import copy
import os

import nnkernels
import pytest
import torch
from conftest import free_port

STEPS = 3


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 6, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(6)
        self.rnn = torch.nn.LSTM(6, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x):  # x (N, 1, 5, 5)
        f = torch.relu(self.bn(self.conv(x)))  # (N, 6, 5, 5)
        out, _ = self.rnn(f.mean(3).transpose(1, 2))  # 5 steps of 6 channels
        return self.head(out[:, -1])


def _data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 1, 5, 5, generator=g) * 2 + 1, torch.randint(0, 4, (16,), generator=g)


def _train(model, loss_fn, x, y):
    """STEPS of SGD; returns the gradients of the first step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = None
    for _ in range(STEPS):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if first is None:
            first = [p.grad.clone() for p in model.parameters()]
        opt.step()
    return first


def _worker(rank, world, port):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        torch.manual_seed(0)
        ref = Net()
        model = copy.deepcopy(ref)
        # torch's DDP refuses SyncBatchNorm inside CPU modules at construction ("SyncBatchNorm
        # layers only work with GPU modules"); nnkernels' SyncBatchNorm runs on CPU over gloo,
        # so on CPU the batch norms are converted after wrapping. The conversion keeps the
        # Parameter and buffer objects DDP registered, and so does the swap.
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        report = nnkernels.swap_layers(ddp)
        loss_fn = torch.nn.CrossEntropyLoss()
        nnkernels.swap_layers(loss_fn)
        assert {n for n, _ in report.changed} == {
            "module.conv",
            "module.bn",
            "module.rnn",
            "module.head",
        }
        assert isinstance(model.bn, nnkernels.nn.SyncBatchNorm)
        x, y = _data()
        half = slice(rank * 8, rank * 8 + 8)  # equal halves: DDP's mean of the two gradients is
        grads = _train(ddp, loss_fn, x[half], y[half])  # the full batch's gradient
        ref_grads = _train(ref, torch.nn.CrossEntropyLoss(), x, y)
        scale = max(g.abs().max().item() for g in ref_grads)
        for (name, _), a, b in zip(ref.named_parameters(), grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * scale, msg=name)
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
        torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one_process():
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, free_port()), nprocs=2, join=True)
