"""CPU proof of the StableLM and GPT-NeoX adapters. Needs torch (CPU) and transformers.

For each tiny case of tests/adapters_tiny.py:
  1. build the source checkpoint from the numpy seed;
  2. run transformers' own model (StableLmForCausalLM / GPTNeoXForCausalLM, float32) on fixed tokens;
  3. write those logits to tests/fixtures/adapters/<case>.json (CI compares against them without
     transformers);
  4. prepare the adapter's working copy and run the numpy forward of exllamav2's target block on it;
  5. record max |logit difference| (exllamav2's tanh GELU, and erf GELU to isolate the rest) in
     benchmarks/cpu/adapters.json, with the max |erf GELU - tanh GELU| over [-20, 20].

    pip install torch==2.13.0 transformers
    PYTHONPATH=. python scripts/adapters_cpu_proof.py
"""

from __future__ import annotations

import json
import math
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from adapters_tiny import CASES, FIXTURES, TOKENS, build, exl2_forward, gelu  # noqa: E402

from quantkit.archs import adapters  # noqa: E402

COMMAND = "pip install torch==2.13.0 transformers && PYTHONPATH=. python scripts/adapters_cpu_proof.py"


def transformers_logits(case: str, folder: Path) -> np.ndarray:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(CASES[case])
    if cfg["architectures"][0] == "StableLMEpochForCausalLM":
        # The remote-code StableLMEpoch is the model transformers ported as StableLm; load the same
        # weights through it with the epoch keys translated (rope_pct, norm_eps).
        cfg = {k: v for k, v in cfg.items() if k not in ("rope_pct", "norm_eps", "num_heads", "rotary_scaling_factor")}
        cfg |= {"architectures": ["StableLmForCausalLM"], "model_type": "stablelm",
                "partial_rotary_factor": CASES[case]["rope_pct"], "layer_norm_eps": CASES[case]["norm_eps"]}
        (folder / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(folder)
    want = CASES[case].get("rope_pct", CASES[case].get("rotary_pct", CASES[case].get("partial_rotary_factor")))
    assert math.isclose(config.rope_parameters["partial_rotary_factor"], want), (config.rope_parameters, want)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor([TOKENS])).logits[0].double().numpy()
    return out


def main() -> None:
    import torch
    import transformers

    FIXTURES.mkdir(parents=True, exist_ok=True)
    x = np.linspace(-20, 20, 4_000_001)
    diff = np.abs(gelu(x, "erf") - gelu(x, "tanh"))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            src, hf, dst = Path(tmp) / case, Path(tmp) / f"{case}-hf", Path(tmp) / f"{case}-adapted"
            sha = build(case, src)
            build(case, hf)
            ref = transformers_logits(case, hf)
            fixture = {
                "case": case, "source_config": CASES[case], "tokens": TOKENS, "weights_sha256": sha,
                "made_by": f"transformers {transformers.__version__}, torch {torch.__version__}, float32",
                "logits": [[float(f"{v:.8g}") for v in row] for row in ref],
            }
            (FIXTURES / f"{case}.json").write_text(json.dumps(fixture) + "\n")
            copy = adapters.prepare(src, dst)
            tanh = exl2_forward(dst, TOKENS, gelu_form="tanh")
            erf = exl2_forward(dst, TOKENS, gelu_form="erf")
            results.append({
                "case": case, "source_arch": copy.plan.source_arch, "target_arch": copy.plan.target_arch,
                "adapter": copy.plan.adapter, "exact": copy.plan.exact, "files": copy.files,
                "logit_range": [float(ref.min()), float(ref.max())],
                "max_abs_logit_diff_exl2_semantics": float(np.abs(tanh - ref).max()),
                "max_abs_logit_diff_with_erf_gelu": float(np.abs(erf - ref).max()),
                "argmax_agrees": bool((tanh.argmax(-1) == ref.argmax(-1)).all()),
            })
            print(f"{case}: {results[-1]['max_abs_logit_diff_exl2_semantics']:.3g} (erf GELU: {results[-1]['max_abs_logit_diff_with_erf_gelu']:.3g})")
    out = {
        "what": "tiny random checkpoints (hidden 64, 2 layers, 4 heads, vocab 96) through quantkit's adapters; "
                "numpy float64 forward of exllamav2 0.3.2's target block on the working copy vs transformers' float32 "
                "forward of the original model on 16 fixed tokens. Not exllamav2 itself: that needs a GPU.",
        "command": COMMAND,
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                        "numpy": np.__version__, "machine": platform.machine()},
        "gelu_erf_vs_tanh": {"max_abs_diff": float(diff.max()), "at_x": float(abs(x[diff.argmax()])), "range": [-20, 20], "dtype": "float64"},
        "cases": results,
    }
    target = REPO / "benchmarks" / "cpu" / "adapters.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {target.relative_to(REPO)} and {len(results)} fixtures in {FIXTURES.relative_to(REPO)}")


if __name__ == "__main__":
    main()
