"""Markdown renderings of a VRAM plan shared by `quantkit vram --format markdown` and the model card."""

from __future__ import annotations

from quantkit import EXLLAMAV2_VERSION
from quantkit.plan import BEYOND_MARK, Plan, PlanRow
from quantkit.units import format_gib
from quantkit.vram import CacheMode


def context_label(ctx: int) -> str:
    return f"{ctx // 1024}k" if ctx % 1024 == 0 else str(ctx)




def vram_cell(row: PlanRow) -> str:
    """A row's total VRAM, marked when its context is beyond the model's native one."""
    return format_gib(row.total_bytes) + (f" {BEYOND_MARK}" if row.beyond_native else "")


def beyond_footnote(plan: Plan) -> str:
    native = f"{plan.native_context} tokens" if plan.native_context else "max_position_embeddings"
    return (f"{BEYOND_MARK} beyond the model's native context ({native}): it needs RoPE scaling "
            "(exllamav2 scale_alpha_value or scale_pos_emb), and quality degrades there.")


def markdown_table(plan: Plan, cache: str, *, sizes: dict[str, int] | None = None,
                   extra: dict[str, dict[str, str]] | None = None) -> str:
    """The seed card's "Available sizes" table for one cache mode (GiB, as those cards meant by "GB").
    Cells past the native context carry `BEYOND_MARK` and a footnote under the table. `extra`: more
    columns after Size, {heading: {branch: cell}} (the card's KL and PPL), "-" where a branch has none."""
    extra = extra or {}
    rows = [r for r in plan.rows if r.cache == cache]
    contexts = sorted({r.context for r in rows})
    head = ["Branch", "Bits", "lm_head bits"] + (["Size"] if sizes else []) + list(extra) + [f"VRAM ({context_label(c)})" for c in contexts] + ["Description"]
    lines = [" | ".join(head) + " |", "|".join(["---"] * len(head)) + "|"]
    branches = list(dict.fromkeys(r.branch for r in rows))
    for br in branches:
        cells = {r.context: r for r in rows if r.branch == br}
        first = cells[contexts[0]]
        line = [br, f"{first.bits:g}" if first.bits % 1 else f"{first.bits:.1f}", str(first.head_bits)]
        if sizes:
            line.append(format_size(sizes.get(br, 0)))
        line += [column.get(br, "-") for column in extra.values()]
        line += [vram_cell(cells[c]) for c in contexts]
        line.append(plan.descriptions.get(br, ""))
        lines.append(" | ".join(line) + " |")
    if any(r.beyond_native for r in rows):
        lines += ["", beyond_footnote(plan)]
    return "\n".join(lines)


def format_size(n: int) -> str:
    """A file size: GiB like the VRAM columns, MiB or KiB below 1 GiB so a small branch does not read 0.0."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1024:.1f} KiB"


def cache_statement(plan: Plan, cache: str) -> str:
    """The sentence above a table saying which cache, generator and weight source its figures assume."""
    return (
        f"VRAM with {cache.upper()} cache ({CacheMode(cache).exl2_class}), estimated by quantkit for exllamav2 "
        f"{EXLLAMAV2_VERSION}'s dynamic generator on one GPU, weights from {plan.weights_from}; token embeddings "
        f"use {format_gib(plan.embeddings_ram_bytes)} of system RAM."
    )

