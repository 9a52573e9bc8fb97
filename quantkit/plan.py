"""The VRAM plan: every (branch, cache mode, context) cell for a model, and what to pick for a given card.

The pick policy (`fit_gpu`), as an experienced EXL2 user chooses:
  1. the target context is the model's native context (max_position_embeddings, on the 256-token page),
     unless the user asks for another; past native it needs RoPE scaling, and the pick says how much;
  2. the cache modes are FP16, Q8, Q6 and Q4 (FP8 never: the dynamic generator refuses
     ExLlamaV2Cache_8bit);
  3. among what holds the target within the card less the headroom: the highest bitrate first, then the
     better cache; a "tight fit" (under 0.5 GiB to spare) only when nothing fits with room to spare;
  4. when nothing holds the target, the longest context that something holds (halving, down to
     `MIN_CONTEXT`), with the same order; below that there is no pick.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantkit import EXLLAMAV2_VERSION
from quantkit.branches import Branch
from quantkit.model import Model
from quantkit.units import format_gib
from quantkit.vram import (
    CUDA_CONTEXT_BYTES,
    MAX_BATCH_SIZE,
    MAX_CONTEXT,
    MAX_INPUT_LEN,
    MiB,
    PAGE_SIZE,
    CacheMode,
    Loader,
    check_context,
    estimate,
)

#: Bumped when a key of the JSON output changes meaning or goes away (adding keys does not bump it).
SCHEMA_VERSION = 2

#: Marks a figure past the model's native context, in every rendering (table, markdown, the card).
BEYOND_MARK = "†"

#: Cache modes the pick considers, best first: Q8 and Q6 are practically lossless, Q4 close behind.
#: FP8 (ExLlamaV2Cache_8bit) is never picked: generator/dynamic.py asserts it is not used.
PICK_CACHES = (CacheMode.FP16, CacheMode.Q8, CacheMode.Q6, CacheMode.Q4)
CACHE_RANK = {c: i for i, c in enumerate((*PICK_CACHES, CacheMode.FP8))}

#: Left free on the card by default: on a desktop the card also drives the displays, and the compositor
#: and a browser hold a few hundred MiB of it. The estimate already counts the CUDA context (600 MiB).
#: A headless server can pass --headroom 0; a busy desktop 1GiB.
DEFAULT_HEADROOM_BYTES = 512 * MiB
#: A pick with less than this to spare beyond the headroom is flagged as a tight fit: the estimate's
#: own margin (CUDA context, allocator) is about this size.
TIGHT_MARGIN_BYTES = 512 * MiB
#: Shorter than this is no use for chat; the fallback stops here (exllamav2's prompt chunk size).
MIN_CONTEXT = MAX_INPUT_LEN


class Assumptions(BaseModel):
    """What every figure of a plan assumes, for scripts to check before they trust the numbers."""

    model_config = ConfigDict(frozen=True)

    exllamav2: str = EXLLAMAV2_VERSION
    loader: Loader
    flash_attn: bool
    generator: str = "dynamic"
    paged: bool
    chunk_size: int = MAX_INPUT_LEN
    max_batch_size: int = MAX_BATCH_SIZE
    page_size: int = PAGE_SIZE
    gpus: int = 1
    cuda_context_bytes: int = CUDA_CONTEXT_BYTES


def assumptions(loader: Loader, flash_attn: bool) -> Assumptions:
    return Assumptions(loader=loader, flash_attn=flash_attn, paged=flash_attn)


class PlanRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    branch: str
    bits: float
    head_bits: int
    cache: str
    context: int
    total_bytes: int
    components: dict[str, int]
    beyond_native: bool
    weights_from: str


class Plan(BaseModel):
    """The planner's answer; `rows` is the stable JSON interface (one row per bits x cache x context)."""

    model_config = ConfigDict(frozen=True)

    model: str
    rows: list[PlanRow]
    embeddings_ram_bytes: int
    weights_from: str  # "safetensors headers" | "bits x parameters" | "safetensors headers and bits x parameters"
    warnings: list[str]
    descriptions: dict[str, str]
    native_context: int = 0  # 0: unknown (a plan stitched from several)
    assumptions: Assumptions = Assumptions(loader=Loader.TABBY, flash_attn=True, paged=True)



def rope_scale(native: int, context: int) -> float:
    return context / native if context > native else 1.0


def rope_alpha(scale: float) -> float:
    """NTK alpha for a context `scale` times native: TabbyAPI's `calculate_rope_alpha` fit (what it sets
    when a user raises max_seq_len past the model's own), given so the pick can say what to load with."""
    return 1.0 if scale <= 1 else -0.13436 + 0.80541 * scale + 0.28833 * scale**2


def context_warnings(model: Model, contexts: list[int], caches: list[CacheMode]) -> list[str]:
    out = []
    native = model.native_context
    beyond = sorted({c for c in contexts if c > native})
    if beyond:
        scales = " to ".join(dict.fromkeys(f"x{rope_scale(native, c):.3g}" for c in (beyond[0], beyond[-1])))
        out.append(f"{'context' if len(beyond) == 1 else 'contexts'} {', '.join(map(str, beyond))} {'is' if len(beyond) == 1 else 'are'} beyond {model.name}'s native "
                   f"context ({native} tokens): marked {BEYOND_MARK}; loading there needs RoPE scaling {scales} "
                   f"(exllamav2 scale_alpha_value ~{rope_alpha(rope_scale(native, beyond[0])):.2f} for the first), "
                   "and quality degrades")
    for c in contexts:
        if c % PAGE_SIZE:
            out.append(f"context {c} is rounded up to {-(-c // PAGE_SIZE) * PAGE_SIZE}: exllamav2's dynamic generator pages the cache in {PAGE_SIZE}-token pages")
    if CacheMode.FP8 in caches:
        out.append("fp8 cache (ExLlamaV2Cache_8bit) works only with exllamav2's legacy generators; the dynamic generator (TabbyAPI) refuses it")
    return out


def model_warnings(model: Model, *, flash_attn: bool) -> list[str]:
    out = []
    if model.adapter is not None:
        out.append(f"sized as the adapted model: {model.adapter.summary()}")
    o = model.native_override
    if o is not None:
        out.append(f"native context taken as {o.native} tokens, not the {o.claimed} config.json claims: {o.reason}")
    if not flash_attn and model.shape.heads != model.shape.kv_heads:
        out.append("without flash-attn the dynamic generator runs unpaged (one sequence at a time) and attention copies "
                   "K/V to every query head: counted under attention_copies")
    return out


def _weights_from(flags: set[bool]) -> str:
    if flags == {True}:
        return "safetensors headers"
    if flags == {False} or not flags:
        return "bits x parameters"
    return "safetensors headers and bits x parameters"


def make_plan(model: Model, branches: list[Branch], contexts: list[int], caches: list[CacheMode], *,
              loader: Loader = Loader.TABBY, flash_attn: bool = True) -> Plan:
    for c in contexts:
        check_context(c)
    native = model.native_context
    rows: list[PlanRow] = []
    measured: set[bool] = set()
    ram = 0
    for br in branches:
        for cache in caches:
            for ctx in contexts:
                e = estimate(model, bits=br.bits, head_bits=br.head_bits, context=ctx, cache=cache, loader=loader, flash_attn=flash_attn)
                measured.add(e.measured_weights)
                ram = e.embeddings_ram
                rows.append(PlanRow(branch=br.name, bits=br.bits, head_bits=br.head_bits, cache=cache.value, context=ctx,
                                    total_bytes=e.total, components=e.components, beyond_native=ctx > native,
                                    weights_from=_weights_from({e.measured_weights})))
    return Plan(
        model=model.name,
        rows=rows,
        embeddings_ram_bytes=ram,
        weights_from=_weights_from(measured),
        warnings=model_warnings(model, flash_attn=flash_attn) + context_warnings(model, contexts, caches),
        descriptions={b.name: b.description for b in branches},
        native_context=native,
        assumptions=assumptions(loader, flash_attn),
    )


# ---- what fits a card ---------------------------------------------------------------------------------


class FitRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    branch: str
    bits: float
    head_bits: int
    cache: str
    max_context: int  # the longest context within the budget, up to the search limit; 0: does not load
    beyond_native: bool  # max_context is past the native context: needs RoPE scaling for quality


class Pick(BaseModel):
    model_config = ConfigDict(frozen=True)

    branch: str
    bits: float
    head_bits: int
    cache: str
    context: int  # the context picked: the target, or the fallback
    max_context: int  # the longest context this branch and cache hold on the card (up to the search limit)
    total_bytes: int  # at `context`
    spare_bytes: int  # the card less the estimate less the headroom
    beyond_native: bool
    tight: bool


class Fit(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    gpu_bytes: int
    headroom_bytes: int
    budget_bytes: int
    native_context: int
    target_context: int
    rope_scale: float  # target / native when the target is past native, else 1
    rows: list[FitRow]
    pick: Pick | None
    reason: str
    caveats: list[str]
    sentence: str


def _page_floor(n: int) -> int:
    return n // PAGE_SIZE * PAGE_SIZE if n >= PAGE_SIZE else n


def longest_context(model: Model, branch: Branch, cache: CacheMode, budget: int, limit: int, *,
                    loader: Loader, flash_attn: bool) -> int:
    """The longest context (a multiple of the 256-token page, up to `limit`) whose estimate fits `budget`."""
    def fits(ctx: int) -> bool:
        return estimate(model, bits=branch.bits, head_bits=branch.head_bits, context=ctx, cache=cache,
                        loader=loader, flash_attn=flash_attn).total <= budget

    if limit < PAGE_SIZE:  # a toy model with a native context under one page
        return limit if fits(limit) else 0
    lo, hi = 0, limit // PAGE_SIZE  # in pages; the estimate grows with context, so bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * PAGE_SIZE):
            lo = mid
        else:
            hi = mid - 1
    return lo * PAGE_SIZE


def _fallback_contexts(target: int) -> list[int]:
    out = [target]
    c = target
    while c // 2 >= MIN_CONTEXT:
        c = _page_floor(c // 2)
        out.append(c)
    return out


def fit_gpu(model: Model, branches: list[Branch], caches: list[CacheMode], gpu_bytes: int, *,
            target_context: int | None = None, headroom_bytes: int = DEFAULT_HEADROOM_BYTES,
            loader: Loader = Loader.TABBY, flash_attn: bool = True, adapter_note: bool = True) -> Fit:
    """What to load on a card of `gpu_bytes`, by the policy in this module's docstring.

    Args:
        target_context: the context asked for; None means the model's native context.
        headroom_bytes: left free on the card (must be smaller than it: the CLI checks).
    """
    native = model.native_context
    target = _page_floor(min(target_context or native, MAX_CONTEXT))
    budget = gpu_bytes - headroom_bytes
    limit = max(_page_floor(native), target)
    usable = [c for c in caches if c is not CacheMode.FP8]
    rows = []
    for br in branches:
        for cache in usable:
            n = longest_context(model, br, cache, budget, limit, loader=loader, flash_attn=flash_attn)
            rows.append(FitRow(branch=br.name, bits=br.bits, head_bits=br.head_bits, cache=cache.value,
                               max_context=n, beyond_native=n > native))
    by_branch = {b.name: b for b in branches}

    def total(r: FitRow, ctx: int) -> int:
        br = by_branch[r.branch]
        return estimate(model, bits=br.bits, head_bits=br.head_bits, context=ctx, cache=CacheMode(r.cache),
                        loader=loader, flash_attn=flash_attn).total

    pick = None
    for ctx in _fallback_contexts(target):
        held = [(r, total(r, ctx)) for r in rows if r.max_context >= ctx]
        if not held:
            continue
        # A tight fit is taken only when nothing at this context fits with room to spare.
        comfortable = [(r, t) for r, t in held if budget - t >= TIGHT_MARGIN_BYTES]
        best, t = max(comfortable or held, key=lambda x: (x[0].bits, -CACHE_RANK[CacheMode(x[0].cache)]))
        pick = Pick(branch=best.branch, bits=best.bits, head_bits=best.head_bits, cache=best.cache, context=ctx,
                    max_context=best.max_context, total_bytes=t, spare_bytes=budget - t, beyond_native=ctx > native,
                    tight=budget - t < TIGHT_MARGIN_BYTES)
        break
    bare = None
    if pick is None and headroom_bytes > 0:
        bare = fit_gpu(model, branches, caches, gpu_bytes, target_context=target_context, headroom_bytes=0,
                       loader=loader, flash_attn=flash_attn, adapter_note=False).pick
    if pick is None:
        reason = (f"nothing fits {format_gib(budget)} ({format_gib(gpu_bytes)} less {format_gib(headroom_bytes)} headroom) "
                  f"even at {min(MIN_CONTEXT, target)} tokens")
    elif pick.context == target:
        reason = "the highest bitrate that holds the target context, with the best cache that fits"
    else:
        reason = f"nothing holds {target} tokens, so the longest context something holds, at the highest bitrate"
    caveats = pick_caveats(model, pick, target=target, asked=target_context is not None, native=native, headroom_bytes=headroom_bytes, caches=caches,
                           loader=loader, flash_attn=flash_attn, adapter_note=adapter_note, branches=branches)
    if bare is not None:
        caveats.insert(0, f"with nothing else on the GPU (--headroom 0), {bare.branch} with {bare.cache.upper()} cache "
                          f"would hold {bare.context} tokens, {format_gib(bare.spare_bytes)} to spare")
    fit = Fit(model=model.name, gpu_bytes=gpu_bytes, headroom_bytes=headroom_bytes, budget_bytes=budget,
              native_context=native, target_context=target, rope_scale=rope_scale(native, target), rows=rows,
              pick=pick, reason=reason, caveats=caveats, sentence="")
    return fit.model_copy(update={"sentence": pick_sentence(fit)})



def pick_caveats(model: Model, pick: Pick | None, *, target: int, asked: bool, native: int, headroom_bytes: int,
                 caches: list[CacheMode], loader: Loader, flash_attn: bool, adapter_note: bool,
                 branches: list[Branch]) -> list[str]:
    """Every caveat the table shows, in words, for the one sentence a user reads."""
    out: list[str] = []
    if pick is None:
        lowest = min((b.bits for b in branches), default=0)
        out.append(f"try a lower bitrate than {lowest:g} bpw (e.g. --bits 4.0,3.5) or a larger card")
        return out
    if pick.beyond_native:
        scale = rope_scale(native, pick.context)
        out.append(f"beyond the native {native} tokens: load with RoPE scaling x{scale:.3g} "
                   f"(scale_alpha_value ~{rope_alpha(scale):.2f}, or scale_pos_emb {scale:.3g}); quality degrades there")
    elif pick.context < target:
        wanted = f"the {target} tokens asked for" if asked else f"the native {target} tokens"
        out.append(f"shorter than {wanted}: nothing holds that on this card")
    elif pick.context < native:
        out.append(f"below the native {native} tokens, as asked")
    if pick.tight:
        out.append(f"tight fit: {format_gib(max(pick.spare_bytes, 0))} to spare beyond the {format_gib(headroom_bytes)} headroom; "
                   "close other programs using the GPU, or take the next smaller cache")
    if CacheMode.FP8 in caches:
        out.append("fp8 cache not considered: the dynamic generator refuses ExLlamaV2Cache_8bit")
    if not model.headers_describe(pick.bits):
        out.append("weights estimated as bits x parameters; a converted branch is within ~1 %")
    if not flash_attn:
        out.append("without flash-attn: unpaged generator, one sequence at a time")
    if loader is Loader.AUTOSPLIT:
        out.append("loaded with load_autosplit, which peaks higher while loading")
    if adapter_note and model.adapter is not None:
        a = model.adapter
        out.append(f"sized as {a.source_arch} adapted to {a.target_arch}" + (" (experimental: not yet proven on a GPU)" if a.experimental else ""))
    return out


def pick_sentence(fit: Fit) -> str:
    """One sentence that carries the pick and every caveat."""
    p = fit.pick
    if p is None:
        return f"Pick: none: {fit.reason}; " + "; ".join(fit.caveats) + "."
    where = "the native context" if p.context == fit.native_context or (p.context == _page_floor(fit.native_context) and not p.beyond_native) else ""
    ctx = f"{p.context} tokens" + (f" ({where})" if where else "")
    text = (f"Pick: {p.branch} ({p.bits:g} bpw, lm_head {p.head_bits}) with {p.cache.upper()} cache at {ctx}: "
            f"{format_gib(p.total_bytes)} of {format_gib(fit.gpu_bytes)} with {format_gib(fit.headroom_bytes)} headroom; {fit.reason}")
    if fit.caveats:
        text += ". Note: " + "; ".join(fit.caveats)
    return text + "."
