"""Shared fixtures: tiny random models of every family, built once per session, and the tiny tokenizer."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton interpreter must be on before triton is first imported (importing pikv_press imports it; triton.language
# decorates its own helpers then): the kernel tests run the Triton kernels on CPU tensors through it. Nothing else
# changes: under PIKV_KERNELS=auto, CPU tensors take the torch reference. TRITON_INTERPRET=0 keeps compiled kernels
# (the kernel tests then run on a CUDA device, or skip).
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import pikv_press  # noqa: E402,F401  (registers kvpress's pipeline; changes nothing in kvpress)
from pikv_press.testing import MOE_FAMILY_NAMES, build_model, build_tokenizer  # noqa: E402

# Tiny models gain nothing from intra-op threads, and threads spinning against other work cost up to 30x.
torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*not tested, supported models.*")
logging.getLogger("kvpress").setLevel(logging.ERROR)

_MODELS: dict = {}


def get_model(family: str, attn_implementation: str | None = None):
    """A cached tiny model (do not modify its weights in a test)."""
    key = (family, attn_implementation)
    if key not in _MODELS:
        _MODELS[key] = build_model(family, attn_implementation=attn_implementation)
    return _MODELS[key]


def press_hooks(model) -> list:
    """The forward hooks and pre-hooks on every module of ``model`` (transformers' own output capturing aside)."""
    return [hook for module in model.modules()
            for hook in (*module._forward_hooks.values(), *module._forward_pre_hooks.values())
            if "output_capturing" not in getattr(hook, "__qualname__", "")]


@pytest.fixture(params=MOE_FAMILY_NAMES)
def family(request) -> str:
    return request.param


@pytest.fixture
def model(family):
    return get_model(family)


@pytest.fixture
def eager_model(family):
    return get_model(family, "eager")


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()
