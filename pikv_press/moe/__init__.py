"""Model anatomy of MoE families: layers, attention, routers, routing and the router tap.

This subpackage is the only place in pikv-press that knows how each model family is laid out.
"""

from pikv_press.moe.anatomy import MoEAnatomy, get_anatomy, language_model_of, set_router_logit_scale
from pikv_press.moe.attention import AttentionLayout
from pikv_press.moe.experts import DENSE_MASKED, use_dense_masked_experts
from pikv_press.moe.families import (
    DENSE_FAMILIES,
    MOE_FAMILIES,
    AttentionKind,
    FamilySpec,
    RouterScoring,
    family_for_config,
    supported_families,
)
from pikv_press.moe.record import ContextRouting, RoutingRecorder
from pikv_press.moe.routing import Routing
from pikv_press.moe.tap import RouterTap, RoutingRecord

__all__ = [
    "AttentionKind",
    "AttentionLayout",
    "ContextRouting",
    "DENSE_FAMILIES",
    "DENSE_MASKED",
    "FamilySpec",
    "MOE_FAMILIES",
    "MoEAnatomy",
    "RouterScoring",
    "RouterTap",
    "Routing",
    "RoutingRecorder",
    "RoutingRecord",
    "family_for_config",
    "get_anatomy",
    "language_model_of",
    "set_router_logit_scale",
    "supported_families",
    "use_dense_masked_experts",
]
