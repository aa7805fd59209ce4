"""Shared by the examples: scikit-learn's bundled digits (1797 8x8 images, no download), a train
loop, and a side-by-side run of one model with torch layers and with nnkernels layers.

Both runs start from the same weights and see the same batches in the same order; the nnkernels
run is the torch model after `nnkernels.swap_layers(model)`, the one line a user adds to their own
code.
"""

import argparse
import copy
import time

import nnkernels
import torch


def load_digits(device="cpu"):
    """(x_train, y_train, x_test, y_test): images scaled to [0, 1] as (N, 1, 8, 8) float32, a
    fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError:
        raise SystemExit(
            "the examples read scikit-learn's bundled digits: pip install 'nnkernels[examples]'"
        ) from None
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    n = int(0.8 * len(y))
    return x[:n], y[:n], x[n:], y[n:]


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def train(model, loss_fn, data, epochs, lr, batch=64, seed=1):
    """SGD with momentum, one epoch per step of the generator: yields (seconds, test accuracy)
    after each epoch."""
    x, y, xt, yt = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g).to(y.device)
        t0 = time.perf_counter()
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        seconds = time.perf_counter() - t0
        yield seconds, accuracy(model, xt, yt)


def compare(name, make_model, epochs, lr, argv=None):
    """Trains make_model() with torch layers and with nnkernels layers, prints both side by side."""
    p = argparse.ArgumentParser(description=f"{name} on scikit-learn's digits, torch vs nnkernels")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    data = load_digits(args.device)
    torch.manual_seed(0)
    ref = make_model().to(args.device)
    ref_loss = torch.nn.CrossEntropyLoss()
    ours, our_loss = copy.deepcopy(ref), torch.nn.CrossEntropyLoss()
    report = nnkernels.swap_layers(ours)  # the one line to add to your own code
    nnkernels.swap_layers(our_loss)
    print(f"{name}: {len(data[1])} training / {len(data[3])} test images, {args.epochs} epochs")
    print(report)
    # The two runs take turns epoch by epoch, so that a machine whose speed drifts (a shared VM,
    # turbo) slows both alike instead of whichever runs second.
    runs = {
        "torch": train(ref, ref_loss, data, args.epochs, lr),
        "nnkernels": train(ours, our_loss, data, args.epochs, lr),
    }
    rows = {label: ([], []) for label in runs}
    for _ in range(args.epochs):
        for label, run in runs.items():
            seconds, acc = next(run)
            rows[label][0].append(seconds)
            rows[label][1].append(acc)
    print(f"\n{'epoch':>5}  {'torch s':>8}  {'torch acc':>9}  {'nnk s':>8}  {'nnk acc':>8}")
    for e in range(args.epochs):
        (tt, ta), (nt, na) = rows["torch"], rows["nnkernels"]
        print(f"{e + 1:>5}  {tt[e]:8.3f}  {ta[e]:9.4f}  {nt[e]:8.3f}  {na[e]:8.4f}")
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    t_s, n_s = med(rows["torch"][0]), med(rows["nnkernels"][0])
    t_a, n_a = rows["torch"][1][-1], rows["nnkernels"][1][-1]
    print(
        f"\n{name}: median epoch torch {t_s:.3f} s, nnkernels {n_s:.3f} s ({t_s / n_s:.2f}x); "
        f"final test accuracy torch {t_a:.4f}, nnkernels {n_a:.4f}"
    )
    return t_a, n_a
