"""Which implementation of a kernel runs: the Triton kernel or the torch reference.

The rule (``PIKV_KERNELS`` environment variable, or a ``backend=`` argument where a function takes one):

* ``auto`` (default): the Triton kernel when every tensor is on a CUDA device, ``triton`` imports and the kernel was
  measured faster than its torch reference on a GPU; the torch reference otherwise (CPU tensors always take the
  reference under ``auto``, also under ``TRITON_INTERPRET=1``: the interpreter is a test tool, far slower than torch).
  Measured on an H200 (``measurements/kernel_benchmark/kernel_benchmark_h200.jsonl``, bf16, 8k-128k tokens): the
  partial attention, quantize and quantized attention kernels are faster than torch (x1.9-x15) and ``auto`` takes them;
  the select, latent attention and routing features kernels are slower (x1.4-x14) and ``auto`` keeps the reference
  for them (``backend='triton'`` or ``PIKV_KERNELS=triton`` still runs them).
* ``torch``: always the torch reference.
* ``triton``: always the Triton kernel; ``RuntimeError`` when ``triton`` does not import, or when the tensors are on
  the CPU and the Triton interpreter is off (``TRITON_INTERPRET=1`` runs the kernels on CPU tensors, slowly: that is
  how the tests compare every kernel with its reference on a machine without a GPU).

Triton modules (``pikv_press/kernels/*_triton.py``) are imported only when a Triton path is taken, through
:func:`triton_module`: Triton decides at decoration time whether a ``@triton.jit`` function is compiled or
interpreted, so a module imported under the other mode is reloaded.
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType

import torch

ENV_VAR = "PIKV_KERNELS"
BACKENDS = ("auto", "torch", "triton")
_TRUE = ("1", "true", "yes", "on")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    """Whether ``import triton`` succeeds (the ``kernels`` extra installs it)."""
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001  (a broken install raises more than ImportError)
        return False
    return True


def interpreting() -> bool:
    """Whether the Triton interpreter is on (``TRITON_INTERPRET=1``): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: ``backend`` when given, else ``$PIKV_KERNELS``, else ``auto``."""
    value = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    value = str(value).strip().lower() or "auto"
    if value not in BACKENDS:
        source = "backend" if backend is not None else f"${ENV_VAR}"
        raise ValueError(f"{source}={value!r} is not a kernel backend: use one of {BACKENDS} (auto = Triton on CUDA "
                         "when triton imports, the torch reference otherwise).")
    return value


def use_triton(*tensors: torch.Tensor | None, backend: str | None = None, supported: bool = True,
               why_unsupported: str = "", faster_on_gpu: bool = True) -> bool:
    """Whether the Triton kernel should run on ``tensors`` (``None`` entries are ignored).

    ``supported=False`` (an input the kernel does not handle, ``why_unsupported`` saying which) makes ``auto`` take
    the reference and ``triton`` raise. ``faster_on_gpu=False`` (a kernel measured slower than its reference on a
    GPU) makes ``auto`` take the reference; ``triton`` still runs the kernel.
    """
    mode = requested_backend(backend)
    if mode == "torch":
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if mode == "auto":
        return supported and faster_on_gpu and on_cuda and triton_available()
    if not triton_available():
        raise RuntimeError(f"{ENV_VAR}=triton (or backend='triton') but triton does not import: install it with "
                           "`pip install 'pikv-press[kernels]'`, or use the torch reference (PIKV_KERNELS=auto or "
                           "torch).")
    if not supported:
        raise RuntimeError(f"the Triton kernel does not handle this input ({why_unsupported}): use the torch "
                           "reference (PIKV_KERNELS=auto or torch).")
    if not present:
        return True
    devices = {t.device for t in present}
    if len(devices) > 1:
        raise RuntimeError(f"the Triton kernel needs all its tensors on one device, got {sorted(map(str, devices))}: "
                           "move them to one device first.")
    if not on_cuda and not interpreting():
        raise RuntimeError(f"{ENV_VAR}=triton with tensors on {present[0].device}: Triton kernels run on CUDA "
                           "devices; set TRITON_INTERPRET=1 to run them on the CPU through the (slow) Triton "
                           "interpreter, or use the torch reference (PIKV_KERNELS=auto or torch).")
    return True


def triton_module(name: str) -> ModuleType:
    """Import ``pikv_press.kernels.<name>`` (a module of ``@triton.jit`` kernels), reloading it when it was
    imported under the other interpreter mode (its ``INTERPRETED`` flag)."""
    module = importlib.import_module(f"pikv_press.kernels.{name}")
    if getattr(module, "INTERPRETED", None) != interpreting():
        module = importlib.reload(module)
    return module


def true_divide(numerator: torch.Tensor, divisor: float) -> torch.Tensor:
    """``numerator / divisor`` correctly rounded (IEEE division) on every device, as the kernels' ``tl.div_rn``.

    A Python-number divisor is not enough: on CUDA tensors torch multiplies by the divisor's reciprocal instead of
    dividing, which differs by an ulp (seen on an H200), so a reference written ``x / 3`` is not bit-stable across
    devices. A 0-dim tensor divisor on ``numerator``'s device takes the true division on the CPU and on CUDA.
    """
    return numerator / torch.tensor(divisor, dtype=numerator.dtype, device=numerator.device)
