"""The press registry: every kvpress evaluation press, and how a run's ratios reach each kind of press."""

from __future__ import annotations

import kvpress as kp
import pytest

from evaluation.registry import PRESS_REGISTRY, make_press, takes_compression_ratio


def members(press):
    """The presses a run's ratios are given to: the members of a ComposedPress, else the press itself."""
    return list(press.presses) if isinstance(press, kp.ComposedPress) else [press]


@pytest.mark.parametrize("name", sorted(n for n in PRESS_REGISTRY if takes_compression_ratio(n)))
def test_every_press_gets_its_ratio(name):  # the others (no_press, ThinK, decoding presses) are checked below
    press = make_press(name, 0.375, key_channel_compression_ratio=0.25)
    for leaf in members(press):
        if isinstance(leaf, kp.ThinKPress):
            assert leaf.key_channel_compression_ratio == 0.25
        elif isinstance(leaf, kp.DuoAttentionPress):
            assert leaf.head_compression_ratio == 0.375
        else:
            assert leaf.compression_ratio == pytest.approx(0.375), type(leaf).__name__
    assert make_press(name, 0.375, key_channel_compression_ratio=0.25) is not press  # fresh each time


def test_kvpress_evaluation_presses_are_all_there():
    # kvpress's evaluate_registry.py, minus the entries built on presses kvpress 0.5.5 does not ship
    # (KVSummaryPress, KVSquaredPress, ThresholdPress)
    expected = {
        "adakv_snapkv", "block_keydiff", "chunkkv", "critical_adakv_expected_attention", "critical_adakv_snapkv",
        "critical_expected_attention", "critical_snapkv", "cur", "duo_attention", "duo_attention_on_the_fly",
        "expected_attention", "finch", "keydiff", "kvzip", "kvzip_plus", "kvzap_mlp_head", "kvzap_mlp_layer", "lagkv",
        "knorm", "observed_attention", "pyramidkv", "qfilter", "random", "snap_think", "snapkv", "streaming_llm",
        "think", "tova", "compactor", "adakv_compactor", "no_press", "decoding_knorm", "decoding_streaming_llm",
        "decoding_tova", "decoding_qfilter", "decoding_adakv_expected_attention_e2", "decoding_adakv_snapkv",
        "decoding_keydiff",
    }
    assert expected <= set(PRESS_REGISTRY)
    for missing in ("KVSummaryPress", "KVSquaredPress", "ThresholdPress"):
        assert not hasattr(kp, missing)  # when kvpress ships them, add the entries


def test_think_takes_the_key_channel_ratio():
    assert not takes_compression_ratio("think") and takes_compression_ratio("snap_think")
    with pytest.raises(ValueError, match="key_channel_compression_ratio"):
        make_press("think")
    assert make_press("think", key_channel_compression_ratio=0.5).key_channel_compression_ratio == 0.5
    snap, think = make_press("snap_think", 0.25, key_channel_compression_ratio=0.5).presses
    assert snap.compression_ratio == 0.25 and think.key_channel_compression_ratio == 0.5
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_press("think", key_channel_compression_ratio=1.0)


def test_decoding_presses_take_target_size_not_a_ratio():
    assert not takes_compression_ratio("decoding_knorm") and not takes_compression_ratio("cam_knorm")
    with pytest.raises(ValueError, match="target_size"):
        make_press("decoding_knorm", 0.5)  # would otherwise be silently ignored
    press = make_press("decoding_tova", 0.0, target_size=64, compression_interval=8, hidden_states_buffer_size=0)
    assert (press.target_size, press.compression_interval, press.hidden_states_buffer_size) == (64, 8, 0)
    assert make_press("decoding_tova").target_size == kp.DecodingPress(kp.TOVAPress()).target_size  # kvpress default
    with pytest.raises(TypeError, match="unknown press options"):
        make_press("knorm", 0.5, target_sise=3)


def test_bad_names_and_ratios():
    with pytest.raises(ValueError, match="Unknown press"):
        make_press("snapkvv")
    with pytest.raises(ValueError, match="Unknown press"):
        takes_compression_ratio("snapkvv")
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        make_press("knorm", 1.0)
    assert make_press("no_press", 0.5) is None and not takes_compression_ratio("no_press")


def test_dataset_and_scorer_registries():
    from evaluation.registry import BENCHMARKS, DATASET_REGISTRY, SCORER_REGISTRY, benchmark

    assert set(DATASET_REGISTRY) == set(SCORER_REGISTRY) == set(BENCHMARKS) == {"ruler", "needle_in_haystack",
                                                                                   "longbench"}
    assert benchmark("ruler").match_mode("qa_1") == "any" and benchmark("ruler").match_mode("niah_multivalue") == "all"
    with pytest.raises(ValueError, match="Unknown dataset 'rulr'; choose from ruler"):
        benchmark("rulr")


def test_press_for_run_makes_kvpress_presses_moe_aware(monkeypatch):
    """Every press of a run is built by press_for_run; kvpress's presses are wrapped when pikv_press has MoEAware."""
    import pikv_press
    from evaluation import registry

    class Wrapped:
        def __init__(self, press):
            self.press = press

    monkeypatch.setattr(pikv_press, "MoEAware", Wrapped, raising=False)
    press = registry.press_for_run("snapkv", 0.25)
    assert isinstance(press, Wrapped) and press.press.compression_ratio == 0.25
    assert registry.press_for_run("no_press", 0.25) is None
    think = registry.press_for_run("think", 0.25, key_channel_compression_ratio=0.5).press
    assert think.key_channel_compression_ratio == 0.5  # ThinK takes no token ratio: the sweep's is dropped
