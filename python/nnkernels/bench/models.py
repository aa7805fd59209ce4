"""Whole-model cases: a network built from torch.nn layers against the same network after
nnkernels.swap_layers (same weights, same inputs), side by side. A kernel that wins on its own
case can still lose inside a network (small feature maps, skinny GEMMs, the per-call cost), so
these are the measure of the package's speed.

    training step   zero_grad, forward, torch's cross-entropy on the output, backward, SGD step
    inference       eval mode, forward under torch.no_grad()
With dtype "bfloat16" (bench --dtype bfloat16) both run the forward (and the loss) under
torch.autocast(device, bfloat16), as torch's mixed-precision recipe does, on both sides.

GFLOP/s are torch's flop count of the model (torch.utils.flop_counter) per step.

Models (defined here after torchvision's definitions, random init), each on a batch of 8 64x64
images and of 2 224x224 images: ResNet-18 (7x7 stride-2 stem, max pool, basic blocks, 1x1 stride-2
downsampling), MobileNetV2 (inverted residuals, depthwise 3x3, ReLU6) and VGG-11 with batch norm.
Besides them an LSTM language model (Embedding(1000, 200), LSTM(200, 200, 2 layers),
Linear(200, 1000)) on 35 steps of 20 sequences, and the course's MLP (64-300-100-10) and CNN
(conv 64, conv 32, dense 10 on 8x8 images) on batches of 64, as in examples/.

`profile(case)` (python -m nnkernels bench --ops models --profile) times each side under
torch.profiler and sums the time by layer kind, to show which swapped layers lose and by how much.
"""

import contextlib
import copy

import torch
import torch.nn.functional as F
from torch import nn

import nnkernels

from .harness import Case


class _BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def resnet18(num_classes=1000):
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, num_classes),
    )


def _conv_bn(cin, cout, k, stride=1, groups=1, act=nn.ReLU6):
    layers = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    return layers + [act(inplace=True)] if act else layers


class _InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        layers = _conv_bn(cin, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, act=None)
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


def mobilenet_v2(num_classes=1000):
    layers, cin = _conv_bn(3, 32, 3, 2), 32
    for t, c, n, s in (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ):
        for i in range(n):
            layers.append(_InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += _conv_bn(cin, 1280, 1)
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(1280, num_classes),
    )


def vgg11_bn(num_classes=1000):
    layers, cin = [], 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += _conv_bn(cin, v, 3, act=nn.ReLU)
            cin = v
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        nn.Linear(512 * 7 * 7, 4096),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(4096, 4096),
        nn.ReLU(True),
        nn.Dropout(),
        nn.Linear(4096, num_classes),
    )


def course_mlp():
    """examples/mlp.py's model."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


def course_cnn():
    """examples/cnn.py's model."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.Conv2d(64, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 10),
    )


class LanguageModel(nn.Module):
    """(T, B) token ids -> (T * B, vocab) logits."""

    def __init__(self, vocab=1000, hidden=200, layers=2):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, layers)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        y, _ = self.rnn(self.embed(tokens))
        return self.head(y.reshape(-1, y.shape[-1]))


def _flops(model, x, target, train):
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            F.cross_entropy(model(x), target).backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _lstm_flops(T, B, hidden, layers, vocab, train):
    """torch's counter does not see inside nn.LSTM: its GEMMs, counted by hand."""
    rnn = layers * 2 * T * B * 4 * hidden * (2 * hidden)
    head = 2 * T * B * hidden * vocab
    return (rnn + head) * (3 if train else 1)


def _case(name, build, x, target, train, device, flops=None, dtype="float32"):
    torch.manual_seed(0)
    theirs = build().to(device)
    ours = copy.deepcopy(theirs)
    nnkernels.swap_layers(ours)  # in place: same Parameters' values, nnkernels layers
    if flops is None:
        flops = _flops(copy.deepcopy(theirs), x, target, train)

    def precision():  # the autocast region of torch's recipe, or none
        if dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=getattr(torch, dtype))

    def make(model):
        if not train:
            model.eval()

            def infer():
                with torch.no_grad(), precision():
                    return model(x)

            return infer
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            with precision():
                loss = F.cross_entropy(model(x), target)
            loss.backward()
            opt.step()

        return step

    return Case(
        op="models",
        name=f"{name} {'train step' if train else 'inference'}",
        dtype=dtype,
        ours=make(ours),
        torch=make(theirs),
        flops=flops,
    )


IMAGE_MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2, "vgg11_bn": vgg11_bn}


def cases(device: str, quick: bool, dtype: str = "float32"):
    """--quick: the training steps at 64x64 and of the LSTM LM only. dtype "bfloat16": under
    torch.autocast (see the module docstring)."""
    torch.manual_seed(0)
    out = []
    for batch, size in ((8, 64), (2, 224)):
        x = torch.randn(batch, 3, size, size, device=device)
        target = torch.randint(0, 1000, (batch,), device=device)
        for name, build in IMAGE_MODELS.items():
            for train in (True, False):
                if quick and (size == 224 or not train):
                    continue
                out.append(
                    _case(
                        f"{name} {batch}x3x{size}x{size}",
                        build,
                        x,
                        target,
                        train,
                        device,
                        dtype=dtype,
                    )
                )
    T, B = 35, 20
    tokens = torch.randint(0, 1000, (T, B), device=device)
    target = torch.randint(0, 1000, (T * B,), device=device)
    for train in (True, False) if not quick else (True,):
        flops = _lstm_flops(T, B, 200, 2, 1000, train)
        out.append(
            _case("LSTM LM T35 B20", LanguageModel, tokens, target, train, device, flops, dtype)
        )
    digits = torch.rand(64, 1, 8, 8, device=device)
    target = torch.randint(0, 10, (64,), device=device)
    for name, build in (("course MLP", course_mlp), ("course CNN", course_cnn)):
        for train in (True, False) if not quick else (True,):
            out.append(_case(f"{name} 64x1x8x8", build, digits, target, train, device, dtype=dtype))
    return out


# ----------------------------------------------------------------------------- per-layer profile
# torch.profiler's operator names, by the layer they belong to (ours: the autograd Functions and
# their backward nodes; torch: the aten ops its layers call and their autograd nodes).
_KINDS = (
    ("conv2d", ("Conv2dFunction", "convolution", "conv2d")),
    ("batch_norm", ("BatchNorm", "batch_norm")),
    ("lstm", ("LSTM", "lstm", "Rnn", "rnn")),
    ("cross_entropy", ("CrossEntropy", "log_softmax", "LogSoftmax", "nll_loss", "NllLoss")),
    (
        "linear",
        (
            "LinearFunction",
            "aten::linear",
            "aten::addmm",
            "aten::mm",
            "Addmm",
            "MmBackward",
            "nnkernels::linear",
            "nnkernels::mm",
            "nnkernels::sum_rows",
        ),
    ),
    ("pooling", ("pool", "Pool")),
    ("activation", ("relu", "Relu", "hardtanh", "Hardtanh", "threshold", "clamp")),
    ("optimizer", ("Optimizer", "sgd", "foreach", "zero_grad")),
)


def _kind(key: str) -> str:
    for kind, needles in _KINDS:
        if any(n in key for n in needles):
            return kind
    return "other"


def profile(case: Case, steps: int = 5) -> dict:
    """{layer kind: (ours ms, torch ms)} per step, plus 'total': self CPU time under
    torch.profiler, each operator's time charged to the outermost enclosing operator of a known
    kind (torch's nn.LSTM calls aten::addmm: that time is the LSTM's)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as _profile

    from ..ops import _dispatch

    out = {}
    for i, side in enumerate(("ours", "torch")):
        fn = getattr(case, side)
        for _ in range(2):
            fn()
        _dispatch.profiling = True  # our eager kernel calls as nnkernels::<primitive> events
        try:
            with _profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    fn()
        finally:
            _dispatch.profiling = False
        for e in prof.events():
            kind, up = "other", e
            while up is not None:
                k = _kind(up.name)
                kind = k if k != "other" else kind
                up = up.cpu_parent
            ms = out.setdefault(kind, [0.0, 0.0])
            ms[i] += e.self_cpu_time_total / 1e3 / steps
    out["total"] = [sum(v[i] for v in out.values()) for i in (0, 1)]
    return out


def format_profile(name: str, prof: dict) -> str:
    rows = [f"{name}: self CPU ms per step by layer kind (torch.profiler)"]
    rows.append(f"  {'layer':<14} {'ours':>9} {'torch':>9}  torch/ours")
    for kind, (ours, theirs) in sorted(prof.items(), key=lambda kv: (kv[0] == "total", -kv[1][0])):
        ratio = f"{theirs / ours:6.2f}x" if ours > 0 else "     -"
        rows.append(f"  {kind:<14} {ours:9.2f} {theirs:9.2f}  {ratio}")
    return "\n".join(rows)
