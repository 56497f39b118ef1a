"""The dispatch rule of pikv_press.kernels: auto = Triton on CUDA when triton imports, torch otherwise; the
PIKV_KERNELS environment variable (or backend=) forces either; forcing Triton without triton or on CPU tensors
without the interpreter raises an error that says what to do."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pikv_press.kernels import _dispatch
from pikv_press.kernels.select import select_and_compact

CPU = torch.zeros(2)
FAKE_CUDA = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


@pytest.fixture
def env(monkeypatch):
    monkeypatch.delenv("PIKV_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    return monkeypatch


def test_auto_takes_torch_on_cpu_even_under_the_interpreter(env):
    assert not _dispatch.use_triton(CPU)
    env.setenv("TRITON_INTERPRET", "1")
    assert not _dispatch.use_triton(CPU)


def test_auto_takes_triton_on_cuda_when_triton_imports(env):
    env.setattr(_dispatch, "triton_available", lambda: True)
    assert _dispatch.use_triton(FAKE_CUDA, None)
    assert not _dispatch.use_triton(FAKE_CUDA, CPU)  # mixed devices: the reference
    assert not _dispatch.use_triton(FAKE_CUDA, supported=False)
    env.setattr(_dispatch, "triton_available", lambda: False)
    assert not _dispatch.use_triton(FAKE_CUDA)


def test_environment_variable_forces_torch(env):
    env.setattr(_dispatch, "triton_available", lambda: True)
    env.setenv("PIKV_KERNELS", "torch")
    assert not _dispatch.use_triton(FAKE_CUDA)
    assert _dispatch.use_triton(FAKE_CUDA, backend="auto")  # an explicit argument wins over the variable


def test_forcing_triton(env):
    env.setenv("PIKV_KERNELS", "triton")
    env.setattr(_dispatch, "triton_available", lambda: True)
    assert _dispatch.use_triton(FAKE_CUDA)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _dispatch.use_triton(CPU)
    env.setenv("TRITON_INTERPRET", "1")
    assert _dispatch.use_triton(CPU)
    with pytest.raises(RuntimeError, match="does not handle"):
        _dispatch.use_triton(CPU, supported=False, why_unsupported="axis 0")
    with pytest.raises(RuntimeError, match="one device"):
        _dispatch.use_triton(CPU, FAKE_CUDA)
    env.setattr(_dispatch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"pikv-press\[kernels\]"):
        _dispatch.use_triton(FAKE_CUDA)


def test_bad_backend_names_are_refused(env):
    env.setenv("PIKV_KERNELS", "cuda")
    with pytest.raises(ValueError, match="auto"):
        _dispatch.use_triton(CPU)
    with pytest.raises(ValueError, match="backend="):
        _dispatch.use_triton(CPU, backend="fast")


def test_public_function_obeys_the_variable(env):
    scores, kv = torch.randn(1, 2, 9), torch.randn(1, 2, 9, 4)
    env.setenv("PIKV_KERNELS", "triton")
    if _dispatch.triton_available():
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            select_and_compact(scores, kv, kv, 3)
    env.setenv("PIKV_KERNELS", "torch")
    indices, _, _ = select_and_compact(scores, kv, kv, 3)
    assert indices.shape == (1, 2, 3)


def test_triton_modules_follow_the_interpreter_mode(env):
    pytest.importorskip("triton")
    env.setenv("TRITON_INTERPRET", "1")
    module = _dispatch.triton_module("select_triton")
    assert module.INTERPRETED and type(module._select_kernel).__name__ == "InterpretedFunction"
    env.delenv("TRITON_INTERPRET")
    module = _dispatch.triton_module("select_triton")
    assert not module.INTERPRETED and type(module._select_kernel).__name__ == "JITFunction"
