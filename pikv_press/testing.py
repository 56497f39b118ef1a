"""Tiny random-weight models of every supported family and a tiny offline tokenizer: a test bed for presses.

Use them to check that a press runs on every family in seconds, offline::

    from pikv_press.testing import MOE_FAMILY_NAMES, build_model, build_tokenizer
    for family in MOE_FAMILY_NAMES:
        model = build_model(family)  # 3 layers, hidden 64, random weights, eval mode

Each config keeps the family's distinctive features: dense layers (Qwen ``mlp_only_layers``, DeepSeek/GLM
``first_k_dense_replace``), shared experts, QK norms, GPT-OSS sinks and sliding-window layers, GLM partial RoPE,
DeepSeek latent attention with interleaved (V3) or complex (V2) RoPE, Granite's attention multiplier.
"""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from tokenizers import decoders as tk_decoders
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Glm4MoeConfig,
    GptOssConfig,
    GraniteMoeConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    PhimoeConfig,
    PreTrainedTokenizerFast,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from pikv_press.moe.families import MOE_FAMILIES  # noqa: E402

VOCAB = 320
HIDDEN = 64
LAYERS = 3
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
              max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
              pad_token_id=None)  # no padding_idx: a zero embedding row would give all-zero queries


def _qwen3_moe():
    return Qwen3MoeConfig(**COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                          num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0])


def _qwen2_moe():
    return Qwen2MoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=96, moe_intermediate_size=32,
                          shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
                          decoder_sparse_step=1, mlp_only_layers=[1])


def _mixtral():
    return MixtralConfig(**COMMON, num_key_value_heads=2, intermediate_size=64, num_local_experts=4,
                         num_experts_per_tok=2)


def _olmoe():
    return OlmoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=64, num_experts=8, num_experts_per_tok=2)


def _gpt_oss():
    # max_position_embeddings matching the default YaRN factor (32 x 4096) avoids a config warning
    return GptOssConfig(**{**COMMON, "max_position_embeddings": 131072}, num_key_value_heads=2, head_dim=16,
                        intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                        layer_types=["sliding_attention", "full_attention", "full_attention"])


def _deepseek_v3():
    return DeepseekV3Config(**COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                            first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=12, rope_interleave=True, routed_scaling_factor=2.5)


def _deepseek_v2():
    return DeepseekV2Config(**COMMON, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
                            topk_method="greedy", first_k_dense_replace=1, q_lora_rank=None,
                            kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12)


def _glm4_moe():
    return Glm4MoeConfig(**COMMON, num_key_value_heads=2, head_dim=16, intermediate_size=96,
                         moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                         n_group=1, topk_group=1, first_k_dense_replace=1, use_qk_norm=True)


def _granitemoe():
    return GraniteMoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
                            num_experts_per_tok=2, attention_multiplier=0.09, residual_multiplier=0.5,
                            embedding_multiplier=4.0, logits_scaling=2.0)


def _phimoe():
    return PhimoeConfig(**COMMON, num_key_value_heads=2, intermediate_size=64, num_local_experts=4,
                        num_experts_per_tok=2)


def _llama():
    return LlamaConfig(**COMMON, num_key_value_heads=2, intermediate_size=96)


MOE_CONFIGS = {
    "qwen3_moe": _qwen3_moe,
    "qwen2_moe": _qwen2_moe,
    "mixtral": _mixtral,
    "olmoe": _olmoe,
    "gpt_oss": _gpt_oss,
    "deepseek_v3": _deepseek_v3,
    "deepseek_v2": _deepseek_v2,
    "glm4_moe": _glm4_moe,
    "granitemoe": _granitemoe,
    "phimoe": _phimoe,
}
MOE_FAMILY_NAMES = tuple(MOE_CONFIGS)
# GPT-OSS supports only eager attention; the others run with SDPA like a default load.
EAGER_ONLY = {spec.name for spec in MOE_FAMILIES if spec.eager_only}


def _randomize_router_buffers(model) -> None:
    """Random weights for tensors that a random init leaves at zero (routers, sinks, correction biases)."""
    gen = torch.Generator().manual_seed(1)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if any(key in name for key in ("gate.weight", "router.weight", "router.layer.weight", "sinks",
                                        "e_score_correction_bias", "router.bias")):
            with torch.no_grad():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.5)


def build_model(family: str, attn_implementation: str | None = None, seed: int = 0):
    """A tiny random model of ``family`` (eval mode, float32)."""
    torch.manual_seed(seed)
    config = _llama() if family == "llama" else MOE_CONFIGS[family]()
    impl = attn_implementation or ("eager" if family in EAGER_ONLY else "sdpa")
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32)
    _randomize_router_buffers(model)
    return model.eval()


TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps near the warm fire.",
    "Mixture of experts models route every token to a few experts; the router is a free clustering signal.",
    "A key value cache stores keys and values of past tokens so that decoding does not recompute them.",
    "What is the special magic number? The special magic number mentioned in the text is 7481.",
    "Paris is the capital of France and Berlin is the capital of Germany; Rome is the capital of Italy.",
] * 4


@functools.lru_cache(maxsize=1)
def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on a few sentences, with a chat template (offline, < 1 s)."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk_decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast
