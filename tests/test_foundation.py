"""The foundation: no `kernels` shadowing, family knowledge only in the registry, the routing recorder, layouts known
from the config."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pikv_press
from pikv_press import RoutingRecorder, get_anatomy
from pikv_press.compat import make_views
from pikv_press.moe import MOE_FAMILIES
from pikv_press.testing import MOE_FAMILY_NAMES, VOCAB, build_model
from tests.conftest import get_model

ROOT = Path(__file__).resolve().parents[1]
PROBE = "from transformers.utils.import_utils import is_kernels_available as f; print('kernels available:', f())"


def test_no_top_level_kernels_package_shadows_hugging_face_kernels():
    """transformers probes Hugging Face's `kernels` library; a `kernels` folder on sys.path must not answer."""
    assert not (ROOT / "kernels").exists(), "Triton kernels live in pikv_press/kernels/"
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "site-packages" in str(spec.origin or spec.submodule_search_locations)
    from transformers.utils.import_utils import is_kernels_available

    assert is_kernels_available() in (True, False)  # raised InvalidVersion('N/A') when our folder shadowed it
    import pikv_press.kernels  # noqa: F401  (the kernels are importable under the package)


def test_no_shadowing_in_a_process_started_from_the_repository_root():
    """As `python -m evaluation.evaluate` runs: the current directory (the repository root) first on sys.path."""
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "kernels available:" in result.stdout


def _string_constants(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_family_names_appear_only_in_the_registry():
    """Adding a family is one registry entry: no module outside pikv_press/moe/ tests a family name."""
    names = {name for spec in MOE_FAMILIES for name in (spec.name, *spec.model_types)}
    package = ROOT / "pikv_press"
    offenders = {}
    for path in package.rglob("*.py"):
        if path.is_relative_to(package / "moe") or path.name == "testing.py":  # testing.py builds one model a family
            continue
        found = names & _string_constants(path)
        if found:
            offenders[str(path.relative_to(ROOT))] = sorted(found)
    moe = package / "moe"
    for path in moe.glob("*.py"):
        if path.name != "families.py":
            found = names & _string_constants(path)
            if found:
                offenders[str(path.relative_to(ROOT))] = sorted(found)
    assert not offenders


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_layout_is_known_from_the_config_and_matches_the_rotary_tables(family):
    """The canonical order exists when the layout is built, and the model's rotary tables agree with it."""
    model = get_model(family)
    anatomy = get_anatomy(model)
    rotary = anatomy.language_model.rotary_emb
    for view in make_views(anatomy).values():
        layout = view.layout
        assert sorted(layout.order.tolist()) == list(range(layout.qk_dim))
        x = torch.zeros(1, 3, model.config.hidden_size)
        cos, sin = layout.rope_angles(rotary(x, torch.arange(3)[None]))  # raises if the tables disagree
        assert cos.shape[-1] == layout.rope_pairs > 0


@pytest.mark.parametrize("family", MOE_FAMILY_NAMES)
def test_routing_recorder_equals_the_router_and_stays_on_device(family):
    """Ids and weights the MoE blocks dispatched (sets per token), scores normalised, nothing left behind."""
    model = get_model(family)
    anatomy = get_anatomy(model)
    ids = torch.randint(5, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    inputs = {}
    handles = [anatomy.moe_block(i).register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
               for i in anatomy.moe_layers]
    with torch.no_grad():
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    with torch.no_grad(), RoutingRecorder(model, scores=True) as recorder:
        model(input_ids=ids)
        model(input_ids=ids[:, :2])  # a second pass appends
    hooks = [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
             if "output_capturing" not in getattr(h, "__qualname__", "")]
    assert not hooks
    for layer in anatomy.moe_layers:
        record = recorder.routing(layer)
        expected = anatomy.route(layer, inputs[layer])
        assert record.num_tokens == 14
        assert torch.equal(record.topk_ids[:12].sort(-1).values, expected.topk_ids.sort(-1).values)
        weights_by_id = torch.zeros(12, anatomy.num_experts).scatter(1, expected.topk_ids, expected.topk_weights)
        torch.testing.assert_close(record.topk_weights[:12], weights_by_id.gather(1, record.topk_ids[:12]))
        assert torch.all(record.topk_weights[:, :-1] >= record.topk_weights[:, 1:])
        torch.testing.assert_close(record.scores.sum(-1), torch.ones(14))
        assert record.topk_ids.device == inputs[layer].device


def test_routing_recorder_bounds_memory_and_checks_arguments():
    model = get_model("mixtral")
    with torch.no_grad(), RoutingRecorder(model, max_tokens=5) as recorder:
        model(input_ids=torch.randint(5, VOCAB, (1, 8)))
        model(input_ids=torch.randint(5, VOCAB, (1, 3)))
    assert recorder.routing(0).num_tokens == 5
    assert recorder.routing(0).scores is None
    with pytest.raises(ValueError, match="MoE model"):
        RoutingRecorder(get_model("llama"))
    with pytest.raises(ValueError, match="max_tokens"):
        RoutingRecorder(model, max_tokens=0)
    empty = RoutingRecorder(model)
    with pytest.raises(ValueError, match="Nothing recorded"):
        empty.routing(0)


def test_public_api_holds_what_users_need_and_no_internals():
    for name in ("MoEAware", "kvpress_moe_support", "get_anatomy", "make_cache", "cache_nbytes", "RoutingRecorder"):
        assert name in pikv_press.__all__
    for name in ("AttentionLayout", "check_press_supported", "view_attention_errors", "AttentionView"):
        assert name not in pikv_press.__all__


def test_sliding_layers_and_dense_layers_come_from_the_config():
    model = build_model("gpt_oss")
    anatomy = get_anatomy(model)
    assert anatomy.sliding_layers == (0,) and anatomy.compressible_layers == (1, 2)
