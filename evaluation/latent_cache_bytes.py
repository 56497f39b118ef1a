"""Stored KV bytes per token of DeepSeek-V2-Lite and DeepSeek-V3: transformers' cache against pikv-press's latent cache.

    python -m evaluation.latent_cache_bytes            # the formula, from the published configs
    python -m evaluation.latent_cache_bytes --measure  # plus real caches of a one-layer slice with the same shapes

transformers 5.2 caches MLA models as per-head keys and values; :class:`pikv_press.cache.latent.LatentCache` keeps
the latent and the rotary key. The configs are built offline from the published ``config.json`` numbers that fix the
attention and cache shapes (layers, heads, ``kv_lora_rank``, ``q_lora_rank``, head dims, experts, bf16); RoPE
scaling (V3's YaRN) is left out: it does not change what is stored. ``--measure`` builds, for each config, a random
one-layer model with exactly that layer's attention shapes (hidden size and FFN shrunk, as they do not reach the
cache), prefills a few tokens into a ``DynamicCache`` and into a ``LatentCache`` and prints the bytes per token and
layer read from tensor storage, beside the formula divided by the number of layers.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, DynamicCache, PretrainedConfig

from pikv_press.attention.latent import enable_latent_attention
from pikv_press.cache import cache_nbytes
from pikv_press.cache.latent import LatentCache, latent_bytes_per_token

KIB = 1024


def deepseek_v2_lite_config() -> DeepseekV2Config:
    """deepseek-ai/DeepSeek-V2-Lite's published config (attention, cache and expert shapes; bf16)."""
    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy", max_position_embeddings=163840,
        dtype="bfloat16",
    )


def deepseek_v3_config() -> DeepseekV3Config:
    """deepseek-ai/DeepSeek-V3's published config (attention, cache and expert shapes; bf16 activations)."""
    return DeepseekV3Config(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5,
        norm_topk_prob=True, max_position_embeddings=163840, dtype="bfloat16",
    )


CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "DeepSeek-V2-Lite": deepseek_v2_lite_config,
    "DeepSeek-V3": deepseek_v3_config,
}


def one_layer_slice(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` with one (dense) layer and a small hidden size, vocabulary and FFN: the attention shapes that reach
    the cache (heads, ``kv_lora_rank``, head dims) are kept."""
    sliced = config.__class__(**{**config.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 1,
                                 "hidden_size": 64, "intermediate_size": 32, "moe_intermediate_size": 16,
                                 "vocab_size": 64, "q_lora_rank": config.q_lora_rank and 32})
    return sliced


@torch.no_grad()
def measured_bytes_per_token_and_layer(config: PretrainedConfig, tokens: int = 8) -> tuple[float, float]:
    """``(stock, latent)`` bytes per token and layer read from the storage of real caches after a prefill of
    ``tokens`` tokens of a random one-layer model with ``config``'s attention shapes, in the config's dtype."""
    sliced = one_layer_slice(config)
    dtype = getattr(torch, str(config.dtype).removeprefix("torch.")) if config.dtype is not None else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(sliced, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(3, sliced.vocab_size, (1, tokens))
    stock = DynamicCache()
    model(ids, past_key_values=stock)
    latent = LatentCache(sliced)
    with enable_latent_attention(model):
        model(ids, past_key_values=latent)
    return cache_nbytes(stock) / tokens, cache_nbytes(latent) / tokens


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help="also measure real caches of a one-layer slice")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | layers | dtype | transformers (per-head K/V) | latent cache | ratio |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    rows = []
    for name, build in CONFIGS.items():
        config = build()
        figures = latent_bytes_per_token(config)
        rows.append((name, config, figures))
        dtype = str(config.dtype).removeprefix("torch.")
        print(f"| {name} | {config.num_hidden_layers} | {dtype} | {figures.stock:,} B ({figures.stock / KIB:.1f} "
              f"KiB) | {figures.latent:,} B ({figures.latent / KIB:.1f} KiB) | {figures.ratio:.2f}x |")
    if args.measure:
        print("\nMeasured from tensor storage (one-layer slice, same attention shapes), bytes per token and layer:")
        print("| model | transformers: formula / measured | latent: formula / measured |")
        print("| --- | ---: | ---: |")
        for name, config, figures in rows:
            stock, latent = measured_bytes_per_token_and_layer(config)
            layers = config.num_hidden_layers
            print(f"| {name} | {figures.stock // layers:,} / {stock:,.0f} | {figures.latent // layers:,} / "
                  f"{latent:,.0f} |")


if __name__ == "__main__":
    main()
