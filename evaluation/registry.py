"""Registries of the evaluation harness, shaped like kvpress's ``evaluation/evaluate_registry.py``.

* Presses: every kvpress press (names as in kvpress) and every pikv-press press. Entries are factories, so each run
  gets a fresh press (presses keep state between calls). :func:`make_press` builds one and sets its ratios;
  :func:`press_for_run` is the one function through which the harness, the demo and the scripts build a run's press.
* Datasets and scorers: one benchmark per folder of :mod:`evaluation.benchmarks`, each with ``load_samples``,
  ``calculate_metrics`` (kvpress's per-task metrics), ``sample_scores`` (0-100 per sample, for intervals) and
  ``match_mode`` (how teacher-forced scoring treats several references). :data:`DATASET_REGISTRY` and
  :data:`SCORER_REGISTRY` are kvpress's two views of :data:`BENCHMARKS`.
* Press tables shared by the demo, the scripts and the tests: :data:`BASELINE_PRESSES`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType

import kvpress as kp
from kvpress import BasePress

import pikv_press
from evaluation.benchmarks import longbench, needle_in_haystack, ruler
from pikv_press import presses as pikv_presses

# name -> factory, every press of kvpress 0.5.5's evaluation registry (kvsummary, kvsquared and the
# ThresholdPress-based kvzap entries need presses that kvpress 0.5.5 does not have). Presses that need downloads
# (QFilter and KVzap checkpoints, DuoAttention's head patterns or its on-the-fly calibration set) fail offline with
# their own error; they stay listed for online use. How the run's ratio reaches each press: see make_press.
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
    "kvzap_mlp_head": lambda: kp.KVzapPress(model_type="mlp"),
    "kvzap_mlp_layer": lambda: kp.AdaKVPress(kp.KVzapPress(model_type="mlp")),
    "think": kp.ThinKPress,
    "snap_think": lambda: kp.ComposedPress([kp.SnapKVPress(), kp.ThinKPress()]),
    "duo_attention": kp.DuoAttentionPress,
    "duo_attention_on_the_fly": lambda: kp.DuoAttentionPress(on_the_fly_scoring=True),
    "decoding_knorm": lambda: kp.DecodingPress(base_press=kp.KnormPress()),
    "decoding_streaming_llm": lambda: kp.DecodingPress(base_press=kp.StreamingLLMPress()),
    "decoding_tova": lambda: kp.DecodingPress(base_press=kp.TOVAPress()),
    "decoding_qfilter": lambda: kp.DecodingPress(base_press=kp.QFilterPress()),
    "decoding_keydiff": lambda: kp.DecodingPress(base_press=kp.KeyDiffPress()),
    "decoding_adakv_expected_attention_e2": lambda: kp.DecodingPress(
        base_press=kp.AdaKVPress(kp.ExpectedAttentionPress(epsilon=1e-2))
    ),
    "decoding_adakv_snapkv": lambda: kp.DecodingPress(base_press=kp.AdaKVPress(kp.SnapKVPress())),
}

# pikv-press's own presses (the demo runs every one of them). Routing features on TOVA: see
# evaluation/routing_ablation.py for how they were chosen and measured.
PIKV_REGISTRY: dict[str, Callable[[], BasePress | None]] = {
    "pikv": pikv_presses.PiKVPress,
    "expert_balanced_tova": lambda: pikv_presses.ExpertBalancedPress(press=kp.TOVAPress()),
    "router_affinity_tova": lambda: pikv_presses.RouterAffinityPress(press=kp.TOVAPress()),
    "routing_novelty_tova": lambda: pikv_presses.RoutingNoveltyPress(press=kp.TOVAPress()),
    "layer_budget_tova": lambda: pikv_presses.RoutingLayerBudgetPress(press=kp.TOVAPress()),
    # KVzip's scores from a linear surrogate (KVzap recipe) and KVzip's allocation; the surrogate shipped for the model
    "kvzip_surrogate": pikv_presses.KVzipSurrogatePress,
}

# Variants for ablations (not in the demo): routing predicted from the attention input, features alone.
PIKV_ABLATION_REGISTRY: dict[str, Callable[[], BasePress | None]] = {
    "expert_balanced_tova_predicted": lambda: pikv_presses.ExpertBalancedPress(press=kp.TOVAPress(),
                                                                               routing="predicted"),
    "expert_balanced_tova_top4": lambda: pikv_presses.ExpertBalancedPress(press=kp.TOVAPress(), experts_per_token=4),
    "expert_balanced_knorm": lambda: pikv_presses.ExpertBalancedPress(press=kp.KnormPress()),
    "expert_balanced_streaming_llm": lambda: pikv_presses.ExpertBalancedPress(press=kp.StreamingLLMPress()),
    "router_affinity": pikv_presses.RouterAffinityPress,
    "routing_novelty": pikv_presses.RoutingNoveltyPress,
    # the KVzip surrogate with the same share in every head (evicted rows freed)
    "kvzip_surrogate_head": lambda: pikv_presses.KVzipSurrogatePress(allocation="head"),
    # the global ranking's share per layer, the same share in each of its heads (evicted rows freed)
    "kvzip_surrogate_layer": lambda: pikv_presses.KVzipSurrogatePress(allocation="layer"),
    # AdaKV's head-wise budgets over the surrogate's predicted log KVzip scores (comparable across heads)
    "adakv_kvzip_surrogate": lambda: pikv_press.MoEAware(kp.AdaKVPress(pikv_presses.KVzipSurrogatePress())),
    # the routing-novelty feature on AdaKVExpectedAttentionPress's composition: AdaKV's head-wise budgets over
    # novelty x ExpectedAttention
    "routing_novelty_expected_attention": lambda: pikv_press.MoEAware(kp.AdaKVPress(
        pikv_presses.RoutingNoveltyPress(press=kp.ExpectedAttentionPress(epsilon=1e-2)))),
}

PRESS_REGISTRY: dict[str, Callable[[], BasePress | None]] = {**KVPRESS_REGISTRY, **PIKV_REGISTRY,
                                                             **PIKV_ABLATION_REGISTRY}

# The baselines that ``make demo``, the scripts and the tests compare (the kvpress leaderboard's usual set).
BASELINE_PRESSES = ("knorm", "snapkv", "streaming_llm", "expected_attention", "tova", "keydiff", "pyramidkv")

# name -> benchmark module (load_samples, calculate_metrics, sample_scores, match_mode); see evaluation.benchmarks.
BENCHMARKS: dict[str, ModuleType] = {
    "ruler": ruler,
    "needle_in_haystack": needle_in_haystack,
    "longbench": longbench,
}
DATASET_REGISTRY: dict[str, Callable] = {name: module.load_samples for name, module in BENCHMARKS.items()}
SCORER_REGISTRY: dict[str, Callable] = {name: module.calculate_metrics for name, module in BENCHMARKS.items()}


def benchmark(name: str) -> ModuleType:
    """The benchmark module registered as ``name``; ``ValueError`` listing the names otherwise."""
    if name not in BENCHMARKS:
        raise ValueError(f"Unknown dataset {name!r}; choose from {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]


DECODING_OPTIONS = ("target_size", "compression_interval", "hidden_states_buffer_size")


@functools.cache
def _kind(name: str) -> type | None:
    """The class of the press named ``name`` (built once: some constructors log warnings), ``None`` for no_press."""
    press = PRESS_REGISTRY[name]()
    return None if press is None else type(press)


def is_decoding_press(name: str) -> bool:
    """Whether the press named ``name`` compresses while decoding (``decoding_*``, CAM); it takes DECODING_OPTIONS."""
    return name in PRESS_REGISTRY and _kind(name) is not None and issubclass(_kind(name), kp.DecodingPress)


def takes_compression_ratio(name: str) -> bool:
    """Whether the press named ``name`` uses the run's compression ratio (``no_press``, ThinK alone and decoding
    presses do not; see :func:`make_press`)."""
    if name not in PRESS_REGISTRY:
        raise ValueError(f"Unknown press {name!r}. Known presses: {', '.join(sorted(PRESS_REGISTRY))}.")
    kind = _kind(name)
    return kind is not None and not issubclass(kind, (kp.DecodingPress, kp.ThinKPress))


def press_for_run(name: str, compression_ratio: float, **options) -> BasePress | None:
    """The press of one run: :func:`make_press` with the sweep's ratio (dropped for presses that take none: they run
    once, under ratio 0), kvpress's presses made MoE-aware with ``pikv_press.MoEAware`` where pikv-press has it.

    Every press a harness command runs is built here."""
    press = make_press(name, compression_ratio if takes_compression_ratio(name) else None, **options)
    moe_aware = getattr(pikv_press, "MoEAware", None)
    if press is not None and moe_aware is not None and name in KVPRESS_REGISTRY:
        press = moe_aware(press)
    return press


def make_press(
    name: str,
    compression_ratio: float | None = None,
    *,
    key_channel_compression_ratio: float | None = None,
    **decoding_options: int | None,
) -> BasePress | None:
    """A fresh press from the registry, configured as kvpress's ``evaluate.py`` does (``None`` for ``no_press``).

    * ``compression_ratio`` (the fraction of the cache removed, in [0, 1)) goes to ``compression_ratio``; for
      DuoAttention to ``head_compression_ratio`` (the share of heads turned into streaming heads); for each member of
      a ComposedPress to that member.
    * ThinK prunes key channels, not tokens: it takes ``key_channel_compression_ratio`` (required, in [0, 1)).
    * Decoding presses (``decoding_*``) compress every ``compression_interval`` decoding steps down to
      ``target_size`` tokens (``decoding_options``: ``target_size``, ``compression_interval``,
      ``hidden_states_buffer_size``; kvpress's defaults where ``None``); they take no compression ratio, and one
      other than 0 raises instead of being ignored.
    """
    if name not in PRESS_REGISTRY:
        raise ValueError(f"Unknown press {name!r}. Known presses: {', '.join(sorted(PRESS_REGISTRY))}.")
    unknown = set(decoding_options) - set(DECODING_OPTIONS)
    if unknown:
        raise TypeError(f"unknown press options {sorted(unknown)}; decoding presses take {DECODING_OPTIONS}")
    for label, ratio in (("compression_ratio", compression_ratio),
                         ("key_channel_compression_ratio", key_channel_compression_ratio)):
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise ValueError(f"{label} must be in [0, 1) (the fraction of the cache removed), got {ratio}.")
    press = PRESS_REGISTRY[name]()
    if press is None:
        return None
    if isinstance(press, kp.DecodingPress):
        if compression_ratio:
            raise ValueError(
                f"{name} compresses while decoding, down to target_size tokens every compression_interval steps; it "
                f"takes no compression_ratio (got {compression_ratio}): set --target_size / --compression_interval."
            )
        for option, value in decoding_options.items():
            if value is not None:
                setattr(press, option, int(value))
        return press
    for member in press.presses if isinstance(press, kp.ComposedPress) else [press]:
        if isinstance(member, kp.ThinKPress):
            if key_channel_compression_ratio is None:
                raise ValueError(f"{name} prunes key channels: give key_channel_compression_ratio (kvpress's "
                                 "--key_channel_compression_ratio).")
            member.key_channel_compression_ratio = key_channel_compression_ratio
        elif compression_ratio is None:
            continue
        elif isinstance(member, kp.DuoAttentionPress):
            member.head_compression_ratio = compression_ratio
        else:
            member.compression_ratio = compression_ratio
    return press
