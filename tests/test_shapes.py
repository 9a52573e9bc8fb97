"""Golden shapes over real config.json files: what the alias-tolerant reader makes of each.

Expected values are read off each config by hand (see tests/fixtures/configs/SOURCES.md and
tests/fixtures/models/SOURCES.md for where each file came from); the comment says which edge it covers.
"""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS, FIXTURES
from quantkit import archs
from quantkit.errors import UnsupportedArchitecture
from quantkit.model import read_shape
from quantkit.vram import decoder_params

MODELS = FIXTURES / "models"

# file, arch, (layers, hidden, intermediate, heads, kv_heads, head_dim, vocab, tied, experts, rotary_dim, sliding_window, max_positions)
GOLDEN = [
    # Seed: Llama-3-8B shape (derivative config of RLHFlow/LLaMA3-iterative-DPO-final). GQA 32/8, 128k vocab.
    (MODELS / "llama3-iterative-dpo-8b/config.FALLBACK-derivative-chujiezheng-ExPO.json", "LlamaForCausalLM",
     (32, 4096, 14336, 32, 8, 128, 128256, False, None, 128, 0, 8192)),
    # Seed: Starling-LM-11B (Mistral, 48 layers). "sliding_window": null reads as none; odd 32769 positions kept.
    (MODELS / "starling-lm-11b-alpha/config.json", "MistralForCausalLM",
     (48, 4096, 14336, 32, 8, 128, 32002, False, None, 128, 0, 32769)),
    # Sliding window 4096 (Mistral-7B-v0.1).
    (CONFIGS / "mistral-7b-v0.1.json", "MistralForCausalLM",
     (32, 4096, 14336, 32, 8, 128, 32000, False, None, 128, 4096, 32768)),
    # MoE: 8 experts, top-2; intermediate is per expert.
    (CONFIGS / "mixtral-8x7b-v0.1.json", "MixtralForCausalLM",
     (32, 4096, 14336, 32, 8, 128, 32000, False, 8, 128, 0, 32768)),
    # Tied embeddings, GQA 14/2. exllamav2 reads sliding_window even with use_sliding_window false.
    (CONFIGS / "qwen2-0.5b.json", "Qwen2ForCausalLM",
     (24, 896, 4864, 14, 2, 64, 151936, True, None, 64, 131072, 131072)),
    # head_dim 256 is not hidden/heads (3584/16 = 224); no tie key: transformers' Gemma2 default (tied).
    (CONFIGS / "gemma-2-9b-it.json", "Gemma2ForCausalLM",
     (42, 3584, 14336, 16, 8, 256, 256000, True, None, 256, 4096, 8192)),
    # MoE whose experts use moe_intermediate_size (768), not intermediate_size; head_dim 128 != 2048/32.
    (CONFIGS / "qwen3-30b-a3b-mlx-4bit.json", "Qwen3MoeForCausalLM",
     (48, 2048, 768, 32, 4, 128, 151936, False, 128, 128, 0, 40960)),
    # Fused qkv; no num_key_value_heads difference (MHA 32/32); head_dim 96 from 3072/32.
    (CONFIGS / "phi-3-mini-4k-instruct.json", "Phi3ForCausalLM",
     (32, 3072, 8192, 32, 32, 96, 32064, False, None, 96, 2047, 4096)),
    # Aliases n_layer/n_embd/n_head/n_positions; no n_inner -> 4 x hidden; no RoPE; tied by default.
    (CONFIGS / "gpt2.json", "GPT2LMHeadModel",
     (12, 768, 3072, 12, 12, 64, 50257, True, None, 0, 0, 1024)),
    # Llama-3-8B base: rope_theta 500000, same shape as the seed.
    (CONFIGS / "meta-llama-3-8b.json", "LlamaForCausalLM",
     (32, 4096, 14336, 32, 8, 128, 128256, False, None, 128, 0, 8192)),
]

FIELDS = ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "tied_embeddings",
          "experts", "rotary_dim", "sliding_window", "max_positions")


@pytest.mark.parametrize("path, arch, expected", GOLDEN, ids=[p.stem for p, _, _ in GOLDEN])
def test_golden_shape(path, arch, expected):
    config = json.loads(path.read_text())
    spec = archs.resolve(config)
    assert spec.name == arch
    shape = read_shape(config, spec)
    assert tuple(getattr(shape, f) for f in FIELDS) == expected


# Decoder parameter counts published alongside the VRAM tables (../shared/reference/vram-published,
# "derived.n_linear_params"): an independent check of the linear-layer enumeration.
@pytest.mark.parametrize("path, params", [
    (MODELS / "llama3-iterative-dpo-8b/config.FALLBACK-derivative-chujiezheng-ExPO.json", 6_979_321_856),
    (CONFIGS / "mistral-7b-v0.1.json", 6_979_321_856),
    (CONFIGS / "gemma-2-9b-it.json", 8_323_596_288),
])
def test_decoder_params_match_published_derivations(path, params):
    config = json.loads(path.read_text())
    spec = archs.resolve(config)
    assert decoder_params(read_shape(config, spec), spec) == params


def test_moe_counts_every_expert():
    config = json.loads((CONFIGS / "mixtral-8x7b-v0.1.json").read_text())
    spec = archs.resolve(config)
    shape = read_shape(config, spec)
    attn = 4096 * 4096 * 2 + 4096 * 1024 * 2
    assert decoder_params(shape, spec) == 32 * (attn + 8 * 3 * 4096 * 14336)


def test_partial_rotary_and_text_config():
    # Synthetic edge case (no real supported config with partial_rotary_factor is bundled): the factor
    # is read for every architecture (exllamav2 config.py), and VLM keys live under text_config.
    config = {"architectures": ["Mistral3ForConditionalGeneration"], "vision_config": {"model_type": "pixtral"},
              "text_config": {"num_hidden_layers": 4, "hidden_size": 512, "intermediate_size": 1024,
                              "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
                              "vocab_size": 1000, "partial_rotary_factor": 0.5}}
    shape = read_shape(config, archs.resolve(config))
    assert (shape.head_dim, shape.rotary_dim, shape.kv_heads, shape.layers) == (128, 64, 2, 4)


# The seed models exllamav2 lacks resolve to their adapter's target, never silently to Llama.
@pytest.mark.parametrize("path, source, target", [
    (MODELS / "rocket-3b/config.json", "StableLmForCausalLM", "OrionForCausalLM"),
    (MODELS / "stablelm-zephyr-3b/config.json", "StableLmForCausalLM", "OrionForCausalLM"),
    (MODELS / "stablelm-3b-4e1t/config.original-846682b-StableLMEpoch.json", "StableLMEpochForCausalLM", "OrionForCausalLM"),
    (MODELS / "redpajama-3b-chat/config.json", "GPTNeoXForCausalLM", "Starcoder2ForCausalLM"),
])
def test_seed_models_exllamav2_lacks_resolve_through_their_adapter(path, source, target):
    config = json.loads(path.read_text())
    resolved = archs.resolve_model(config)
    assert resolved.spec.name == target
    assert resolved.adapter is not None and resolved.adapter.source_arch == source
    shape = read_shape(resolved.config, resolved.spec)
    # StableLM: rotary over 0.25 of head_dim 80; GPT-NeoX (RedPajama): full rotary.
    assert shape.rotary_dim == (20 if "StableL" in source else 80)


@pytest.mark.parametrize("config, why", [
    ({"architectures": ["BertModel"]}, "not an architecture exllamav2 0.3.2 recognises"),
    ({"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]}, "exactly one"),
    ({}, "no \"architectures\""),
    # Llava is only recognised with a Pixtral vision tower.
    ({"architectures": ["LlavaForConditionalGeneration"], "vision_config": {"model_type": "clip_vision_model"}}, "pixtral"),
])
def test_refusals(config, why):
    with pytest.raises(UnsupportedArchitecture) as info:
        archs.resolve(config)
    assert why in info.value.reason


def test_table_covers_exllamav2_list():
    # The §5 list of exllamav2 0.3.2's architecture.py, verbatim.
    exl2 = """LlamaForCausalLM MistralForCausalLM MixtralForCausalLM LlavaForConditionalGeneration
    Mistral3ForConditionalGeneration YiForCausalLM OrionForCausalLM Qwen2ForCausalLM Qwen3ForCausalLM
    Qwen3MoeForCausalLM Qwen2VLForConditionalGeneration Qwen2_5_VLForConditionalGeneration GemmaForCausalLM
    Gemma2ForCausalLM Gemma3ForConditionalGeneration Starcoder2ForCausalLM GemmoeForCausalLM CohereForCausalLM
    Cohere2ForCausalLM DbrxForCausalLM Phi3ForCausalLM GPTBigCodeForCausalLM GPT2LMHeadModel MiniCPMForCausalLM
    InternLM2ForCausalLM IndexForCausalLM GraniteForCausalLM Glm4ForCausalLM""".split()
    assert sorted(a.name for a in archs.supported()) == sorted(exl2)


def test_mqa_forces_one_kv_head():
    config = {"architectures": ["GPTBigCodeForCausalLM"], "n_layer": 2, "n_embd": 256, "n_head": 4,
              "n_inner": 1024, "vocab_size": 100}
    shape = read_shape(config, archs.resolve(config))
    assert shape.kv_heads == 1 and shape.head_dim == 64
