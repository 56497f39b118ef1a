"""Triton kernels of pikv-press, installed as ``pikv_press.kernels``.

Each kernel lives in its own module beside a pure-torch reference implementation, which is the CPU path and the
test oracle; dispatch chooses Triton on CUDA. No kernel is shipped yet.
"""
