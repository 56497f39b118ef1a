"""The registry of model families: the one place that knows each family's anatomy.

A family is identified by ``config.model_type`` (never by ``isinstance`` on a model class). For each MoE family the
spec records where the MoE block and its router live in a decoder layer, which layers are dense, how many experts
there are and how many are routed per token, the shared experts, and how the router forms its probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from transformers import PretrainedConfig


class RouterScoring(str, Enum):
    """How a family turns router logits into expert probabilities and routing weights."""

    SOFTMAX = "softmax"
    """Softmax over all experts; top-k of the probabilities, renormalised over the top-k if ``norm_topk_prob``."""
    SOFTMAX_TOPK = "softmax_topk"
    """Top-k of the raw logits, softmax over the selected logits only (GPT-OSS, Granite-MoE)."""
    SOFTMAX_GROUPED = "softmax_grouped"
    """Softmax over all experts, optional group-limited greedy top-k, weights times ``routed_scaling_factor``
    (DeepSeek-V2)."""
    SIGMOID_GROUPED = "sigmoid_grouped"
    """Sigmoid scores; top-k chosen on scores plus ``e_score_correction_bias`` within the top groups; weights are the
    uncorrected sigmoids, normalised over the top-k if ``norm_topk_prob``, times ``routed_scaling_factor``
    (DeepSeek-V3, GLM-4-MoE)."""
    SPARSEMIXER = "sparsemixer"
    """PhiMoE's SparseMixer: top-2 chosen sequentially with a jitter-based mask, weights from masked softmaxes."""


class RouterOutput(str, Enum):
    """What a family's router module returns when called (transformers 5.x), so routing can be read off it."""

    PROBS_WEIGHTS_IDS = "probs_weights_ids"
    """``(probabilities over all experts, top-k weights, top-k ids)`` (Qwen2/3-MoE, Mixtral, OLMoE TopKRouter); a
    plain ``nn.Linear`` gate of transformers 4.x returns logits instead and is handled too."""
    LOGITS_WEIGHTS_IDS = "logits_weights_ids"
    """``(logits, top-k weights, top-k ids)`` (GPT-OSS, PhiMoE)."""
    DISPATCH_LOGITS_LAST = "dispatch_logits_last"
    """Sorted dispatch tensors with the logits last; the top-k is recomputed from the logits (Granite-MoE)."""
    LOGITS = "logits"
    """Logits only; the MoE block's ``route_tokens_to_experts`` selects experts (DeepSeek-V3, GLM-4-MoE)."""
    LINEAR_WEIGHT = "linear_weight"
    """The router is applied as ``x @ weight.T`` in float32, then ``route_tokens_to_experts`` (DeepSeek-V2)."""


class RopeStyle(str, Enum):
    """How a family rotates query/key pairs (what the canonical layout must undo)."""

    HALVES = "halves"
    """Pairs ``(j, j + rotary_dim / 2)`` over the first ``rotary_dim`` dims of the RoPE slice (Llama)."""
    INTERLEAVED_CONFIG = "interleaved_config"
    """As HALVES after de-interleaving the RoPE slice when ``config.rope_interleave`` is set (DeepSeek-V3)."""
    COMPLEX = "complex"
    """Complex ``freqs_cis`` instead of ``(cos, sin)``; adjacent pairs ``(2j, 2j + 1)`` (DeepSeek-V2)."""


class AttentionKind(str, Enum):
    """How a family's attention module forms queries and keys (what a press must reproduce to score)."""

    LLAMA = "llama"
    """``q_proj``/``k_proj`` then RoPE over the whole head (or its first ``rotary_dim`` dims)."""
    QK_NORM_HEAD = "qk_norm_head"
    """As LLAMA, with an RMSNorm over ``head_dim`` applied per head before RoPE (Qwen3-MoE, GLM-4-MoE if
    ``use_qk_norm``)."""
    QK_NORM_FULL = "qk_norm_full"
    """As LLAMA, with an RMSNorm over the whole projection (all heads) before the reshape (OLMoE)."""
    HALF_ROPE = "half_rope"
    """As LLAMA but the rotary tables have ``head_dim / 2`` entries and attention has per-head sinks (GPT-OSS)."""
    MLA = "mla"
    """Multi-head latent attention: low-rank queries, keys = [no-RoPE part, shared RoPE part], values narrower than
    keys (DeepSeek-V2/V3)."""


@dataclass(frozen=True)
class FamilySpec:
    """What pikv-press knows about one model family."""

    name: str
    model_types: tuple[str, ...]
    attention: AttentionKind
    moe_attr: str | None = "mlp"
    """Attribute of a decoder layer holding the MoE block (``None``: dense family)."""
    router_attr: str | None = "gate"
    """Attribute of the MoE block holding the router."""
    scoring: RouterScoring | None = None
    num_experts_key: str = "num_experts"
    top_k_key: str = "num_experts_per_tok"
    is_moe_layer: Callable[[PretrainedConfig, int], bool] | None = None
    """Which decoder layers carry an MoE block, from the config alone."""
    shared_expert_size: Callable[[PretrainedConfig], int] | None = None
    """Number of FFN neurons of the always-on shared expert(s) of an MoE layer (0 when there is none)."""
    shared_expert_gated: bool = False
    """Whether the shared expert output is scaled by a learned sigmoid gate (Qwen2-MoE) rather than added as is."""
    router_output: RouterOutput = RouterOutput.PROBS_WEIGHTS_IDS
    """What the router module returns (see :class:`RouterOutput`)."""
    renormalize_topk: bool | None = None
    """Whether top-k weights are renormalised to sum to one for a plain-logits gate: ``True``/``False``, or ``None``
    to read ``config.norm_topk_prob`` (Mixtral always renormalises)."""
    rope_style: RopeStyle = RopeStyle.HALVES
    """How RoPE pairs dimensions (see :class:`RopeStyle`)."""
    sinks_attr: str | None = None
    """Attribute of the attention module holding per-head attention-sink logits (GPT-OSS ``sinks``)."""
    eager_only: bool = False
    """Whether this transformers version runs the family with eager attention only (GPT-OSS)."""

    @property
    def is_moe(self) -> bool:
        return self.moe_attr is not None


def _every_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    return True


def _qwen_sparse_step(config: PretrainedConfig, layer_idx: int) -> bool:
    # Qwen2-MoE / Qwen3-MoE: `mlp_only_layers` are dense, others are sparse every `decoder_sparse_step` layers.
    mlp_only = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return layer_idx not in mlp_only and config.num_experts > 0 and (layer_idx + 1) % step == 0


def _first_k_dense(config: PretrainedConfig, layer_idx: int) -> bool:
    # DeepSeek-V2/V3, GLM-4-MoE: the first `first_k_dense_replace` layers are dense.
    return layer_idx >= (getattr(config, "first_k_dense_replace", 0) or 0)


def _no_shared(config: PretrainedConfig) -> int:
    return 0


def _n_shared_times_moe_size(config: PretrainedConfig) -> int:
    n_shared = getattr(config, "n_shared_experts", None) or 0
    return n_shared * config.moe_intermediate_size


def _qwen2_shared(config: PretrainedConfig) -> int:
    return getattr(config, "shared_expert_intermediate_size", 0) or 0


MOE_FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        "qwen3_moe", ("qwen3_moe",), AttentionKind.QK_NORM_HEAD, scoring=RouterScoring.SOFTMAX,
        is_moe_layer=_qwen_sparse_step, shared_expert_size=_no_shared,
    ),
    FamilySpec(
        "qwen2_moe", ("qwen2_moe",), AttentionKind.LLAMA, scoring=RouterScoring.SOFTMAX,
        is_moe_layer=_qwen_sparse_step, shared_expert_size=_qwen2_shared, shared_expert_gated=True,
    ),
    FamilySpec(
        "mixtral", ("mixtral",), AttentionKind.LLAMA, scoring=RouterScoring.SOFTMAX,
        num_experts_key="num_local_experts", is_moe_layer=_every_layer, shared_expert_size=_no_shared,
        renormalize_topk=True,
    ),
    FamilySpec(
        "olmoe", ("olmoe",), AttentionKind.QK_NORM_FULL, scoring=RouterScoring.SOFTMAX,
        is_moe_layer=_every_layer, shared_expert_size=_no_shared,
    ),
    FamilySpec(
        "gpt_oss", ("gpt_oss",), AttentionKind.HALF_ROPE, router_attr="router", scoring=RouterScoring.SOFTMAX_TOPK,
        num_experts_key="num_local_experts", is_moe_layer=_every_layer, shared_expert_size=_no_shared,
        router_output=RouterOutput.LOGITS_WEIGHTS_IDS, sinks_attr="sinks", eager_only=True,
    ),
    FamilySpec(
        "deepseek_v3", ("deepseek_v3",), AttentionKind.MLA, scoring=RouterScoring.SIGMOID_GROUPED,
        num_experts_key="n_routed_experts", is_moe_layer=_first_k_dense, shared_expert_size=_n_shared_times_moe_size,
        router_output=RouterOutput.LOGITS, rope_style=RopeStyle.INTERLEAVED_CONFIG,
    ),
    FamilySpec(
        "deepseek_v2", ("deepseek_v2",), AttentionKind.MLA, scoring=RouterScoring.SOFTMAX_GROUPED,
        num_experts_key="n_routed_experts", is_moe_layer=_first_k_dense, shared_expert_size=_n_shared_times_moe_size,
        router_output=RouterOutput.LINEAR_WEIGHT, rope_style=RopeStyle.COMPLEX,
    ),
    FamilySpec(
        "glm4_moe", ("glm4_moe",), AttentionKind.LLAMA, scoring=RouterScoring.SIGMOID_GROUPED,
        num_experts_key="n_routed_experts", is_moe_layer=_first_k_dense, shared_expert_size=_n_shared_times_moe_size,
        router_output=RouterOutput.LOGITS,
    ),
    FamilySpec(
        "granitemoe", ("granitemoe",), AttentionKind.LLAMA, moe_attr="block_sparse_moe", router_attr="router",
        scoring=RouterScoring.SOFTMAX_TOPK, num_experts_key="num_local_experts", is_moe_layer=_every_layer,
        shared_expert_size=_no_shared, router_output=RouterOutput.DISPATCH_LOGITS_LAST,
    ),
    FamilySpec(
        "phimoe", ("phimoe",), AttentionKind.LLAMA, router_attr="router", scoring=RouterScoring.SPARSEMIXER,
        num_experts_key="num_local_experts", is_moe_layer=_every_layer, shared_expert_size=_no_shared,
        router_output=RouterOutput.LOGITS_WEIGHTS_IDS,
    ),
)

# Dense families: accepted (they have no router); kvpress handles their attention itself.
DENSE_FAMILIES: tuple[FamilySpec, ...] = tuple(
    FamilySpec(name, (name,), AttentionKind.LLAMA, moe_attr=None, router_attr=None)
    for name in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "gemma3_text", "olmo",
                 "olmo2", "granite", "glm4")
)

_BY_MODEL_TYPE = {model_type: spec for spec in MOE_FAMILIES + DENSE_FAMILIES for model_type in spec.model_types}


_MOE_CONFIG_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def looks_like_moe(config: PretrainedConfig) -> bool:
    """Whether a config of a family outside the registry declares routed experts (for a warning, not a dispatch)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return any((getattr(text_config, key, None) or 0) > 1 for key in _MOE_CONFIG_KEYS)


def supported_families() -> str:
    """Human-readable list of the supported families, for error messages."""
    moe = ", ".join(spec.name for spec in MOE_FAMILIES)
    dense = ", ".join(spec.name for spec in DENSE_FAMILIES)
    return f"MoE families: {moe}; dense families (no router): {dense}"


def family_for_config(config: PretrainedConfig) -> FamilySpec:
    """The family spec of a model config; ``ValueError`` naming the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    text_config = getattr(config, "text_config", None)
    if model_type not in _BY_MODEL_TYPE and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    spec = _BY_MODEL_TYPE.get(model_type)
    if spec is None:
        raise ValueError(
            f"pikv-press does not support model_type={model_type!r}. Supported {supported_families()}. "
            "Open an issue with the model id if you need this family."
        )
    return spec
