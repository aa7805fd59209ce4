"""One torch.autograd.Function per op. Forward calls the native kernel through nnkernels._ops;
backward is written with the same Functions, so double backward (gradgradcheck) works too."""
