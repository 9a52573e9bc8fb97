"""`quantkit vram`: the planner's command. Parses options, calls the core, renders."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from quantkit import EXLLAMAV2_VERSION
from quantkit.branches import Branch, branches_for, default_branches, load_branch_file
from quantkit.cli.output import Output
from quantkit.model import load_model
from quantkit.plan import Fit, Plan, fit_gpu, make_plan
from quantkit.tables import cache_statement, context_label, markdown_table
from quantkit.units import format_gib, parse_bits, parse_context, parse_size, split_list
from quantkit.vram import check_head_bits, parse_cache

DEFAULT_CONTEXTS = "4k,8k,16k,32k"


def markdown(plan: Plan, caches: list[str]) -> str:
    parts = []
    for cache in caches:
        parts.append(cache_statement(plan, cache) + "\n")
        parts.append(markdown_table(plan, cache))
        parts.append("")
    return "\n".join(parts).rstrip() + "\n"


def rich_tables(plan: Plan, caches: list[str]) -> list[Table]:
    contexts = sorted({r.context for r in plan.rows})
    t = Table(title=f"VRAM plan for {plan.model} (exllamav2 {EXLLAMAV2_VERSION}, weights from {plan.weights_from})")
    for col in ("Branch", "Bits", "Head", "Cache"):
        t.add_column(col)
    for c in contexts:
        t.add_column(context_label(c), justify="right")
    for br in dict.fromkeys(r.branch for r in plan.rows):
        for cache in caches:
            cells = {r.context: r for r in plan.rows if r.branch == br and r.cache == cache}
            first = cells[contexts[0]]
            t.add_row(br, f"{first.bits:g}", str(first.head_bits), cache, *(format_gib(cells[c].total_bytes) for c in contexts))
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
    return [t, b]


def fit_table(fit: Fit) -> Table:
    t = Table(title=f"What fits in {format_gib(fit.gpu_bytes)} ({fit.model})")
    for col in ("Branch", "Bits", "Cache", "Longest context"):
        t.add_column(col, justify="right" if col == "Longest context" else "left")
    for r in fit.rows:
        ctx = "does not load" if r.max_context == 0 else f"{r.max_context}" + (" (beyond model max)" if r.beyond_model_max else "")
        t.add_row(r.branch, f"{r.bits:g}", r.cache, ctx)
    return t


def fit_sentence(fit: Fit) -> str:
    if fit.pick is None:
        return f"Pick: none. {fit.reason}."
    p = fit.pick
    return f"Pick: {p.branch} ({p.bits:g} bpw) with {p.cache} cache, up to {p.max_context} tokens: {fit.reason}."


def _branches(bits: str | None, head_bits: int, branches_file: Path | None) -> list[Branch]:
    check_head_bits(head_bits)
    if branches_file is not None:
        return load_branch_file(branches_file)
    if bits is None:
        return [b.model_copy(update={"head_bits": head_bits}) for b in default_branches()]
    return branches_for([parse_bits(x) for x in split_list(bits)], head_bits)


@click.command()
@click.argument("model")
@click.option("--bits", help="Comma-separated target bitrates (default: the branches/default.toml set, 8.0,6.5,5.0).")
@click.option("--head-bits", type=int, default=8, show_default=True, help="lm_head bits: 2, 3, 4, 5, 6 or 8.")
@click.option("--branches", "branches_file", type=click.Path(path_type=Path, dir_okay=False), help="A branch set file (TOML, like branches/default.toml).")
@click.option("--context", "contexts", default=DEFAULT_CONTEXTS, show_default=True, help="Comma-separated contexts in tokens (4k = 4096).")
@click.option("--cache", "caches", default="fp16", show_default=True, help="Comma-separated cache modes: fp16, fp8, q8, q6, q4.")
@click.option("--format", "fmt", type=click.Choice(["table", "markdown", "json"]), default="table", show_default=True)
@click.option("--gpu", help="A card's memory (e.g. 24GiB): the longest context each branch fits, and which to pick.")
def vram(model: str, bits: str | None, head_bits: int, branches_file: Path | None, contexts: str, caches: str, fmt: str, gpu: str | None) -> None:
    """Plan VRAM for EXL2 quants of MODEL (a folder with config.json, a converted EXL2 folder, or a Hub id).

    Reads config.json and safetensors headers only, never tensor data. A converted folder is sized
    from its real tensors; otherwise from bits x parameters. An architecture exllamav2 lacks but a
    quantkit adapter maps (StableLM, GPT-NeoX; see `quantkit archs`) is sized as the adapted model.

    \b
    Examples:
      quantkit vram examples/llama3-8b
      quantkit vram examples/llama3-8b --cache fp16,q4 --format markdown
      quantkit vram examples/llama3-8b --bits 4.0,3.5 --head-bits 6 --format json
      quantkit vram examples/llama3-8b --gpu 12GiB --cache fp16,q8,q4
      quantkit vram stabilityai/stablelm-zephyr-3b --format json
    """
    out = Output()
    brs = _branches(bits, head_bits, branches_file)
    ctxs = [parse_context(c) for c in split_list(contexts)]
    modes = [parse_cache(c) for c in split_list(caches)]
    gpu_bytes = parse_size(gpu) if gpu is not None else None
    if not ctxs:
        raise click.BadParameter("give at least one context", param_hint="--context")
    m = load_model(model)
    plan = make_plan(m, brs, ctxs, modes)
    if m.adapter is not None:
        out.warn(f"sized as the adapted model: {m.adapter.summary()}")
    for w in plan.warnings:
        out.warn(w)
    fit = fit_gpu(m, brs, modes, gpu_bytes, max(ctxs)) if gpu_bytes is not None else None
    names = [c.value for c in modes]
    if fmt == "json":
        data = {"model": plan.model, "rows": [r.model_dump() for r in plan.rows]}
        if m.adapter is not None:
            data["adapter"] = {"adapter": m.adapter.adapter, "source_arch": m.adapter.source_arch, "target_arch": m.adapter.target_arch,
                               "status": m.adapter.status, "experimental": m.adapter.experimental, "exact": m.adapter.exact,
                               "differences": m.adapter.differences}
        if fit is not None:
            data["fit"] = fit.model_dump()
        out.json(data)
        return
    if fmt == "markdown":
        out.text(markdown(plan, names))
        if fit is not None:
            out.text(fit_sentence(fit))
        return
    for t in rich_tables(plan, names):
        out.rich(t)
    if fit is not None:
        out.rich(fit_table(fit))
        out.rich(fit_sentence(fit))
