"""The CPU stand-in for exllamav2's extension (tests/exl2_cpu), and exllamav2's own loader through it:
the source model's logits in exllamav2 match transformers' only with quantkit's EXLLAMA_NO_SDPA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exl2_cpu import exllamav2_logits, ext
from quantkit.exl2 import runtime

TEXT = ("The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
        "Calibration text should look like what the model will read: prose, code, dialogue. A stitch in time.")


def token_ids(folder: Path, n: int = 48) -> list[int]:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT).ids
    while len(ids) < n:
        ids += ids
    return [0] + ids[: n - 1]  # BOS first


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """transformers' float32 forward of the source model: the reference exllamav2 is held to."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def exl2_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """exllamav2's own loader and forward (an EXL2 folder or an unquantized one), as shipped."""
    return exllamav2_logits(folder, ids)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_columns_is_a_continuous_bit_stream_down_each_column(bits):
    x = ext()
    rows, cols = 64, 5
    values = torch.randint(0, 1 << bits, (rows, cols), generator=torch.Generator().manual_seed(bits)).to(torch.int16)
    packed = torch.zeros((rows * bits // 32, cols), dtype=torch.int32)
    x.pack_columns(values, packed, bits)
    assert torch.equal(x._unpack_columns(packed, rows, bits), values.long())
    # pack_tensor.cu's layout: value r of a column at bits r*bits .. r*bits+bits-1 of the column's stream
    stream = sum(int(w) << (32 * i) for i, w in enumerate(packed[:, 2].view(torch.uint32).tolist()))
    assert [(stream >> (r * bits)) & ((1 << bits) - 1) for r in range(rows)] == values[:, 2].tolist()


def test_an_unimplemented_kernel_raises_naming_itself():
    with pytest.raises(NotImplementedError, match=r"exllamav2_ext\.fp16_to_q_kv is not implemented"):
        ext().fp16_to_q_kv(None)


def test_exllamav2_attention_is_causal_only_with_quantkits_environment(tmp_path, tiny_llama_exl2, exl2_on_cpu, monkeypatch):
    import exllamav2.attn

    ids = token_ids(tiny_llama_exl2)
    ref = reference_logits(tiny_llama_exl2, ids)
    monkeypatch.delenv(runtime.NO_SDPA, raising=False)
    # attn.py also reads the variable once, at import: an earlier test may have imported it under
    # EXLLAMA_NO_SDPA. Restore what an import without it decides; ExLlamaV2Config reads it per model.
    monkeypatch.setattr(exllamav2.attn, "has_lower_right_sdpa", True)
    plain = exl2_logits(tiny_llama_exl2, ids)
    for key, value in runtime.exllamav2_env().items():
        monkeypatch.setenv(key, value)
    shielded = exl2_logits(tiny_llama_exl2, ids)
    assert cosine(ref, shielded) > 0.9999
    assert (ref.argmax(-1) == shielded.argmax(-1)).float().mean() > 0.95
    # Without it exllamav2 takes torch SDPA with no mask: every token sees the later ones.
    assert cosine(ref, plain) < 0.99
