"""The op layer: one module per op (its kernel primitives, registered with torch.library; its one
torch.autograd.Function; its argument rules), built on _dispatch (eager vs compiled calls).

    matmul.py         mm, linear, sum_rows          conv2d.py   the three conv2d passes
    batch_norm.py     batch_norm, SyncBatchNorm     lstm.py     LSTM layers and cells
    cross_entropy.py  cross_entropy, linear_cross_entropy
"""
