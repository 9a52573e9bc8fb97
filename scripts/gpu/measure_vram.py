"""Load every converted branch with exllamav2 on the GPU, measure its peak VRAM per (cache, context),
compare with `quantkit vram --format json`, and write vram.json, results.json and summary.md.

Runs on the GPU machine only (it imports torch and exllamav2, whose first import JIT-builds the CUDA
extension); scripts/gpu/prove.sh calls it after the quantkit pipeline. Everything that needs no GPU lives
in vram_report.py beside it and is unit-tested on CPU.

    python3 scripts/gpu/measure_vram.py --case llama3-shape SRC_DIR WORK_DIR --out $OUT \\
        --contexts 4k,8k,16k,32k --caches fp16,q4,q8,q6 --deadline $(( $(date +%s) + 300 ))

How one cell is measured (also written into every vram.json row's "how_measured"):
  1. free the previous cell (generator, cache, model.unload()), gc, torch.cuda.empty_cache();
  2. reset torch's peak statistics; build ExLlamaV2Config with max_seq_len = context and load the way the
     estimate assumes (`quantkit vram --loader`, the same flag here): tabby (the default, TabbyAPI's way):
     model.load(), the cache class (ExLlamaV2Cache / _Q8 / _Q6 / _Q4), then a prefill-only test forward of
     max_input_len tokens; autosplit: the cache lazily, then ExLlamaV2.load_autosplit(cache); read
     torch.cuda.max_memory_allocated();
  3. reset the peak again; run one ExLlamaV2DynamicGenerator job (a prompt of up to 2048 tokens, so one
     full max_input_len chunk, then a few greedy tokens); read max_memory_allocated() again;
  4. CUDA context = (mem_get_info total - free) - torch.cuda.memory_reserved(), read after the job, so it
     includes the lazily loaded kernels of torch, exllamav2_ext and cuBLAS that the cell used;
  measured_bytes = max(step 2, step 3) + step 4.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vram_report as vr  # noqa: E402  (the script's own folder)

PROMPT_TEXT = ("The quick brown fox jumps over the lazy dog while the model measures its memory. "
               "def add(a, b):\n    return a + b\n")

CACHE_CLASSES = {"fp16": "ExLlamaV2Cache", "q8": "ExLlamaV2Cache_Q8", "q6": "ExLlamaV2Cache_Q6", "q4": "ExLlamaV2Cache_Q4"}


def attention_backend() -> tuple[str, bool]:
    """(description, paged): the dynamic generator's paged mode needs flash-attn >= 2.5.7."""
    from exllamav2 import attn

    if attn.has_flash_attn_with_paged:
        import flash_attn

        return f"flash-attn {flash_attn.__version__} (paged)", True
    if attn.has_xformers:
        return "xformers (unpaged; flash-attn absent)", False
    if attn.has_lower_right_sdpa:
        return "torch SDPA with lower-right causal mask (unpaged; flash-attn absent)", False
    return "exllamav2 matmul attention (unpaged; flash-attn absent)", False


def _cmd(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"({exc.__class__.__name__})"


def device_and_versions(*, exllamav2_built: bool = True) -> tuple[dict, dict]:
    """The GPU and every version that matters. With `exllamav2_built=False` (the extension failed to
    build) exllamav2's version comes from its metadata, since importing it would start the build again."""
    from importlib.metadata import version

    import torch

    import quantkit

    props = torch.cuda.get_device_properties(0)
    device = {
        "name": props.name, "memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}",
        "driver": _cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
    }
    nvcc = _cmd(["nvcc", "--version"]).splitlines()
    versions = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "nvcc": nvcc[-1] if nvcc else "", "exllamav2": version("exllamav2"), "quantkit": quantkit.__version__,
        "attention": attention_backend()[0] if exllamav2_built else "(extension not built)",
    }
    return device, versions


def prompt_ids(tokenizer, n: int):
    import torch

    ids = tokenizer.encode(PROMPT_TEXT)
    reps = -(-n // ids.shape[-1])
    return torch.cat([ids] * reps, dim=-1)[:, :n]


def measure_cell(b: vr.BranchDir, cache_name: str, context: int, *, loader: str, prompt_tokens: int,
                 new_tokens: int, tokenizers: dict) -> tuple[vr.Measurement, str]:
    import torch
    import exllamav2
    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob, ExLlamaV2Sampler

    cache_cls = getattr(exllamav2, CACHE_CLASSES[cache_name])
    seq = -(-context // 256) * 256  # the dynamic generator pages the cache in 256-token pages
    attention, paged = attention_backend()

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()

    config = ExLlamaV2Config(str(b.path))
    config.max_seq_len = seq
    model = ExLlamaV2(config)
    if loader == "autosplit":
        cache = cache_cls(model, max_seq_len=seq, lazy=True)
        model.load_autosplit(cache)
    else:
        # TabbyAPI (backends/exllamav2/model.py): load, create the cache, then "test VRAM allocation with a
        # full-length forward pass" that stops before the lm_head.
        model.load()
        cache = cache_cls(model, max_seq_len=seq)
        test_ids = torch.zeros((1, min(config.max_input_len, seq)), dtype=torch.long)
        model.forward(test_ids, cache=cache, preprocess_only=True)
        cache.current_seq_len = 0
    torch.cuda.synchronize()
    load_peak = torch.cuda.max_memory_allocated()
    reserved_peak = torch.cuda.max_memory_reserved()
    torch.cuda.reset_peak_memory_stats()

    if b.path not in tokenizers:
        tokenizers[b.path] = ExLlamaV2Tokenizer(config)
    tokenizer = tokenizers[b.path]
    generator = ExLlamaV2DynamicGenerator(model=model, cache=cache, tokenizer=tokenizer, paged=paged)
    n_prompt = max(1, min(prompt_tokens, seq - new_tokens - 1))
    job = ExLlamaV2DynamicJob(input_ids=prompt_ids(tokenizer, n_prompt), max_new_tokens=new_tokens,
                              gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[])
    generator.enqueue(job)
    text, generated = "", 0
    while generator.num_remaining_jobs():
        for r in generator.iterate():
            if r.get("stage") == "streaming":
                text += r.get("text", "")
                if r.get("eos"):
                    generated = int(r.get("new_tokens", generated))
    torch.cuda.synchronize()
    gen_peak = torch.cuda.max_memory_allocated()
    reserved_peak = max(reserved_peak, torch.cuda.max_memory_reserved())
    free, total = torch.cuda.mem_get_info()
    used = total - free
    context_bytes = used - torch.cuda.memory_reserved()

    del job, generator
    cache = None
    model.unload()
    del model, cache
    gc.collect()
    torch.cuda.empty_cache()

    m = vr.Measurement(
        model=b.model, branch=b.branch, bits=b.bits, head_bits=b.head_bits, cache=cache_name, context=context,
        load_peak_allocated=load_peak, gen_peak_allocated=gen_peak, peak_reserved=reserved_peak,
        cuda_context=context_bytes, allocated_before=before, device_used_after=used, loader=loader,
        attention=attention, prompt_tokens=n_prompt, new_tokens=generated or new_tokens,
    )
    return m, text


def branch_record(b: vr.BranchDir, source: Path) -> dict:
    from quantkit.model import read_local_tensors

    exl2 = {n: t.nbytes for n, t in read_local_tensors(b.path).items()}
    src = {n: t.shape for n, t in read_local_tensors(source).items()}
    got = vr.achieved_bpw(exl2, src)
    return {"model": b.model, "branch": b.branch, "bits": b.bits, "head_bits": b.head_bits, **got,
            "bpw_ok": vr.bpw_ok(b.bits, got["decoder_bpw"]), "files": sorted(p.name for p in b.path.iterdir())}


def main(argv: list[str] | None = None) -> int:
    from quantkit.units import parse_context, split_list

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", nargs=3, action="append", metavar=("NAME", "SOURCE", "WORK"), default=[],
                    help="a model name, its source folder and its quantkit work folder (WORK/out/<branch>/)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--contexts", default="4k,8k,16k,32k")
    ap.add_argument("--caches", default="fp16,q4,q8,q6", help="measured in this order, every model, before the next cache")
    ap.add_argument("--loader", choices=["tabby", "autosplit"], default="tabby",
                    help="how to load, and what the compared estimate assumes (quantkit vram --loader)")
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--deadline", type=float, help="epoch seconds; cells not started 20 s before it are skipped")
    ap.add_argument("--stages", type=Path, help="prove.sh's stages.tsv, copied into results.json")
    ap.add_argument("--command", default=" ".join(shlex.quote(a) for a in sys.argv))
    ap.add_argument("--report-only", metavar="ERROR",
                    help="the extension did not build: write results.json and summary.md with the stages and this error, measure nothing")
    args = ap.parse_args(argv)
    contexts = [parse_context(c) for c in split_list(args.contexts)]
    caches = split_list(args.caches)

    device, versions = device_and_versions(exllamav2_built=args.report_only is None)
    report = vr.Report(command=args.command, date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       device=device, versions=versions, stages=vr.read_stages(args.stages) if args.stages else [])
    if args.report_only is not None:
        report.errors.append(args.report_only)
        report.write(args.out)
        return 1
    branches: list[vr.BranchDir] = []
    estimates: dict[tuple[str, str], dict] = {}
    # The estimate must assume what this machine does: without flash-attn the generator runs unpaged and
    # attention copies K/V per query head (quantkit vram --no-flash-attn).
    flash_attn = attention_backend()[1]
    for name, source, work in args.case:
        found = vr.discover_branches(name, Path(work))
        if not found:
            report.errors.append(f"{name}: no converted branch under {work}/out")
        for b in found:
            try:
                report.branches.append(branch_record(b, Path(source)))
                estimates[(b.model, b.branch)] = vr.run_quantkit_vram(b.path, bits=b.bits, head_bits=b.head_bits,
                                                                      contexts=contexts, caches=caches,
                                                                      loader=args.loader, flash_attn=flash_attn)
                branches.append(b)
            except Exception as exc:  # noqa: BLE001 - recorded, the other branches go on
                report.errors.append(f"{b.model} {b.branch}: {exc.__class__.__name__}: {exc}")
    report.write(args.out)

    tokenizers: dict = {}
    sampled: set[tuple[str, str]] = set()
    for cache in caches:
        for b in branches:
            for ctx in contexts:
                cell = {"model": b.model, "branch": b.branch, "cache": cache, "context": ctx}
                if args.deadline and time.time() > args.deadline - 20:
                    report.skipped.append(cell)
                    continue
                try:
                    m, text = measure_cell(b, cache, ctx, loader=args.loader, prompt_tokens=args.prompt_tokens,
                                           new_tokens=args.new_tokens, tokenizers=tokenizers)
                except Exception as exc:  # noqa: BLE001 - one failed cell must not lose the others
                    report.errors.append(f"{b.model} {b.branch} {cache} {ctx}: {exc.__class__.__name__}: {exc}")
                    gc.collect()
                    continue
                report.add(m, estimates[(b.model, b.branch)][(cache, ctx)])
                if (b.model, b.branch) not in sampled:
                    sampled.add((b.model, b.branch))
                    report.generations.append({"model": b.model, "branch": b.branch, "cache": cache, "context": ctx,
                                               "prompt_tokens": m.prompt_tokens, "new_tokens": m.new_tokens, "text": text})
                report.write(args.out)  # after every cell: a run cut off at its time limit keeps what it measured
                print(f"{b.model} {b.branch} {cache} {ctx}: measured {m.measured_bytes / vr.GiB:.3f} GiB, "
                      f"estimated {report.rows[-1]['estimated_bytes'] / vr.GiB:.3f} GiB", flush=True)
    report.write(args.out)
    print(f"{len(report.rows)} cells measured, {len(report.skipped)} skipped, {len(report.errors)} errors -> {args.out}")
    return 1 if report.errors and not report.rows else 0


if __name__ == "__main__":
    sys.exit(main())
