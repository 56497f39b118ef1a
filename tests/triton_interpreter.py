"""Where the Triton kernel tests run: the Triton interpreter on the CPU, or a CUDA device when the interpreter is off.

Triton decides at decoration time whether a ``@triton.jit`` function is compiled or interpreted, and
``triton.language`` decorates its own helpers when triton is first imported (importing pikv_press does), so
``TRITON_INTERPRET=1`` must be in the environment before that: ``tests/conftest.py`` sets it by default. Kernel modules
are loaded through ``pikv_press.kernels._dispatch.triton_module``, which reloads a module imported under the other
mode. Test modules use ``pytestmark = pytest.mark.usefixtures("interpreter")`` and the ``DEVICE`` of this module.
"""

from __future__ import annotations

import os

import pytest
import torch

from pikv_press.kernels._dispatch import interpreting

pytest.importorskip("triton", reason="the Triton kernels need the `kernels` extra (pip install 'pikv-press[kernels]')")

DEVICE = torch.device("cpu" if interpreting() or not torch.cuda.is_available() else "cuda")


@pytest.fixture(scope="module")
def interpreter():
    """Skips unless the kernels can run (interpreter on, or a CUDA device); PIKV_KERNELS unset for the module."""
    if not interpreting() and DEVICE.type != "cuda":
        pytest.skip("TRITON_INTERPRET=1 was not set before triton was imported (tests/conftest.py sets it) and there "
                    "is no CUDA device")
    saved = os.environ.pop("PIKV_KERNELS", None)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["PIKV_KERNELS"] = saved


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equality, dtype and shape included."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    assert torch.equal(a, b), (a - b).abs().max() if a.is_floating_point() else (a != b).sum()


def assert_all_same(ref, tri) -> None:
    """Bitwise equality of two tuples of tensors."""
    assert len(ref) == len(tri)
    for a, b in zip(ref, tri, strict=True):
        assert_same(a, b)
