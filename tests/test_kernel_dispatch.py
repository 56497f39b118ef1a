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


def test_auto_keeps_the_reference_for_kernels_measured_slower_on_a_gpu(env):
    env.setattr(_dispatch, "triton_available", lambda: True)
    assert not _dispatch.use_triton(FAKE_CUDA, faster_on_gpu=False)
    assert _dispatch.use_triton(FAKE_CUDA, backend="triton", faster_on_gpu=False)  # forcing still runs the kernel


def test_which_kernels_auto_takes(env):
    """The H200 measurement (measurements/kernel_benchmark/kernel_benchmark_h200.jsonl): partial attention, quantize
    and quantized attention faster than torch; select, latent attention and routing features slower."""
    from pikv_press.kernels import (
        latent_attention,
        lowbit,
        lowbit_attention,
        routing_features,
        select,
        sharded_attention,
    )

    seen = {}

    def spy(name):
        def use_triton(*tensors, faster_on_gpu=True, **kwargs):
            seen[name] = faster_on_gpu
            return False
        return use_triton

    for name, module in [("select", select), ("latent", latent_attention), ("routing", routing_features),
                         ("partial", sharded_attention), ("quantize", lowbit), ("quantized", lowbit_attention)]:
        env.setattr(module, "use_triton", spy(name))
    select.select_and_compact(torch.randn(1, 2, 8), torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 3)
    latent_attention.latent_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 4), torch.randn(1, 1, 5, 8),
                                      torch.randn(1, 5, 4), 0.3)
    routing_features.routing_features(torch.randint(0, 4, (1, 6, 2)), 4)
    sharded_attention.partial_attention(torch.randn(1, 2, 1, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8), 0.3)
    packed = lowbit.quantize(torch.randn(1, 1, 8, 8), 4, 8, -2)
    vpacked = lowbit.quantize(torch.randn(1, 1, 8, 8), 4, 8, -1)
    lowbit_attention.quantized_attention(torch.randn(1, 2, 1, 8), *packed, *vpacked, bits=4, key_group_size=8,
                                         value_group_size=8, scaling=0.3)
    assert seen == {"select": False, "latent": False, "routing": False, "partial": True, "quantize": True,
                    "quantized": True}


def test_true_divide_is_ieee_division():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    expected = torch.from_numpy(x.numpy() / torch.tensor(3.0).numpy())  # numpy: correctly rounded float32 division
    assert torch.equal(_dispatch.true_divide(x, 3), expected)
