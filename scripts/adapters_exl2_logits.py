"""The adapters proven through exllamav2 0.3.2's own code, on the CPU: each tiny adapted model loaded
unquantized by exllamav2 and again after an 8.0 bpw conversion by its real converter (run by quantkit's
pipeline), against transformers' float32 logits of the ORIGINAL model. Writes
benchmarks/cpu/adapters-exl2.json.

exllamav2 runs through the CPU stand-in for its CUDA extension (tests/exl2_cpu: test infrastructure, so a
checkout with the test extra is needed), with the environment quantkit gives every exllamav2 process
(EXLLAMA_NO_SDPA=1 without flash-attn / xformers).

    pip install -e ".[test]" && PYTHONPATH=. python scripts/adapters_exl2_logits.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from adapters_tiny import TOKENS, build  # noqa: E402
from exl2_cpu import on_cpu, subprocess_env  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

COMMAND = 'pip install -e ".[test]" && PYTHONPATH=. python scripts/adapters_exl2_logits.py'
OUT = REPO / "benchmarks" / "cpu" / "adapters-exl2.json"
#: case -> the exllamav2 architecture its adapter targets
CASES = {"stablelm": "OrionForCausalLM", "gpt-neox": "Starcoder2ForCausalLM"}
VOCAB = 320  # the tokenizer make_tokenizer trains: every piece must be embeddable for calibration


def reference_logits(folder: Path) -> Any:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].double()


def exl2_logits(folder: Path) -> Any:
    import torch
    from exllamav2 import ExLlamaV2, ExLlamaV2Config

    cfg = ExLlamaV2Config(str(folder))
    cfg.max_seq_len = 128
    model = ExLlamaV2(cfg)
    model.load()
    try:
        with torch.no_grad():
            return model.forward(torch.tensor([TOKENS])).double()[0, :, :VOCAB]
    finally:
        model.unload()


def compare(ref: Any, got: Any) -> dict[str, float]:
    import torch

    f = torch.nn.functional
    lp, lq = f.log_softmax(ref, -1), f.log_softmax(got, -1)
    return {"max_abs_diff": round((ref - got).abs().max().item(), 6),
            "cosine": round(f.cosine_similarity(ref.flatten(), got.flatten(), dim=0).item(), 6),
            "top1_agreement": round((ref.argmax(-1) == got.argmax(-1)).double().mean().item(), 4),
            "mean_kl": float(f"{(lp.exp() * (lp - lq)).sum(-1).mean().item():.4g}")}


def convert(src: Path, work: Path) -> Path:
    """quantkit's pipeline, measure + 8.0 bpw, with exllamav2's real converter as a subprocess."""
    import torch

    from quantkit.branches import Branch
    from quantkit.pipeline import Pipeline, Settings
    from quantkit.run import run_all

    os.environ.update(subprocess_env())
    os.environ.pop("QUANTKIT_CONVERTER", None)
    torch.cuda.is_available = lambda: True  # quantkit's pre-flight, as on a GPU machine
    p = Pipeline(Settings(model=str(src), rows=2, measurement_rows=2, length=64,
                          branches=[Branch(name="8_0", bits=8.0, head_bits=8)]), work)
    p.lock()
    [result] = run_all(p)
    return result.folder


def main() -> None:
    from importlib.metadata import version

    import torch
    import transformers

    from quantkit.exl2 import runtime

    os.environ.update(runtime.exllamav2_env())
    cases = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, target in CASES.items():
            src = Path(tmp) / case
            build(case, src, vocab_size=VOCAB)
            make_tokenizer(src)
            ref = reference_logits(src)
            start = time.monotonic()
            out = convert(src, Path(tmp) / f"work-{case}")
            seconds = time.monotonic() - start
            with on_cpu():
                unquantized = compare(ref, exl2_logits(Path(tmp) / f"work-{case}" / "adapted"))
                quantized = compare(ref, exl2_logits(out))
            bpw = json.loads((out / "quantkit.json").read_text())["achieved_decoder_bpw"]
            cases.append({"case": case, "source_arch": json.loads((src / "config.json").read_text())["architectures"][0],
                          "target_arch": target, "exllamav2_unquantized": unquantized,
                          "exllamav2_8_0": quantized | {"achieved_decoder_bpw": bpw},
                          "measure_and_convert_seconds": round(seconds, 1)})
            print(json.dumps(cases[-1]))
    report = {
        "what": ("tiny random checkpoints (hidden 64, 2 layers, 4 heads, vocab 320; tests/adapters_tiny.py) through "
                 "quantkit's adapters, then exllamav2 0.3.2's own loader (unquantized working copy) and its real "
                 "converter (measure + 8.0 bpw, head 8, 2 rows x 64 tokens) on the CPU through tests/exl2_cpu, "
                 "against transformers' float32 forward of the original model on 16 fixed tokens. exllamav2's GELU "
                 "is the tanh approximation, transformers' GPT-NeoX uses the exact one."),
        "command": COMMAND,
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "exllamav2": version("exllamav2"),
                        "machine": platform.machine(), "EXLLAMA_NO_SDPA": os.environ.get(runtime.NO_SDPA)},
        "cases": cases,
    }
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
