"""Press registry of the evaluation harness: every kvpress press (names as in kvpress's ``evaluate_registry.py``)
and every pikv-press press.

Entries are factories, so each run gets a fresh press (presses keep state between calls). :func:`make_press` builds
one and sets its compression ratio.
"""

from __future__ import annotations

from collections.abc import Callable

import kvpress as kp
from kvpress import BasePress

# name -> factory. Presses that need downloads (QFilter checkpoints from the hub) fail offline with their own error;
# they stay listed for online use. ThinK and DuoAttention compress channels / heads rather than a share of tokens and
# take no compression_ratio: they are not in this token-ratio sweep registry.
KVPRESS_REGISTRY: dict[str, Callable[[], BasePress | None]] = {
    "no_press": lambda: None,
    "knorm": kp.KnormPress,
    "snapkv": kp.SnapKVPress,
    "streaming_llm": kp.StreamingLLMPress,
    "expected_attention": lambda: kp.AdaKVPress(kp.ExpectedAttentionPress(epsilon=1e-2)),
    "expected_attention_no_adakv": kp.ExpectedAttentionPress,
    "tova": kp.TOVAPress,
    "keydiff": kp.KeyDiffPress,
    "pyramidkv": kp.PyramidKVPress,
    "random": kp.RandomPress,
    "observed_attention": kp.ObservedAttentionPress,
    "lagkv": kp.LagKVPress,
    "adakv_snapkv": lambda: kp.AdaKVPress(kp.SnapKVPress()),
    "block_keydiff": lambda: kp.BlockPress(press=kp.KeyDiffPress(), block_size=128),
    "chunkkv": lambda: kp.ChunkKVPress(press=kp.SnapKVPress(), chunk_length=20),
    "critical_snapkv": lambda: kp.CriticalKVPress(kp.SnapKVPress()),
    "critical_expected_attention": lambda: kp.CriticalKVPress(kp.ExpectedAttentionPress(use_vnorm=False)),
    "critical_adakv_snapkv": lambda: kp.CriticalAdaKVPress(kp.SnapKVPress()),
    "critical_adakv_expected_attention": lambda: kp.CriticalAdaKVPress(kp.ExpectedAttentionPress(use_vnorm=False)),
    "cur": kp.CURPress,
    "compactor": kp.CompactorPress,
    "adakv_compactor": lambda: kp.AdaKVPress(kp.CompactorPress()),
    "lukv": lambda: kp.LUKVPress(kp.ExpectedAttentionPress(epsilon=2e-2), sink=4, window=1),
    "finch": kp.FinchPress,
    "kvzip": kp.KVzipPress,
    "kvzip_plus": lambda: kp.KVzipPress(kvzip_plus_normalization=True),
    "fastkvzip": kp.FastKVzipPress,
    "kvcompose": kp.KVComposePress,
    "qfilter": kp.QFilterPress,
    "cam_knorm": lambda: kp.CAMPress(base_press=kp.KnormPress()),
    "cam_streaming_llm": lambda: kp.CAMPress(base_press=kp.StreamingLLMPress()),
    "decoding_knorm": lambda: kp.DecodingPress(base_press=kp.KnormPress()),
    "decoding_streaming_llm": lambda: kp.DecodingPress(base_press=kp.StreamingLLMPress()),
}

# pikv-press's own presses (routing-aware presses and PiKVPress land here with their issue).
PIKV_REGISTRY: dict[str, Callable[[], BasePress | None]] = {}

PRESS_REGISTRY: dict[str, Callable[[], BasePress | None]] = {**KVPRESS_REGISTRY, **PIKV_REGISTRY}

# The baselines ``make demo`` compares (the kvpress leaderboard's usual set).
DEMO_PRESSES = ("knorm", "snapkv", "streaming_llm", "expected_attention", "tova", "keydiff", "pyramidkv")


def make_press(name: str, compression_ratio: float | None = None) -> BasePress | None:
    """A fresh press from the registry, with ``compression_ratio`` set (``None`` for ``no_press``)."""
    if name not in PRESS_REGISTRY:
        raise ValueError(f"Unknown press {name!r}. Known presses: {', '.join(sorted(PRESS_REGISTRY))}.")
    press = PRESS_REGISTRY[name]()
    if press is None:
        return None
    if compression_ratio is not None:
        if not 0.0 <= compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1) (the fraction of the cache removed), got "
                             f"{compression_ratio}.")
        press.compression_ratio = compression_ratio
    return press
