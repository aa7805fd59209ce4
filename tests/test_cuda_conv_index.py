"""The CUDA convolution's index math, checked on the CPU: tests/native/conv_index_check.cpp
includes csrc/common/conv2d_args.h as plain C++ and compares the implicit-GEMM formulation of
the forward and both backward passes with the convolution written out directly, over fixed and
random shapes (strides, dilation, asymmetric padding, groups, channels_last strides). The CUDA
kernels' operand providers only read memory through these functions, so this runs the part of
them that a machine without a GPU can run."""

import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "tests", "native", "conv_index_check.cpp")


def test_cuda_conv_index_math(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx or not os.path.isdir(os.path.join(ROOT, "csrc")):
        pytest.skip("needs a C++ compiler and the source tree")
    exe = tmp_path / "conv_index_check"
    subprocess.run(
        [cxx, "-std=c++17", "-O2", "-I", os.path.join(ROOT, "csrc"), SRC, "-o", str(exe)],
        check=True,
        capture_output=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
