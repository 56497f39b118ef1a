"""Caches by name, for the replay, the harness and the benchmark (``--cache dynamic|quantized-int4|...``).

>>> cache = make_cache("quantized-int4", model.config)

Names: ``dynamic`` (transformers' ``DynamicCache``), ``quantized-int4`` / ``quantized-int2`` (transformers'
``QuantizedCache``, quanto backend, per-channel keys and values, 128 full-precision residual tokens) and
``quantized-hqq-int4`` / ``quantized-hqq-int8`` (HQQ backend); ``packed-int8`` / ``packed-int4`` / ``packed-int2``
(pikv-press's KIVI-style :class:`~pikv_press.cache.packed.PackedKVCache`: keys per channel and values per token in
groups of 32, 32 full-precision recent tokens); ``lowrank-k50`` / ``lowrank-k25`` (pikv-press's
:class:`~pikv_press.cache.lowrank.LowRankKeyCache`: keys stored on their top singular directions, at 50% / 25% of
their width). Later caches of pikv-press register theirs with
:func:`register_cache`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

from transformers import Cache, DynamicCache, PretrainedConfig, QuantizedCache

CacheFactory = Callable[[PretrainedConfig], Cache]

_BACKEND_PACKAGES = {"quanto": ("optimum.quanto", "optimum-quanto"), "hqq": ("hqq", "hqq")}


def _quantized(backend: str, nbits: int, residual_length: int = 128, q_group_size: int = 64) -> CacheFactory:
    def factory(config: PretrainedConfig) -> Cache:
        module, package = _BACKEND_PACKAGES[backend]
        if importlib.util.find_spec(module.split(".")[0]) is None or importlib.util.find_spec(module) is None:
            raise ValueError(f"The {backend} quantized cache needs `pip install {package}`.")
        return QuantizedCache(backend=backend, config=config, nbits=nbits, residual_length=residual_length,
                              q_group_size=q_group_size)

    return factory


def _packed(bits: int) -> CacheFactory:
    def factory(config: PretrainedConfig) -> Cache:
        from pikv_press.cache.packed import packed_cache_factory

        return packed_cache_factory(bits, group_size=32, residual_length=32)(config)

    return factory


def _lowrank(key_budget: float) -> CacheFactory:
    def factory(config: PretrainedConfig) -> Cache:
        from pikv_press.cache.lowrank import LowRankKeyCache

        return LowRankKeyCache(key_budget=key_budget, config=config)

    return factory


CACHES: dict[str, CacheFactory] = {
    "dynamic": lambda config: DynamicCache(),
    "quantized-int4": _quantized("quanto", 4),
    "quantized-int2": _quantized("quanto", 2),
    "quantized-hqq-int4": _quantized("hqq", 4),
    "quantized-hqq-int8": _quantized("hqq", 8),
    "packed-int8": _packed(8),
    "packed-int4": _packed(4),
    "packed-int2": _packed(2),
    "lowrank-k50": _lowrank(0.5),
    "lowrank-k25": _lowrank(0.25),
}


def register_cache(name: str, factory: CacheFactory) -> None:
    """Make ``make_cache(name, config)`` return ``factory(config)``."""
    CACHES[name] = factory


def make_cache(name: str, config: PretrainedConfig | None = None) -> Cache:
    """A new empty cache of kind ``name`` for a model with ``config``; ``ValueError`` listing the names otherwise."""
    factory = CACHES.get(name)
    if factory is None:
        raise ValueError(f"Unknown cache {name!r}; choose from {', '.join(CACHES)}.")
    if config is None and name != "dynamic":
        raise ValueError(f"The {name} cache needs the model's config: make_cache({name!r}, model.config).")
    return factory(config)
