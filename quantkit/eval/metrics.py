"""The figures: perplexity, KL divergence against the reference, top-1 agreement (torch, in the worker).

The reference is cached per row as its top-k log-probabilities plus the log of the rest's mass
(`rest_logp`), never the whole vocabulary per token (a 128k vocabulary over 40k tokens would be 20 GB).
KL(P_ref || Q) is then computed over k + 1 outcomes: the top-k tokens and "any other token", with Q's
rest mass computed from its full distribution the same way. Grouping outcomes can only lower KL, so the
figure is a lower bound of the full-vocabulary KL, exact when k covers the vocabulary; the reference
against itself is exactly 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def row_path(reference: Path, i: int) -> Path:
    return reference / f"row-{i:05d}.safetensors"


def non_finite(logits: Any) -> int:
    import torch

    return int((~torch.isfinite(logits)).sum().item())


def _rest_logp(logp: Any, idx: Any) -> Any:
    """log of the probability mass outside `idx` per token (-inf when `idx` covers the vocabulary)."""
    import torch

    masked = logp.scatter(-1, idx, float("-inf"))
    return torch.logsumexp(masked, dim=-1)


def save_reference_row(reference: Path, i: int, ids: Any, logits: Any, *, top_k: int) -> None:
    import torch
    from safetensors.torch import save_file

    logp = torch.log_softmax(logits.double(), dim=-1)
    k = min(top_k, logp.shape[-1])
    top, idx = torch.topk(logp, k, dim=-1)
    target = logp[:-1].gather(-1, ids[1:].long().view(-1, 1)).view(-1)
    tensors = {"topk_logp": top.float().contiguous(), "topk_idx": idx.int().contiguous(),
               "rest_logp": _rest_logp(logp, idx).float().contiguous(), "target_logp": target.float().contiguous()}
    reference.mkdir(parents=True, exist_ok=True)
    tmp = row_path(reference, i).with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(row_path(reference, i))


def load_reference_row(reference: Path, i: int) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(row_path(reference, i)))


def compare_row(ref: dict[str, Any], ids: Any, logits: Any) -> dict[str, Any]:
    """Per-token KL(ref || q), top-1 agreement and q's negative log-likelihood of the next token."""
    import torch

    logq = torch.log_softmax(logits.double(), dim=-1)
    idx = ref["topk_idx"].long()
    p_logp = ref["topk_logp"].double()
    q_top = logq.gather(-1, idx)
    kl = (p_logp.exp() * (p_logp - q_top)).sum(-1)
    p_rest = ref["rest_logp"].double()
    q_rest = _rest_logp(logq, idx)
    rest = torch.where(torch.isfinite(p_rest), p_rest.exp() * (p_rest - q_rest), torch.zeros_like(p_rest))
    kl = (kl + rest).clamp_min(0.0)  # float rounding can leave -1e-17 where the distributions agree
    top1 = (logq.argmax(-1) == idx[:, 0]).double()
    nll = -logq[:-1].gather(-1, ids[1:].long().view(-1, 1)).view(-1)
    return {"kl": kl, "top1": top1, "nll": nll}


class Accumulator:
    """Per-token figures over every row, summarised at the end."""

    def __init__(self) -> None:
        self.kl: list[Any] = []
        self.top1: list[Any] = []
        self.nll: list[Any] = []

    def add(self, row: dict[str, Any]) -> None:
        self.kl.append(row["kl"])
        self.top1.append(row["top1"])
        self.nll.append(row["nll"])

    def summary(self) -> dict[str, Any]:
        import torch

        kl = torch.cat(self.kl)
        return {"tokens": int(kl.numel()), "perplexity": _ppl(torch.cat(self.nll)), "kl_mean": float(kl.mean()),
                "kl_median": float(kl.median()), "kl_p99": float(torch.quantile(kl, 0.99)),
                "top1_agreement": float(torch.cat(self.top1).mean())}


def _ppl(nll: Any) -> float:
    return float(math.exp(float(nll.mean())))


def reference_summary(reference: Path, rows: int) -> dict[str, Any]:
    import torch

    nll = torch.cat([-load_reference_row(reference, i)["target_logp"].double() for i in range(rows)])
    return {"tokens": int(nll.numel()) + rows, "perplexity": _ppl(nll)}
