"""Sharded scoring: the online-softmax partials of one shard, their merge, the final loss (docs/math.md §5).

Rank r of a sharded bank owns the contiguous rows ``[r*ceil(N/W), min((r+1)*ceil(N/W), N))``.
The anchors (and their indices, or only their positives when negatives are drawn from the counter
RNG) are all-gathered; each rank runs the fused kernel on its shard with local indices
``idx - row_start``: a column owned by another rank falls outside the shard and is absent
(csrc/KERNELS.md), so the kernel reads the owned rows in place and returns the owned columns'
LSE, loss and gradients. From those outputs this module recovers the partial statistics of
docs/math.md §1a (softmax-weighted sums with a per-anchor reference maximum ``m`` = the shard's LSE) and
the additive NCE terms of §1b; the partials merge with one MAX and one SUM all-reduce and every
rank forms the loss and gradients of its own anchors. Plain torch reads only the owned positive
rows (one per anchor). Temporaries are bounded by ``chunk`` (anchor-columns per kernel call);
never the (B, K+1, D) gather.

Single bank (``shard_partials``, ``MemoryBank``): ``sampled_contrast_outputs``.
Paired banks (``dual_shard_partials``, ``PairedMemoryBank``): ``dual_sampled_contrast_outputs``,
both CRD directions and the consistency KL (derivation in ``dual_shard_partials``).

Nothing here talks to the process group except ``all_reduce_partials`` (python_tests/test_memory.py
does the same merge in one process).
"""

import math
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..ops.dual_sampled_contrast import dual_sampled_contrast_outputs
from ..ops.sampled_contrast import sampled_contrast_outputs


@dataclass
class Partials:
    """Per-anchor partial statistics of one shard, for all B anchors of the gathered batch.

    ``m`` (B, G): G reference maxima (the owned columns' LSE of each softmax, -inf where none is
    owned), or ``None`` when no softmax statistics were requested. ``scaled``: G tensors (B, P_g),
    sums weighted by ``exp(l - m_g)`` (rescaled by ``exp(m_g - M_g)`` when merged). ``plain``
    (B, Q): additive sums. Column layouts are fixed by the loss type and flags (``*_layout``).
    """

    m: Optional[torch.Tensor]
    scaled: List[torch.Tensor]
    plain: torch.Tensor


def _split(t: torch.Tensor, fields):
    out, col = {}, 0
    for name, width in fields:
        out[name] = t[:, col] if width == 1 else t[:, col : col + width]
        col += width
    return out


def _empty(B, fields_per_group, plain_fields, with_m, acc, dev) -> Partials:
    m = torch.full((B, len(fields_per_group)), -math.inf, dtype=acc, device=dev) if with_m else None
    scaled = [torch.zeros((B, sum(w for _, w in f)), dtype=acc, device=dev) for f in fields_per_group]
    return Partials(m, scaled, torch.zeros((B, sum(w for _, w in plain_fields)), dtype=acc, device=dev))


def _rescale(m_local: torch.Tensor, m_global: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(m_local), torch.exp(m_local - m_global), torch.zeros_like(m_local))


def all_reduce_partials(p: Partials, group) -> Partials:
    """MAX all-reduce of ``m``, rescale, then one SUM all-reduce of everything else."""
    scaled = p.scaled
    m = None
    if p.m is not None:
        m = p.m.clone()
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        w = _rescale(p.m, m)
        scaled = [t * w[:, g : g + 1] for g, t in enumerate(scaled)]
    widths = [t.shape[1] for t in scaled]
    packed = torch.cat(scaled + [p.plain], dim=1)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    parts = list(torch.split(packed, widths + [p.plain.shape[1]], dim=1))
    return Partials(m, parts[:-1], parts[-1])


def _chunks(B: int, n_cols: int, chunk: int):
    step = max(1, chunk // n_cols)
    for b0 in range(0, B, step):
        yield b0, min(B, b0 + step)


def _owned_positives(idx, row_start, row_end):
    pos = idx[:, 0]
    owned = ((pos >= row_start) & (pos < row_end)).nonzero().squeeze(1)
    return owned, pos[owned] - row_start


# --------------------------------------------------------------------------------------------
# one bank (MemoryBank)
# --------------------------------------------------------------------------------------------
def _layout(loss: str, need_grad: bool, need_lse: bool, D: int):
    """(scaled fields, plain fields) as lists of (name, width).

    InfoNCE: ``l = sum_k exp(l_k - m)``, ``c = sum_k exp(l_k - m) d_k``,
    ``a = s sum_k exp(l_k - m) row_k`` over the owned columns; ``d0``, ``row0``: the positive's
    dot and row (zeros unless owned). NCE: ``l`` as above (for the LSE only); ``loss``, ``gs``,
    ``gb``, ``ga``: the owned columns' share of the loss, dL/ds, dL/dbeta, dL/dq."""
    if loss == "infonce":
        scaled = [("l", 1)] + ([("c", 1), ("a", D)] if need_grad else [])
        plain = [("d0", 1)] + ([("row0", D)] if need_grad else [])
    else:
        scaled = [("l", 1)] if need_lse else []
        plain = [("loss", 1)] + ([("gs", 1), ("gb", 1), ("ga", D)] if need_grad else [])
    return scaled, plain


@torch.no_grad()
def shard_partials(
    anchor: torch.Tensor,
    index_fn: Callable[[int, int], torch.Tensor],
    shard: torch.Tensor,
    row_start: int,
    n_rows: int,
    n_cols: int,
    *,
    logit_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    loss: str,
    log_z: Optional[torch.Tensor],
    need_grad: bool,
    need_lse: bool,
    backend: str = "auto",
    chunk: int = 1 << 18,
) -> Partials:
    """Partial statistics of the columns whose rows this shard owns, from the fused kernel.

    anchor (B, D) all-gathered anchors; ``index_fn(b0, b1)`` returns the (b1-b0, K+1) global
    index of anchors b0..b1-1 (explicit or drawn from the counter RNG); ``shard`` (R, D) the
    owned rows ``[row_start, row_start + R)`` of a bank of ``n_rows`` rows; ``n_cols = K + 1``.
    NCE's ``c = K / n_rows`` uses the global K and N. Per anchor the kernel's ``lse`` is the owned
    columns' LSE, so with ``m = lse`` the softmax sum is 1 (0 when nothing is owned) and the
    softmax-weighted dot and row sums come from ``grad_scalars[0]`` and ``grad_anchor`` once the
    owned positive's ``-d_0``, ``-s row_0`` are added back. NCE terms are additive. Everything
    is fp32 (fp64 for fp64 inputs)."""
    B, D = anchor.shape
    acc = torch.float64 if torch.float64 in (anchor.dtype, shard.dtype) else torch.float32
    q = anchor.to(acc)
    s = logit_scale.detach().to(acc)
    with_m = loss == "infonce" or need_lse
    sfields, pfields = _layout(loss, need_grad, need_lse, D)
    out = _empty(B, [sfields], pfields, with_m, acc, anchor.device)
    S, P = _split(out.scaled[0], sfields), _split(out.plain, pfields)
    if shard.shape[0] == 0:  # a trailing rank past the last row owns nothing
        return out
    for b0, b1 in _chunks(B, n_cols, chunk):
        idx = index_fn(b0, b1)
        per_row, lse, ga, gsc = sampled_contrast_outputs(
            anchor[b0:b1],
            shard,
            idx - row_start,
            logit_scale=s,
            bias=bias,
            loss=loss,
            log_z=log_z,
            noise_rows=n_rows,
            compute_grad=need_grad,
            backend=backend,
        )
        if with_m:
            out.m[b0:b1, 0] = lse
            S["l"][b0:b1] = torch.isfinite(lse).to(acc)  # sum_k exp(l_k - lse) over the owned columns
        if loss == "infonce":
            owned, local = _owned_positives(idx, row_start, row_start + shard.shape[0])
            row0 = shard.index_select(0, local).to(acc)
            d0 = (row0 * q[b0:b1].index_select(0, owned)).sum(1)
            mine = owned + b0
            P["d0"][mine] = d0
            if need_grad:
                P["row0"][mine] = row0
                S["c"][b0:b1] = gsc[0]
                S["c"][mine] += d0
                S["a"][b0:b1] = ga
                S["a"][mine] += s * row0
        else:
            P["loss"][b0:b1] = per_row
            if need_grad:
                P["gs"][b0:b1] = gsc[0]
                P["gb"][b0:b1] = gsc[1]
                P["ga"][b0:b1] = ga
    return out


def finalize(
    p: Partials,
    *,
    loss: str,
    logit_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    need_grad: bool,
    need_lse: bool,
    D: int,
):
    """Per-anchor (loss, lse or None, grad_anchor, grad_scale, grad_bias) from merged partials
    (gradients ``None`` unless ``need_grad``)."""
    sfields, pfields = _layout(loss, need_grad, need_lse, D)
    S, P = _split(p.scaled[0], sfields), _split(p.plain, pfields)
    acc = p.plain.dtype
    s = logit_scale.detach().to(acc)
    lse = p.m[:, 0] + torch.log(S["l"]) if "l" in S else None
    ga = gs = gb = None
    if loss == "infonce":
        l0 = P["d0"] * s
        if bias is not None:
            l0 = l0 + bias.detach().to(acc)
        per_row = lse - l0
        if need_grad:
            inv = 1.0 / S["l"]
            ga = S["a"] * inv[:, None] - s * P["row0"]
            gs = S["c"] * inv - P["d0"]
            gb = torch.zeros_like(gs)  # a shared shift cancels in the softmax: exactly 0
    else:
        per_row = P["loss"]
        if need_grad:
            ga, gs, gb = P["ga"], P["gs"], P["gb"]
    return per_row, lse, ga, gs, gb


# --------------------------------------------------------------------------------------------
# paired banks (PairedMemoryBank): both directions and the consistency KL
# --------------------------------------------------------------------------------------------
def _dual_layout(loss: str, need_grad: bool, need_lse: bool, need_kl: bool, D: int):
    """(student-weighted fields, teacher-weighted fields, plain fields).

    Notation (csrc/KERNELS.md): ``l^s_k = s <z_s, bank_t[k]> + beta``, ``l^t_k = s <z_t, bank_s[k]> + beta``,
    ``f_k = l^t_k - l^s_k``; ``w^s = exp(l^s - m_s)``, ``w^t = exp(l^t - m_t)`` over owned columns.
    InfoNCE: ``ls = sum w^s``, ``as = s sum w^s bank_t[k]``; ``lt``, ``at = s sum w^t bank_s[k]``;
    KL: ``F = sum w^t f``, ``pt_bt = s sum w^t bank_t[k]``, ``ptf_bs = s sum w^t f bank_s[k]``;
    plain: the owned positive's dots ``d0s``, ``d0t`` and rows ``row0t`` (bank_t), ``row0s`` (bank_s).
    NCE: plain additive ``loss_*``, ``ga_*``, ``gs_*``, ``gb_*``; ``ls``/``lt`` only for the LSE.
    Scale gradients are not accumulated: every logit is ``s d + beta``, so
    ``dL/ds = (<z_s, dL/dz_s> + <z_t, dL/dz_t>) / s`` for each term (``finalize_dual``)."""
    if loss == "infonce":
        sf = [("ls", 1)] + ([("as", D)] if need_grad or need_kl else [])
        tf = (
            [("lt", 1)]
            + ([("at", D)] if need_grad or need_kl else [])
            + ([("F", 1)] if need_kl else [])
            + ([("pt_bt", D), ("ptf_bs", D)] if need_kl and need_grad else [])
        )
        pf = [("d0s", 1), ("d0t", 1)] + ([("row0t", D), ("row0s", D)] if need_grad else [])
    else:
        sf = [("ls", 1)] if need_lse else []
        tf = [("lt", 1)] if need_lse else []
        pf = [("loss_s", 1), ("loss_t", 1)] + (
            [("ga_s", D), ("ga_t", D), ("gb_s", 1), ("gb_t", 1)] if need_grad else []
        )
    return sf, tf, pf


@torch.no_grad()
def dual_shard_partials(
    anchor_s: torch.Tensor,
    anchor_t: torch.Tensor,
    index_fn: Callable[[int, int], torch.Tensor],
    shard_s: torch.Tensor,
    shard_t: torch.Tensor,
    row_start: int,
    n_rows: int,
    n_cols: int,
    *,
    logit_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    loss: str,
    log_z: Optional[torch.Tensor],
    need_grad: bool,
    need_lse: bool,
    need_kl: bool,
    backend: str = "auto",
    chunk: int = 1 << 18,
) -> Partials:
    """Partials of the owned columns of both directions, from ``dual_sampled_contrast_outputs``
    run on this rank's rows of both banks with local indices (absent columns elsewhere).

    Per anchor, with ``m_s = lse_s``, ``m_t = lse_t`` of the owned columns (the shard's local
    softmaxes ``p^s``, ``p^t`` then sum to 1) the kernel's outputs give, once the owned
    positive's ``-s row_0`` is added back: ``as = dL^s/dz_s + s bank_t[0]``,
    ``at = dL^t/dz_t + s bank_s[0]``; from the local KL and its gradients
    (``dKL/dz_s = as - s sum p^t bank_t``, ``dKL/dz_t = s sum p^t f bank_s - F at``):
    ``F = KL + lse_t - lse_s``, ``pt_bt = as - dKL/dz_s``, ``ptf_bs = dKL/dz_t + F at``.
    All are softmax-weighted sums, rescaled by ``exp(m - M)`` in the merge. NCE terms add up."""
    B, D = anchor_s.shape
    # The partials are formed and merged in fp64 from the kernel's fp32 outputs: recovering
    # ``ptf_bs`` and the KL gradients adds and removes ``F at``, exact in fp64.
    acc = torch.float64
    qs, qt = anchor_s.to(acc), anchor_t.to(acc)
    s = logit_scale.detach().to(acc)
    with_m = loss == "infonce" or need_lse
    sf, tf, pf = _dual_layout(loss, need_grad, need_lse, need_kl, D)
    out = _empty(B, [sf, tf], pf, with_m, acc, anchor_s.device)
    Ss, St, P = _split(out.scaled[0], sf), _split(out.scaled[1], tf), _split(out.plain, pf)
    R = shard_s.shape[0]
    if R == 0:  # a trailing rank past the last row owns nothing
        return out
    kernel_grad = need_grad or (loss == "infonce" and need_kl)
    for b0, b1 in _chunks(B, n_cols, chunk):
        idx = index_fn(b0, b1)
        losses, lse, ga, gsc = dual_sampled_contrast_outputs(
            anchor_s[b0:b1],
            anchor_t[b0:b1],
            shard_s,
            shard_t,
            idx - row_start,
            logit_scale=s,
            bias=bias,
            loss=loss,
            log_z=log_z,
            compute_kl=need_kl and loss == "infonce",
            noise_rows=n_rows,
            compute_grad=kernel_grad,
            backend=backend,
        )
        present = torch.isfinite(lse[0])  # both directions read the same columns
        if loss != "infonce" and need_grad:
            ga, gsc = ga.to(acc), gsc.to(acc)
        if with_m:
            out.m[b0:b1, 0], out.m[b0:b1, 1] = lse[0], lse[1]
            Ss["ls"][b0:b1] = present.to(acc)
            St["lt"][b0:b1] = present.to(acc)
        if loss != "infonce":
            P["loss_s"][b0:b1], P["loss_t"][b0:b1] = losses[0], losses[1]
            if need_grad:
                P["ga_s"][b0:b1], P["ga_t"][b0:b1] = ga[0], ga[1]
                P["gb_s"][b0:b1], P["gb_t"][b0:b1] = gsc[1, 0], gsc[1, 1]
            continue
        losses, lse, ga = losses.to(acc), lse.to(acc), ga.to(acc) if kernel_grad else ga
        owned, local = _owned_positives(idx, row_start, row_start + R)
        row0t = shard_t.index_select(0, local).to(acc)  # the student direction's positive row
        row0s = shard_s.index_select(0, local).to(acc)
        mine = owned + b0
        P["d0s"][mine] = (row0t * qs[mine]).sum(1)
        P["d0t"][mine] = (row0s * qt[mine]).sum(1)
        if need_grad:
            P["row0t"][mine], P["row0s"][mine] = row0t, row0s
        if not kernel_grad:
            continue
        a_s = ga[0].clone()
        a_s[owned] += s * row0t
        a_t = ga[1].clone()
        a_t[owned] += s * row0s
        Ss["as"][b0:b1], St["at"][b0:b1] = a_s, a_t
        if need_kl:
            F = torch.where(present, losses[2] + lse[1] - lse[0], torch.zeros_like(lse[0]))
            St["F"][b0:b1] = F
            if need_grad:
                St["pt_bt"][b0:b1] = a_s - ga[2]
                St["ptf_bs"][b0:b1] = ga[3] + F[:, None] * a_t
    return out


def finalize_dual(
    p: Partials,
    anchor_s: torch.Tensor,
    anchor_t: torch.Tensor,
    *,
    loss: str,
    logit_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    need_grad: bool,
    need_lse: bool,
    need_kl: bool,
):
    """The four outputs of ``dual_sampled_contrast`` for the gathered anchors from merged partials:
    ``losses`` (3, B) [L^s, L^t, KL], ``lse`` (2, B) (or None), ``grad_anchors`` (4, B, D),
    ``grad_scalars`` (2, 3, B) (both None unless ``need_grad``); in the op's accumulation dtype
    (fp32, fp64 for fp64 anchors), computed in fp64."""
    D = anchor_s.shape[1]
    sf, tf, pf = _dual_layout(loss, need_grad, need_lse, need_kl, D)
    Ss, St, P = _split(p.scaled[0], sf), _split(p.scaled[1], tf), _split(p.plain, pf)
    acc = p.plain.dtype
    s = logit_scale.detach().to(acc)
    B = p.plain.shape[0]
    lse = torch.stack([p.m[:, 0] + torch.log(Ss["ls"]), p.m[:, 1] + torch.log(St["lt"])]) if "ls" in Ss else None
    zeros = torch.zeros(B, dtype=acc, device=p.plain.device)
    ga = gsc = None
    if loss != "infonce":
        losses = torch.stack([P["loss_s"], P["loss_t"], zeros])
        if need_grad:
            ga = torch.stack([P["ga_s"], P["ga_t"], torch.zeros_like(P["ga_s"]), torch.zeros_like(P["ga_s"])])
            gb = torch.stack([P["gb_s"], P["gb_t"], zeros])
    else:
        b = 0.0 if bias is None else bias.detach().to(acc)
        kl = zeros
        if need_kl:
            kl = St["F"] / St["lt"] - lse[1] + lse[0]
        losses = torch.stack([lse[0] - (s * P["d0s"] + b), lse[1] - (s * P["d0t"] + b), kl])
        if need_grad:
            ps_bt = Ss["as"] / Ss["ls"][:, None]  # s sum_k p^s_k bank_t[k]
            pt_bs = St["at"] / St["lt"][:, None]  # s sum_k p^t_k bank_s[k]
            g = [ps_bt - s * P["row0t"], pt_bs - s * P["row0s"]]
            if need_kl:
                Fm = St["F"] / St["lt"]
                g += [ps_bt - St["pt_bt"] / St["lt"][:, None], St["ptf_bs"] / St["lt"][:, None] - Fm[:, None] * pt_bs]
            else:
                g += [torch.zeros_like(ps_bt), torch.zeros_like(ps_bt)]
            ga = torch.stack(g)
            gb = torch.zeros((3, B), dtype=acc, device=p.plain.device)  # a shared shift cancels: exactly 0
    if need_grad:
        qs, qt = anchor_s.to(acc), anchor_t.to(acc)
        gs = torch.stack([(qs * ga[0]).sum(1), (qt * ga[1]).sum(1), (qs * ga[2]).sum(1) + (qt * ga[3]).sum(1)]) / s
        gsc = torch.stack([gs, gb])
    out = torch.float64 if anchor_s.dtype == torch.float64 else torch.float32
    return tuple(None if t is None else t.to(out) for t in (losses, lse, ga, gsc))


# --------------------------------------------------------------------------------------------
# autograd
# --------------------------------------------------------------------------------------------
class PrecomputedContrast(torch.autograd.Function):
    """Attaches gradients computed in the forward pass (docs/math.md §1a: the gradient is ready after the
    forward read of each row) to the per-row loss, so ``loss.backward()`` reaches the anchors, a
    learnable logit scale and bias. Backward only scales by ``grad_output``: no communication."""

    @staticmethod
    def forward(ctx, anchor, logit_scale, bias, per_row, grad_anchor, grad_scale, grad_bias):
        ctx.save_for_backward(grad_anchor, grad_scale, grad_bias)
        ctx.anchor_dtype = anchor.dtype
        ctx.has_bias = bias is not None
        return per_row.clone()

    @staticmethod
    def backward(ctx, g):
        ga, gs, gb = ctx.saved_tensors
        g = g.to(ga.dtype)
        d_anchor = (ga * g[:, None]).to(ctx.anchor_dtype) if ctx.needs_input_grad[0] else None
        d_scale = (gs * g).sum() if ctx.needs_input_grad[1] else None
        d_bias = (gb * g).sum() if ctx.has_bias and ctx.needs_input_grad[2] else None
        return d_anchor, d_scale, d_bias, None, None, None, None


class PrecomputedDualContrast(torch.autograd.Function):
    """``PrecomputedContrast`` for the dual outputs: returns ``losses`` (3, B) [L^s, L^t, KL] with
    the saved ``grad_anchors`` (4, B, D) and ``grad_scalars`` (2, 3, B) as their gradients (the
    same formula as the ``dual_sampled_contrast`` op's backward)."""

    @staticmethod
    def forward(ctx, anchor_s, anchor_t, logit_scale, bias, losses, grad_anchors, grad_scalars):
        ctx.save_for_backward(grad_anchors, grad_scalars)
        ctx.dtypes = (anchor_s.dtype, anchor_t.dtype)
        ctx.has_bias = bias is not None
        return losses.clone()

    @staticmethod
    def backward(ctx, g):
        ga, gsc = ctx.saved_tensors
        g = g.to(ga.dtype)
        d_s = ga[0] * g[0, :, None] + ga[2] * g[2, :, None]
        d_t = ga[1] * g[1, :, None] + ga[3] * g[2, :, None]
        d_scale = (gsc[0] * g).sum() if ctx.needs_input_grad[2] else None
        d_bias = (gsc[1] * g).sum() if ctx.has_bias and ctx.needs_input_grad[3] else None
        return d_s.to(ctx.dtypes[0]), d_t.to(ctx.dtypes[1]), d_scale, d_bias, None, None, None
