"""Shared fixtures: tiny random models of every family, built once per session, and the tiny tokenizer."""

from __future__ import annotations

import logging
import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
