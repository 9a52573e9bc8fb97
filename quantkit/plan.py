"""The VRAM plan: every (branch, cache mode, context) cell for a model, and what fits a given card."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from quantkit.branches import Branch
from quantkit.model import Model
from quantkit.vram import PAGE_SIZE, CacheMode, estimate, check_context

#: Cache modes from best to most compact quality for the recommendation; FP8 last because exllamav2's
#: dynamic generator refuses ExLlamaV2Cache_8bit ("Use either FP16 or Q4").
CACHE_PREFERENCE = (CacheMode.FP16, CacheMode.Q8, CacheMode.Q6, CacheMode.Q4, CacheMode.FP8)


class PlanRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    branch: str
    bits: float
    head_bits: int
    cache: str
    context: int
    total_bytes: int
    components: dict[str, int]


class Plan(BaseModel):
    """The planner's answer; `rows` is the stable JSON interface (one row per bits x cache x context)."""

    model_config = ConfigDict(frozen=True)

    model: str
    rows: list[PlanRow]
    embeddings_ram_bytes: int
    weights_from: str  # "safetensors headers" | "bits x parameters"
    warnings: list[str]
    descriptions: dict[str, str]


def context_warnings(model: Model, contexts: list[int], caches: list[CacheMode]) -> list[str]:
    out = []
    limit = model.shape.max_positions
    for c in contexts:
        if c > limit:
            out.append(
                f"context {c} is beyond {model.name}'s max_position_embeddings ({limit}): quality degrades "
                "there unless you load it with RoPE scaling (exllamav2 scale_pos_emb / alpha)"
            )
        if c % PAGE_SIZE:
            out.append(f"context {c} is rounded up to {-(-c // PAGE_SIZE) * PAGE_SIZE}: exllamav2's dynamic generator pages the cache in {PAGE_SIZE}-token pages")
    if CacheMode.FP8 in caches:
        out.append("fp8 cache (ExLlamaV2Cache_8bit) works only with exllamav2's legacy generators; the dynamic generator (TabbyAPI) refuses it")
    return out


def make_plan(model: Model, branches: list[Branch], contexts: list[int], caches: list[CacheMode]) -> Plan:
    for c in contexts:
        check_context(c)
    rows: list[PlanRow] = []
    measured = False
    ram = 0
    for br in branches:
        for cache in caches:
            for ctx in contexts:
                e = estimate(model, bits=br.bits, head_bits=br.head_bits, context=ctx, cache=cache)
                measured, ram = e.measured_weights, e.embeddings_ram
                rows.append(PlanRow(branch=br.name, bits=br.bits, head_bits=br.head_bits, cache=cache.value,
                                    context=ctx, total_bytes=e.total, components=e.components))
    return Plan(
        model=model.name,
        rows=rows,
        embeddings_ram_bytes=ram,
        weights_from="safetensors headers" if measured else "bits x parameters",
        warnings=context_warnings(model, contexts, caches),
        descriptions={b.name: b.description for b in branches},
    )


class FitRow(BaseModel):
    model_config = ConfigDict(frozen=True)

    branch: str
    bits: float
    head_bits: int
    cache: str
    max_context: int  # 0: does not load at all
    beyond_model_max: bool  # past max_position_embeddings: needs RoPE scaling for quality


class Fit(BaseModel):
    model_config = ConfigDict(frozen=True)

    model: str
    gpu_bytes: int
    target_context: int
    rows: list[FitRow]
    pick: FitRow | None
    reason: str


def longest_context(model: Model, branch: Branch, cache: CacheMode, gpu_bytes: int, limit: int) -> int:
    """The longest context (a multiple of the 256-token page, up to `limit`) whose estimate fits."""
    def fits(ctx: int) -> bool:
        return estimate(model, bits=branch.bits, head_bits=branch.head_bits, context=ctx, cache=cache).total <= gpu_bytes

    lo, hi = 0, limit // PAGE_SIZE  # in pages; the estimate grows with context, so bisect
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * PAGE_SIZE):
            lo = mid
        else:
            hi = mid - 1
    return lo * PAGE_SIZE


def fit_gpu(model: Model, branches: list[Branch], caches: list[CacheMode], gpu_bytes: int, target_context: int) -> Fit:
    # Search up to the larger of the model's own limit and the context asked for: cards list 32k for
    # 8k models, since exllamav2 can stretch RoPE.
    limit = max(model.shape.max_positions, target_context) // PAGE_SIZE * PAGE_SIZE or PAGE_SIZE
    target = min(target_context, limit)
    rows = []
    for br in branches:
        for cache in caches:
            n = longest_context(model, br, cache, gpu_bytes, limit)
            rows.append(FitRow(branch=br.name, bits=br.bits, head_bits=br.head_bits, cache=cache.value,
                               max_context=n, beyond_model_max=n > model.shape.max_positions))
    order = {c.value: i for i, c in enumerate(CACHE_PREFERENCE)}
    ranked = sorted(rows, key=lambda r: (-r.bits, order[r.cache]))
    pick = next((r for r in ranked if r.max_context >= target), None)
    if pick is not None:
        reason = f"the highest bitrate that holds {target} tokens of context with the best cache that fits"
    else:
        loadable = [r for r in ranked if r.max_context > 0]
        pick = max(loadable, key=lambda r: (r.max_context, r.bits), default=None)
        reason = (f"nothing holds {target} tokens; this gives the longest context" if pick
                  else "no branch loads on this card even with the smallest context")
    return Fit(model=model.name, gpu_bytes=gpu_bytes, target_context=target, rows=rows, pick=pick, reason=reason)
