"""The estimator's terms against exllamav2 0.3.2's own arithmetic (figures from the facts sheet, which
ran exllamav2's pure-Python qparams.py on these shapes) and against real safetensors headers."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import FIXTURES, model_folder
from quantkit.errors import CorruptSafetensors, InvalidBits, InvalidContext, InvalidHeadBits, UnknownCacheMode, UnknownLoader
from quantkit.model import load_model
from quantkit.vram import (
    CUDA_CONTEXT_BYTES,
    MAX_DQ_SIZE,
    CacheMode,
    Loader,
    estimate,
    kv_cache_bytes,
    lm_head_bytes,
    parse_cache,
    parse_loader,
    rope_bytes,
    scratch_bytes,
)

LLAMA3 = FIXTURES / "models/llama3-iterative-dpo-8b/config.FALLBACK-derivative-chujiezheng-ExPO.json"
KiB, MiB, GiB = 1024, 1024**2, 1024**3


@pytest.fixture
def llama3(tmp_path):
    return load_model(model_folder(tmp_path, LLAMA3))


# exllamav2 qparams_headoptions bpw for a 4096 x 128256 head (facts sheet §1).
@pytest.mark.parametrize("head_bits, bpw", [(2, 2.73), (3, 3.28), (4, 4.44), (5, 5.19), (6, 6.34), (8, 8.03)])
def test_head_option_bpw(llama3, head_bits, bpw):
    got = (lm_head_bytes(llama3.shape, head_bits) - 4096 * 4) * 8 / (4096 * 128256)
    assert got == pytest.approx(bpw, abs=0.005)


# Cache per token for L=32, Hkv=8, D=128 incl. the fp16 buffer of the Q caches (facts sheet §7).
@pytest.mark.parametrize("mode, kib_per_token", [("fp16", 128), ("fp8", 64 + 4), ("q8", 68 + 4), ("q6", 52 + 4), ("q4", 36 + 4)])
def test_cache_per_token(llama3, mode, kib_per_token):
    cache, temp = kv_cache_bytes(llama3.shape, CacheMode(mode), 32768)
    assert (cache + temp) / 32768 == kib_per_token * KiB
    assert (temp > 0) == (mode != "fp16")


def test_cache_rounds_to_the_dynamic_generators_page(llama3):
    assert kv_cache_bytes(llama3.shape, CacheMode.FP16, 4000) == kv_cache_bytes(llama3.shape, CacheMode.FP16, 4096)


def test_head_dequant_scratch_dominates_and_is_capped(llama3, tmp_path):
    s = scratch_bytes(llama3.shape, llama3.spec)
    assert s["lm_head"] == 2 * 4096 * 128256  # ~1.05 GB, under max_dq_size
    assert max(s.values()) == s["lm_head"]
    big = load_model(model_folder(tmp_path, {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1,
                                             "hidden_size": 12288, "intermediate_size": 1024, "num_attention_heads": 96,
                                             "vocab_size": 256000}, "big"))
    assert scratch_bytes(big.shape, big.spec)["lm_head"] == 2 * MAX_DQ_SIZE  # capped: 1 GiB


def test_rope_tables(llama3):
    assert rope_bytes(llama3.shape, llama3.spec, 8192) == 4 * 8192 * 128


def test_estimate_has_every_component_and_sums(llama3):
    e = estimate(llama3, bits=6.5, head_bits=8, context=8192, cache=CacheMode.Q4)
    assert e.total == sum(e.components.values())
    assert e.components["cuda_context"] == CUDA_CONTEXT_BYTES
    assert e.components["kv_fp16_buffer"] == 2 * 2 * 8192 * 8 * 128
    assert e.embeddings_ram == 128256 * 4096 * 2
    assert not e.measured_weights


def test_slopes(llama3):
    def total(bits, ctx, cache=CacheMode.FP16):
        return estimate(llama3, bits=bits, head_bits=8, context=ctx, cache=cache).total
    # 28k more tokens of FP16 cache = 3.5 GiB plus 28k more RoPE rows.
    assert total(8.0, 32768) - total(8.0, 4096) == 28672 * 128 * KiB + 4 * 28672 * 128
    # 1.5 bits over the decoder's 6.98e9 weights.
    assert total(8.0, 4096) - total(6.5, 4096) == pytest.approx(6_979_321_856 * 1.5 / 8, abs=8)
    assert total(8.0, 4096, CacheMode.Q4) < total(8.0, 4096, CacheMode.Q8) < total(8.0, 4096)


def _exl2_folder(tmp_path, *, corrupt: bool = False):
    folder = model_folder(tmp_path, {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 64,
                                     "intermediate_size": 128, "num_attention_heads": 4, "vocab_size": 100,
                                     "quantization_config": {"quant_method": "exl2", "bits": 4.0, "head_bits": 6}}, "exl2")
    tensors = {
        "model.embed_tokens.weight": np.zeros((100, 64), np.float16),  # lives in system RAM
        "model.layers.0.self_attn.q_proj.q_weight": np.zeros((32, 64), np.int32),
        "model.layers.0.self_attn.q_proj.q_invperm": np.zeros((64,), np.int32),
        "model.layers.0.input_layernorm.weight": np.zeros((64,), np.float16),
        "model.norm.weight": np.zeros((64,), np.float16),
        "lm_head.q_weight": np.zeros((24, 100), np.int32),
    }
    save_file(tensors, str(folder / "output.safetensors"))
    if corrupt:
        (folder / "output-00002-of-00002.safetensors").write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{not json")
    return folder


def test_converted_folder_is_sized_from_its_headers(tmp_path):
    m = load_model(_exl2_folder(tmp_path))
    assert m.is_exl2
    e = estimate(m, bits=4.0, head_bits=6, context=4096, cache=CacheMode.FP16)
    assert e.measured_weights
    assert e.components["decoder_weights"] == 32 * 64 * 4 + 64 * 4 + 64 * 2 + 64 * 4  # tensors + group map
    assert e.components["lm_head"] == 24 * 100 * 4
    assert e.components["norms_and_biases"] == 64 * 2
    assert "model.embed_tokens.weight" in m.tensors


def test_corrupt_header_is_named(tmp_path):
    with pytest.raises(CorruptSafetensors) as info:
        load_model(_exl2_folder(tmp_path, corrupt=True))
    assert "output-00002-of-00002.safetensors" in info.value.path


@pytest.mark.parametrize("kwargs, exc", [
    ({"bits": 9.0}, InvalidBits), ({"bits": 1.5}, InvalidBits), ({"bits": float("nan")}, InvalidBits),
    ({"head_bits": 7}, InvalidHeadBits), ({"context": 0}, InvalidContext), ({"context": -4096}, InvalidContext),
])
def test_estimate_validates(llama3, kwargs, exc):
    args = {"bits": 6.5, "head_bits": 8, "context": 4096, "cache": CacheMode.FP16} | kwargs
    with pytest.raises(exc):
        estimate(llama3, **args)


def test_parse_cache():
    assert parse_cache(" Q4 ") is CacheMode.Q4
    with pytest.raises(UnknownCacheMode):
        parse_cache("q5")


# ---- the loader's peak and flash-attn -------------------------------------------------------------------


def test_tabby_loader_peaks_at_serving(llama3):
    """load() + a prefill-only test forward: nothing held beyond serving (no logits, no reserves)."""
    e = estimate(llama3, bits=8.0, head_bits=8, context=8192, cache=CacheMode.FP16)
    assert e.loader is Loader.TABBY and e.components["load_transient"] == 0


def test_autosplit_adds_its_reserves_and_test_forward_logits(llama3):
    tabby = estimate(llama3, bits=8.0, head_bits=8, context=8192, cache=CacheMode.FP16)
    auto = estimate(llama3, bits=8.0, head_bits=8, context=8192, cache=CacheMode.FP16, loader=Loader.AUTOSPLIT)
    # model.py load_autosplit_gen: 192 MiB + 256 MiB reserves; (1, 2048, 128256) fp16 logits at the head.
    assert auto.components["load_transient"] == 448 * MiB + 2048 * 128256 * 2
    assert 0.85 * GiB < auto.total - tabby.total < 0.95 * GiB  # "~0.9 GiB above the estimate for Llama-3-8B"
    # max_input_len is capped at max_seq_len first: a 1k context test-forwards 1k rows
    small = estimate(llama3, bits=8.0, head_bits=8, context=1024, cache=CacheMode.FP16, loader=Loader.AUTOSPLIT)
    assert small.components["load_transient"] == 448 * MiB + 1024 * 128256 * 2


def test_without_flash_attn_kv_is_copied_per_query_head(llama3, tmp_path):
    flash = estimate(llama3, bits=6.5, head_bits=8, context=32768, cache=CacheMode.FP16)
    none = estimate(llama3, bits=6.5, head_bits=8, context=32768, cache=CacheMode.FP16, flash_attn=False)
    # attn.py repeat_kv: K and V as (1, 32 heads, 32768, 128) fp16 = 0.5 GiB at 32k
    assert none.components["attention_copies"] == 2 * 32 * 32768 * 128 * 2 == GiB // 2
    assert flash.components["attention_copies"] == 0
    mha = load_model(model_folder(tmp_path, {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 256,
                                             "intermediate_size": 512, "num_attention_heads": 4, "vocab_size": 100}, "mha"))
    # no GQA: repeat_kv returns its input, nothing is copied
    assert estimate(mha, bits=6.5, head_bits=8, context=4096, cache=CacheMode.FP16, flash_attn=False).components["attention_copies"] == 0


def test_prefill_activations_are_the_allocated_tensors(llama3):
    """x, q, k, v and the attention output of a 2048-token chunk (~0.055 GiB for Llama-3-8B), not the
    temp_attn_size budget."""
    act = estimate(llama3, bits=6.5, head_bits=8, context=32768, cache=CacheMode.FP16).components["activations"]
    tensors = 2048 * (4096 + (32 + 2 * 8) * 128 + 32 * 128) * 2
    assert tensors <= act <= tensors + 2048 * 32 * 4 + 128256 * 2
    assert 0.05 * GiB < act < 0.06 * GiB


def test_unknown_loader():
    assert parse_loader(" Autosplit ") is Loader.AUTOSPLIT
    with pytest.raises(UnknownLoader):
        parse_loader("exllama")
