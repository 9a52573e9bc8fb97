"""`quantkit vram`: the planner's command. Parses options, calls the core, renders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table
from rich.text import Text

from quantkit import EXLLAMAV2_VERSION
from quantkit.branches import Branch, branches_for, default_branches, load_branch_file
from quantkit.cli.output import Output
from quantkit.errors import InvalidHeadroom, InvalidSize
from quantkit.model import Model, load_model
from quantkit.plan import DEFAULT_HEADROOM_BYTES, PICK_CACHES, SCHEMA_VERSION, Fit, Plan, fit_gpu, make_plan
from quantkit.tables import BEYOND_MARK, beyond_footnote, cache_statement, context_label, markdown_table, vram_cell
from quantkit.units import branch_name, format_gib, parse_bits, parse_context, parse_gpu_size, parse_size, split_list
from quantkit.vram import Loader, achieved_bits, check_head_bits, parse_cache, parse_loader

DEFAULT_CONTEXTS = "4k,8k,16k,32k"


def markdown(plan: Plan, caches: list[str]) -> str:
    parts = []
    for cache in caches:
        parts.append(cache_statement(plan, cache) + "\n")
        parts.append(markdown_table(plan, cache))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def rich_tables(plan: Plan, caches: list[str]) -> list[Any]:
    contexts = sorted({r.context for r in plan.rows})
    t = Table(title=f"VRAM plan for {plan.model} (exllamav2 {EXLLAMAV2_VERSION}, native context {plan.native_context}, "
                    f"weights from {plan.weights_from})")
    for col in ("Branch", "Bits", "Head", "Cache"):
        t.add_column(col)
    for c in contexts:
        t.add_column(context_label(c), justify="right")
    for br in dict.fromkeys(r.branch for r in plan.rows):
        for cache in caches:
            cells = {r.context: r for r in plan.rows if r.branch == br and r.cache == cache}
            first = cells[contexts[0]]
            t.add_row(br, f"{first.bits:g}", str(first.head_bits), cache,
                      *(vram_cell(cells[c]) for c in contexts))
    out: list[Any] = [t]
    if any(r.beyond_native for r in plan.rows):
        out.append(Text(beyond_footnote(plan)))
    largest = contexts[-1]
    b = Table(title=f"Breakdown at {context_label(largest)} context, {caches[0]} cache (GiB)")
    b.add_column("Component")
    branches = list(dict.fromkeys(r.branch for r in plan.rows))
    for br in branches:
        b.add_column(br, justify="right")
    picked = {r.branch: r for r in plan.rows if r.context == largest and r.cache == caches[0]}
    for name in picked[branches[0]].components:
        b.add_row(name, *(f"{picked[br].components[name] / 1024**3:.3f}" for br in branches))
    b.add_row("system RAM (embeddings)", *(f"{plan.embeddings_ram_bytes / 1024**3:.3f}" for _ in branches))
    out.append(b)
    return out


def fit_table(fit: Fit) -> Table:
    t = Table(title=f"Longest context per branch and cache in {format_gib(fit.budget_bytes)} "
                    f"({format_gib(fit.gpu_bytes)} less {format_gib(fit.headroom_bytes)} headroom; native {fit.native_context})")
    for col in ("Branch", "Bits", "Cache", "Longest context"):
        t.add_column(col, justify="right" if col == "Longest context" else "left")
    for r in fit.rows:
        ctx = "does not load" if r.max_context == 0 else f"{r.max_context}" + (f" {BEYOND_MARK} beyond native" if r.beyond_native else "")
        t.add_row(r.branch, f"{r.bits:g}", r.cache, ctx)
    return t


def plan_json(model: Model, plan: Plan, fit: Fit | None) -> dict[str, Any]:
    """The JSON scripts read: `schema_version` changes when a key changes meaning or goes away."""
    data: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "model": plan.model,
        "source": model.source,
        "revision": model.revision,
        "architecture": model.spec.name,
        "native_context": plan.native_context,
        "weights_from": plan.weights_from,
        "embeddings_ram_bytes": plan.embeddings_ram_bytes,
        "assumptions": plan.assumptions.model_dump(mode="json"),
        "warnings": plan.warnings,
        "rows": [r.model_dump(mode="json") for r in plan.rows],
    }
    if model.adapter is not None:
        a = model.adapter
        data["adapter"] = {"adapter": a.adapter, "source_arch": a.source_arch, "target_arch": a.target_arch,
                           "status": a.status, "experimental": a.experimental, "exact": a.exact, "differences": a.differences}
    if fit is not None:
        data["fit"] = fit.model_dump(mode="json")
    return data


def _branches(model: Model, bits: str | None, head_bits: int | None, branches_file: Path | None) -> list[Branch]:
    """What to plan: a branch set, explicit bitrates, the converted model's own bitrate, or the defaults."""
    hb = check_head_bits(head_bits) if head_bits is not None else None
    if branches_file is not None:
        return load_branch_file(branches_file)
    if bits is not None:
        return branches_for([parse_bits(x) for x in split_list(bits)], hb if hb is not None else model.exl2_head_bits or 8)
    if model.is_exl2 and model.tensors:
        # One honest row: what this converted model is, sized from its own headers.
        own = model.exl2_bits if model.exl2_bits is not None else achieved_bits(model)
        name = model.revision or branch_name(own)
        return [Branch(name=name, bits=own, head_bits=model.exl2_head_bits or hb or 8,
                       description="this converted model, sized from its safetensors headers")]
    return [b.model_copy(update={"head_bits": hb}) if hb is not None else b for b in default_branches()]


def parse_headroom(text: str) -> int:
    """"1GiB", "512MiB", "0": the memory left free on the card."""
    if text.strip() in {"0", "0.0"}:
        return 0
    try:
        return parse_size(text)
    except InvalidSize:
        raise InvalidHeadroom(text, "does not parse") from None


@click.command()
@click.argument("model")
@click.option("--revision", help="A branch, tag or commit of a Hub MODEL (USER/REPO:BRANCH says the same for one published branch).")
@click.option("--bits", help="Comma-separated target bitrates (default: the branches/default.toml set, 8.0,6.5,5.0; "
                             "for a converted EXL2 model, its own bitrate).")
@click.option("--head-bits", type=int, help="lm_head bits: 2, 3, 4, 5, 6 or 8 (default 8, or a converted model's own).")
@click.option("--branches", "branches_file", type=click.Path(path_type=Path, dir_okay=False), help="A branch set file (TOML, like branches/default.toml).")
@click.option("--context", "contexts", help=f"Comma-separated contexts in tokens (4k = 4096); table default {DEFAULT_CONTEXTS}. "
                                            "With --gpu the largest is the target (default: the model's native context).")
@click.option("--cache", "caches", help="Comma-separated cache modes: fp16, q8, q6, q4, fp8 (table default fp16; "
                                        "--gpu considers fp16,q8,q6,q4 and never fp8).")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True)
@click.option("--gpu", help="A card's memory (12GiB, 12GB or just 12): the longest context each branch holds, and which to pick.")
@click.option("--headroom", default=f"{DEFAULT_HEADROOM_BYTES / 1024**3:g}GiB", show_default=True,
              help="Memory left free on the card for the desktop and other programs (0 on a headless server).")
@click.option("--loader", "loader_name", default=Loader.TABBY.value, show_default=True,
              help="How the model is loaded: tabby (load() + a prefill-only test forward, as TabbyAPI does) or "
                   "autosplit (load_autosplit: +448 MiB reserves and a test forward's logits while loading).")
@click.option("--no-flash-attn", is_flag=True, help="flash-attn is not installed: the generator runs unpaged and attention copies K/V per query head.")
def vram(model: str, revision: str | None, bits: str | None, head_bits: int | None, branches_file: Path | None,
         contexts: str | None, caches: str | None, fmt: str, gpu: str | None, headroom: str, loader_name: str,
         no_flash_attn: bool) -> None:
    """Plan VRAM for EXL2 quants of MODEL: a folder with config.json, a converted EXL2 folder, a Hub id, or
    USER/REPO:BRANCH (one published EXL2 branch).

    Reads config.json and safetensors headers only, never tensor data. A converted model (a folder, or a
    published branch) is one row at its own bitrate, sized from its real tensors (--bits asks for others,
    sized as bits x parameters). Offline, a Hub model already in the Hugging Face cache is read from there.
    An architecture exllamav2 lacks but a quantkit adapter maps (StableLM, GPT-NeoX; see `quantkit archs`)
    is sized as the adapted model.

    \b
    The figures are the peak over loading and serving with exllamav2's dynamic generator on one GPU:
    weights, lm_head, scratch, RoPE tables, the K/V cache, a 2048-token prompt chunk's activations, the
    CUDA context, and what the loader holds while loading (--loader, --no-flash-attn).

    \b
    With --gpu, the pick (documented policy):
      1. target context: the model's native context (max_position_embeddings, or the trained length
         of a config known to claim more), unless --context asks for another; past native, the RoPE
         scaling it needs is printed (cells past native are marked †);
      2. caches considered: fp16, q8, q6, q4 (never fp8: the dynamic generator refuses it);
      3. within the card less --headroom: the highest bitrate first, then the better cache;
      4. if nothing holds the target: the longest context something holds (halving, down to 2048);
      5. a "tight fit" (under 0.5 GiB to spare beyond the headroom) only when nothing fits with room to spare.

    \b
    Examples:
      quantkit vram examples/llama3-8b
      quantkit vram examples/llama3-8b --gpu 12GiB
      quantkit vram examples/llama3-8b --gpu 8GiB --headroom 1GiB --no-flash-attn
      quantkit vram examples/llama3-8b --cache fp16,q4 --format markdown
      quantkit vram examples/llama3-8b --bits 4.0,3.5 --head-bits 6 --format json
      quantkit vram turboderp/Llama-3-8B-exl2:6.0bpw --gpu 8GiB
      quantkit vram WORK/out/6_5 --loader autosplit --format json
    """
    out = Output()
    ctxs = [parse_context(c) for c in split_list(contexts)] if contexts is not None else None
    if ctxs is not None and not ctxs:
        raise click.BadParameter("give at least one context", param_hint="--context")
    modes = [parse_cache(c) for c in split_list(caches)] if caches is not None else None
    if modes is not None and not modes:
        raise click.BadParameter("give at least one cache mode", param_hint="--cache")
    loader = parse_loader(loader_name)
    gpu_bytes = parse_gpu_size(gpu) if gpu is not None else None
    headroom_bytes = parse_headroom(headroom)
    if gpu_bytes is not None and headroom_bytes >= gpu_bytes:
        raise InvalidHeadroom(headroom, f"is not smaller than the {gpu} card")
    if head_bits is not None:
        check_head_bits(head_bits)
    m = load_model(model, revision=revision)
    brs = _branches(m, bits, head_bits, branches_file)
    flash = not no_flash_attn
    plan = make_plan(m, brs, ctxs or [parse_context(c) for c in split_list(DEFAULT_CONTEXTS)], modes or [PICK_CACHES[0]],
                     loader=loader, flash_attn=flash)
    for w in plan.warnings:
        out.warn(w)
    fit = None
    if gpu_bytes is not None:
        fit = fit_gpu(m, brs, modes or list(PICK_CACHES), gpu_bytes, target_context=max(ctxs) if ctxs else None,
                      headroom_bytes=headroom_bytes, loader=loader, flash_attn=flash)
    names = list(dict.fromkeys(r.cache for r in plan.rows))
    if fmt == "json":
        out.json(plan_json(m, plan, fit))
        return
    if fmt == "markdown":
        out.text(markdown(plan, names))
        if fit is not None:
            out.text(fit.sentence)
        return
    for t in rich_tables(plan, names):
        out.rich(t)
    if fit is not None:
        out.rich(fit_table(fit))
        out.rich(Text(fit.sentence))  # plain text: a sentence is never rich markup
