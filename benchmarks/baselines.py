"""The eager baselines of the benchmark suite: the code paths users run today, written as the
public code bases write them (not as this library's oracle in ``dcdkernels/reference/`` does).

Op-level functions (forward only; the benchmarks call ``backward`` on their result):

* RepDistiller CRD (``crd/memory.py`` ``ContrastMemory`` + ``crd/criterion.py``
  ``ContrastLoss``): ``index_select`` of the B(K+1) rows of each memory, ``bmm``,
  ``exp(x / T)``, divide by ``Z``, ``ContrastLoss`` with ``eps = 1e-7``.
  Memory update: ``index_select`` / ``mul_`` / ``add_`` / L2-normalise / ``index_copy_``.
* MoCo (``moco/builder.py``): ``l_pos``, ``l_neg`` einsums over ``queue.clone().detach()`` (the
  (D, K) layout), ``cat``, ``/= T``, cross-entropy with label 0.
* lightly ``NTXentLoss`` with a memory bank: normalise both outputs, einsum against
  ``bank.clone().detach()`` ((D, M) layout), ``cat``, ``/ T``, cross-entropy.
* Plain ``logits = s * q @ keys.T + b`` + cross-entropy (DCD in-batch, PCKD class centres).
* SupContrast ``SupConLoss`` (HobbitLong/SupContrast ``losses.py``, ``contrast_mode="all"``):
  the (bsz * n_views)^2 logits, masks, ``log_prob``, mean over positives (:func:`supcontrast_supcon`;
  pytorch-metric-learning's ``SupConLoss`` is the other eager SupCon baseline, used as installed).
* Gather + ``bmm`` + cross-entropy for InfoNCE over sampled rows, and the DCD memory form
  (InfoNCE + ``kl_div(..., "batchmean")``) as a user would extend RepDistiller's memory with it.

Method-level modules (one full loss step): :class:`RepDistillerCRD`, :class:`OfficialDCD`,
:class:`DCDMemoryEager`, :class:`OfficialCoCoRD`, :class:`EagerPCKD` (the authors' PCKD).

Only change made to the original code paths: banks may be stored in bf16, and ``bmm``/einsum need
both operands in one dtype, so the gathered bf16 rows are cast to the anchors' dtype (fp32),
exactly the one-line fix a user would make (``weight.to(v.dtype)``). Everything is computed in
fp32, like the fused kernels.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

NCE_EPS = 1e-7  # RepDistiller crd/criterion.py


def _match(weight, v):
    """The bf16-bank fix: cast gathered rows to the anchor dtype (no-op for fp32 banks)."""
    return weight if weight.dtype == v.dtype else weight.to(v.dtype)


def supcontrast_supcon(features, labels, temperature=0.07, base_temperature=0.07):
    """SupContrast's ``SupConLoss.forward`` (contrast_mode "all"): features (bsz, n_views, D),
    labels (bsz,); the mean over the bsz * n_views anchors."""
    bsz, n_views = features.shape[:2]
    labels = labels.contiguous().view(-1, 1)
    mask = torch.eq(labels, labels.T).float()
    contrast_feature = torch.cat(torch.unbind(features, dim=1), dim=0)
    anchor_dot_contrast = torch.div(torch.matmul(contrast_feature, contrast_feature.T), temperature)
    logits_max, _ = torch.max(anchor_dot_contrast, dim=1, keepdim=True)
    logits = anchor_dot_contrast - logits_max.detach()
    mask = mask.repeat(n_views, n_views)
    logits_mask = torch.scatter(
        torch.ones_like(mask), 1, torch.arange(bsz * n_views, device=features.device).view(-1, 1), 0
    )
    mask = mask * logits_mask
    exp_logits = torch.exp(logits) * logits_mask
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    mean_log_prob_pos = (mask * log_prob).sum(1) / mask.sum(1)
    loss = -(temperature / base_temperature) * mean_log_prob_pos
    return loss.view(n_views, bsz).mean()


# =============================================================================================
# RepDistiller CRD, op level
# =============================================================================================
def repdistiller_scores(v, memory, idx, T, Z=None):
    """One direction of RepDistiller's ``ContrastMemory.forward``: returns ``exp(<v, w>/T) / Z``
    of shape (B, K+1, 1) (RepDistiller keeps the trailing 1). With ``Z=None`` returns the
    unnormalised scores (the caller sets Z from the first batch, as RepDistiller does)."""
    batchSize, inputSize = v.shape
    K = idx.shape[1] - 1
    weight = torch.index_select(memory, 0, idx.view(-1)).detach()
    weight = _match(weight, v).view(batchSize, K + 1, inputSize)
    out = torch.bmm(weight, v.view(batchSize, inputSize, 1))
    out = torch.exp(torch.div(out, T))
    if Z is None:
        return out
    return torch.div(out, Z).contiguous()


def repdistiller_first_z(v, memory, idx, T):
    """RepDistiller's partition estimate ``Z = mean(exp(u)) * N`` from one (first) batch."""
    with torch.no_grad():
        return (repdistiller_scores(v, memory, idx, T).mean() * memory.shape[0]).item()


def repdistiller_contrast_loss(x, n_data):
    """RepDistiller ``ContrastLoss.forward`` (NCE, eps = 1e-7); ``x`` (B, K+1, 1) scores / Z."""
    bsz = x.shape[0]
    m = x.size(1) - 1
    Pn = 1 / float(n_data)
    P_pos = x.select(1, 0)
    log_D1 = torch.div(P_pos, P_pos.add(m * Pn + NCE_EPS)).log_()
    P_neg = x.narrow(1, 1, m)
    log_D0 = torch.div(P_neg.clone().fill_(m * Pn), P_neg.add(m * Pn + NCE_EPS)).log_()
    loss = -(log_D1.sum(0) + log_D0.view(-1, 1).sum(0)) / bsz
    return loss.squeeze()


def crd_nce_sampled(anchor, bank, idx, T, Z):
    """Single bank CRD NCE loss (batch mean), RepDistiller style."""
    return repdistiller_contrast_loss(repdistiller_scores(anchor, bank, idx, T, Z), bank.shape[0])


def crd_nce_dual(z_s, z_t, bank_s, bank_t, idx, T, Z_s, Z_t):
    """Both CRD directions at the same indices (``ContrastMemory.forward`` without the update,
    then ``criterion_s(out_s) + criterion_t(out_t)``): student anchor vs ``bank_t`` (memory_v2),
    teacher anchor vs ``bank_s`` (memory_v1)."""
    out_s = repdistiller_scores(z_s, bank_t, idx, T, Z_s)
    out_t = repdistiller_scores(z_t, bank_s, idx, T, Z_t)
    n = bank_s.shape[0]
    return repdistiller_contrast_loss(out_s, n) + repdistiller_contrast_loss(out_t, n)


def repdistiller_memory_update_(memory, y, v, momentum):
    """RepDistiller's in-place momentum update of one memory (``ContrastMemory.forward``)."""
    with torch.no_grad():
        l_pos = torch.index_select(memory, 0, y.view(-1))
        l_pos.mul_(momentum)
        l_pos.add_(torch.mul(v, 1 - momentum))
        l_norm = l_pos.pow(2).sum(1, keepdim=True).pow(0.5)
        updated = l_pos.div(l_norm)
        memory.index_copy_(0, y, updated)
    return memory


# =============================================================================================
# InfoNCE over gathered rows, DCD memory form
# =============================================================================================
def _gathered_logits(v, memory, idx, scale, bias):
    batchSize, inputSize = v.shape
    weight = torch.index_select(memory, 0, idx.view(-1)).detach()
    weight = _match(weight, v).view(batchSize, idx.shape[1], inputSize)
    logits = torch.bmm(weight, v.view(batchSize, inputSize, 1)).squeeze(2) * scale
    return logits + bias if bias is not None else logits


def infonce_sampled(anchor, bank, idx, scale, bias=None):
    """Gather + bmm + cross-entropy with label 0 (InfoNCE over sampled rows), batch mean."""
    logits = _gathered_logits(anchor, bank, idx, scale, bias)
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def dcd_memory_dual(z_s, z_t, bank_s, bank_t, idx, scale, bias, alpha):
    """DCD's loss over bank negatives, as a user extends RepDistiller's memory with it:
    ``CE(l_s, 0) + alpha * KL(softmax(l_t) || softmax(l_s))`` (batchmean), where ``l_s`` scores
    the student anchor against ``bank_t`` rows and ``l_t`` the teacher anchor against ``bank_s``."""
    l_s = _gathered_logits(z_s, bank_t, idx, scale, bias)
    l_t = _gathered_logits(z_t, bank_s, idx, scale, bias)
    labels = torch.zeros(l_s.shape[0], dtype=torch.long, device=l_s.device)
    ce = F.cross_entropy(l_s, labels)
    kl = F.kl_div(F.log_softmax(l_s, dim=1), F.softmax(l_t, dim=1), reduction="batchmean")
    return ce + alpha * kl


# =============================================================================================
# Dense: MoCo, lightly, plain logits
# =============================================================================================
def moco_infonce(q, k, queue, T):
    """MoCo ``builder.py`` logits + ``nn.CrossEntropyLoss``. ``queue`` is MoCo's (D, K) buffer."""
    l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", [q, _match(queue.clone().detach(), q)])
    logits = torch.cat([l_pos, l_neg], dim=1)
    logits /= T
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, labels)


def lightly_ntxent_memory(out0, out1, bank, temperature):
    """lightly ``NTXentLoss.forward`` with a ``MemoryBankModule`` (bank (D, M), returned as
    ``bank.clone().detach()``)."""
    out0 = F.normalize(out0, dim=1)
    out1 = F.normalize(out1, dim=1)
    negatives = _match(bank.clone().detach(), out0)
    sim_pos = torch.einsum("nc,nc->n", out0, out1).unsqueeze(-1)
    sim_neg = torch.einsum("nc,ck->nk", out0, negatives)
    logits = torch.cat([sim_pos, sim_neg], dim=1) / temperature
    labels = torch.zeros(logits.shape[0], device=logits.device, dtype=torch.long)
    return F.cross_entropy(logits, labels)


def dense_ce(q, keys, target, scale, bias=None):
    """``logits = s * q @ keys.T + b``, cross-entropy against ``target`` (DCD in-batch, PCKD)."""
    logits = torch.mm(q, _match(keys, q).t()) * scale
    if bias is not None:
        logits = logits + bias
    return F.cross_entropy(logits, target)


# =============================================================================================
# Method-level modules
# =============================================================================================
class Normalize(nn.Module):
    """RepDistiller ``Normalize(2)``."""

    def __init__(self, power=2):
        super().__init__()
        self.power = power

    def forward(self, x):
        norm = x.pow(self.power).sum(1, keepdim=True).pow(1.0 / self.power)
        return x.div(norm)


class Embed(nn.Module):
    """RepDistiller ``Embed``: flatten, Linear, L2 norm."""

    def __init__(self, dim_in=1024, dim_out=128):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.l2norm = Normalize(2)

    def forward(self, x):
        x = x.view(x.shape[0], -1)
        return self.l2norm(self.linear(x))


class AliasMethod:
    """RepDistiller's ``AliasMethod`` sampler. For the uniform unigrams RepDistiller uses, the
    table its Python construction loop builds is ``prob = 1, alias = 0``; it is set directly
    (the loop takes seconds at N = 1.28M and is not part of a training step). ``draw`` is verbatim."""

    def __init__(self, n, device):
        self.prob = torch.ones(n, device=device)
        self.alias = torch.zeros(n, dtype=torch.long, device=device)

    def draw(self, N):
        K = self.alias.size(0)
        kk = torch.zeros(N, dtype=torch.long, device=self.prob.device).random_(0, K)
        prob = self.prob.index_select(0, kk)
        alias = self.alias.index_select(0, kk)
        b = torch.bernoulli(prob)
        oq = kk.mul(b.long())
        oj = alias.mul((1 - b).long())
        return oq + oj


class ContrastMemory(nn.Module):
    """RepDistiller ``crd/memory.py`` ``ContrastMemory`` (scores and in-place memory update)."""

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5, bank_dtype=torch.float32):
        super().__init__()
        self.nLem = outputSize
        self.K = K
        self.register_buffer("params", torch.tensor([K, T, -1, -1, momentum]))
        stdv = 1.0 / math.sqrt(inputSize / 3)
        self.register_buffer("memory_v1", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv).to(bank_dtype))
        self.register_buffer("memory_v2", torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv).to(bank_dtype))
        self.multinomial = None

    def forward(self, v1, v2, y, idx=None):
        K = int(self.params[0].item())
        T = self.params[1].item()
        Z_v1 = self.params[2].item()
        Z_v2 = self.params[3].item()
        momentum = self.params[4].item()
        batchSize = v1.size(0)
        outputSize = self.memory_v1.size(0)
        if idx is None:
            if self.multinomial is None:
                self.multinomial = AliasMethod(outputSize, v1.device)
            idx = self.multinomial.draw(batchSize * (K + 1)).view(batchSize, -1)
            idx.select(1, 0).copy_(y.data)
        out_v2 = repdistiller_scores(v2, self.memory_v1, idx, T)
        out_v1 = repdistiller_scores(v1, self.memory_v2, idx, T)
        if Z_v1 < 0:
            self.params[2] = out_v1.mean() * outputSize
            Z_v1 = self.params[2].clone().detach().item()
        if Z_v2 < 0:
            self.params[3] = out_v2.mean() * outputSize
            Z_v2 = self.params[3].clone().detach().item()
        out_v1 = torch.div(out_v1, Z_v1).contiguous()
        out_v2 = torch.div(out_v2, Z_v2).contiguous()
        repdistiller_memory_update_(self.memory_v1, y, v1, momentum)
        repdistiller_memory_update_(self.memory_v2, y, v2, momentum)
        return out_v1, out_v2


class ContrastLoss(nn.Module):
    """RepDistiller ``crd/criterion.py`` ``ContrastLoss``."""

    def __init__(self, n_data):
        super().__init__()
        self.n_data = n_data

    def forward(self, x):
        return repdistiller_contrast_loss(x, self.n_data)


class RepDistillerCRD(nn.Module):
    """RepDistiller ``CRDLoss``: ``forward(f_s, f_t, idx, contrast_idx=None)``."""

    def __init__(
        self, s_dim, t_dim, n_data, feat_dim=128, nce_k=16384, nce_t=0.07, nce_m=0.5, bank_dtype=torch.float32
    ):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_k, nce_t, nce_m, bank_dtype)
        self.criterion_t = ContrastLoss(n_data)
        self.criterion_s = ContrastLoss(n_data)

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        f_s = self.embed_s(f_s)
        f_t = self.embed_t(f_t)
        out_s, out_t = self.contrast(f_s, f_t, idx, contrast_idx)
        s_loss = self.criterion_s(out_s)
        t_loss = self.criterion_t(out_t)
        return s_loss + t_loss


class OfficialDCD(nn.Module):
    """DCD / ICD in-batch loss as in giakoumoglou/distillers: learnable ``params.tau`` (log
    scale, clamped at ``max_tau``) and bias ``params.b``; ``CE(logits, arange) + alpha * KL`` (batchmean)."""

    def __init__(self, s_dim, t_dim, feat_dim=128, alpha=0.5, init_tau=1.0, max_tau=10.0):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.params = nn.ParameterDict(
            {"tau": nn.Parameter(torch.tensor(init_tau)), "b": nn.Parameter(torch.tensor(0.0))}
        )
        self.alpha, self.max_tau = alpha, max_tau

    def forward(self, f_s, f_t, idx=None, contrast_idx=None):
        f_s = self.embed_s(f_s)
        f_t = self.embed_t(f_t)
        tau = self.params["tau"].exp().clamp(0, self.max_tau)
        logits = torch.mm(f_s, f_t.t()) * tau + self.params["b"]
        labels = torch.arange(logits.shape[0], device=logits.device)
        loss_ce = F.cross_entropy(logits, labels)
        p_s = F.log_softmax(logits, dim=1)
        p_t = F.softmax(logits.t(), dim=1)
        loss_kl = F.kl_div(p_s, p_t, reduction="batchmean")
        return loss_ce + self.alpha * loss_kl


class DCDMemoryEager(nn.Module):
    """DCD's loss over memory-bank negatives written the eager way: RepDistiller's two memories
    (gather + bmm per bank, index_select/index_copy_ update) with DCD's CE + alpha * KL."""

    def __init__(
        self,
        s_dim,
        t_dim,
        n_data,
        feat_dim=128,
        nce_k=16384,
        alpha=0.5,
        init_tau=1.0,
        max_tau=10.0,
        momentum=0.5,
        bank_dtype=torch.float32,
    ):
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.tau = nn.Parameter(torch.tensor(init_tau))
        self.b = nn.Parameter(torch.tensor(0.0))
        self.alpha, self.max_tau, self.K, self.momentum = alpha, max_tau, nce_k, momentum
        stdv = 1.0 / math.sqrt(feat_dim / 3)
        self.register_buffer("memory_v1", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv).to(bank_dtype))
        self.register_buffer("memory_v2", torch.rand(n_data, feat_dim).mul_(2 * stdv).add_(-stdv).to(bank_dtype))
        self.multinomial = None

    def forward(self, f_s, f_t, idx, contrast_idx=None):
        z_s, z_t = self.embed_s(f_s), self.embed_t(f_t)
        if contrast_idx is None:
            if self.multinomial is None:
                self.multinomial = AliasMethod(self.memory_v1.shape[0], z_s.device)
            contrast_idx = self.multinomial.draw(z_s.shape[0] * (self.K + 1)).view(z_s.shape[0], -1)
            contrast_idx.select(1, 0).copy_(idx)
        tau = self.tau.exp().clamp(0, self.max_tau)
        loss = dcd_memory_dual(z_s, z_t, self.memory_v1, self.memory_v2, contrast_idx, tau, self.b, self.alpha)
        repdistiller_memory_update_(self.memory_v1, idx, z_s.detach(), self.momentum)
        repdistiller_memory_update_(self.memory_v2, idx, z_t.detach(), self.momentum)
        return loss


def _mlp(in_dim, hidden, out_dim):
    return nn.Sequential(
        nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
    )


class OfficialCoCoRD(nn.Module):
    """CoCoRD's step in the style of its official code (MoCo builder): parameter-loop EMA
    (``param_k.data = param_k.data * m + param_q.data * (1 - m)``), MoCo logits over
    ``queue.clone().detach()`` ((D, K) layout), cross-entropy at T, BYOL ``2 - 2 cos`` on both
    views, MoCo's slice enqueue. ``forward(f_s, f_t, f_s2, f_slow, f_slow2)`` as
    ``dcdkernels.CoCoRDLoss`` (slow-encoder features are passed in). Needs ``s_dim == t_dim``."""

    def __init__(
        self,
        s_dim,
        t_dim,
        embed_dim=2048,
        hidden_dim=2048,
        pred_dim=512,
        queue_size=2048,
        T=0.1,
        m_teacher=0.999,
        m_slow=0.9,
        ctr_weight=1.0,
        pred_weight=4.0,
        queue_dtype=torch.float32,
    ):
        super().__init__()
        assert s_dim == t_dim, "the official code copies the student projector into the teacher head"
        self.projector = _mlp(s_dim, hidden_dim, embed_dim)
        self.predictor = _mlp(embed_dim, pred_dim, embed_dim)
        self.slow_projector = _mlp(s_dim, hidden_dim, embed_dim)
        self.teacher_projector = _mlp(t_dim, hidden_dim, embed_dim)
        for head in (self.slow_projector, self.teacher_projector):
            for param_q, param_k in zip(self.projector.parameters(), head.parameters()):
                param_k.data.copy_(param_q.data)
                param_k.requires_grad = False
        self.T, self.m_teacher, self.m_slow = T, m_teacher, m_slow
        self.ctr_weight, self.pred_weight = ctr_weight, pred_weight
        self.register_buffer("queue", F.normalize(torch.randn(embed_dim, queue_size), dim=0).to(queue_dtype))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self):
        for param_q, param_k in zip(self.projector.parameters(), self.slow_projector.parameters()):
            param_k.data = param_k.data * self.m_slow + param_q.data * (1.0 - self.m_slow)
        for param_q, param_k in zip(self.projector.parameters(), self.teacher_projector.parameters()):
            param_k.data = param_k.data * self.m_teacher + param_q.data * (1.0 - self.m_teacher)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)
        self.queue[:, ptr : ptr + batch_size] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (ptr + batch_size) % self.queue.shape[1]

    def forward(self, f_s, f_t, f_s2, f_slow, f_slow2):
        self._momentum_update()
        s_q = self.projector(f_s)
        q = F.normalize(s_q, dim=1)
        with torch.no_grad():
            k = F.normalize(self.teacher_projector(f_t), dim=1)
        loss_ctr = moco_infonce(q, k, self.queue, self.T)
        p1, p2 = self.predictor(s_q), self.predictor(self.projector(f_s2))
        with torch.no_grad():
            t1, t2 = self.slow_projector(f_slow), self.slow_projector(f_slow2)
        loss_pred = (
            (2 - 2 * F.cosine_similarity(p1, t1, dim=-1)) + (2 - 2 * F.cosine_similarity(p2, t2, dim=-1))
        ).mean()
        self._dequeue_and_enqueue(k)
        return self.ctr_weight * loss_ctr + self.pred_weight * loss_pred


class EagerPCKD(nn.Module):
    """PCKD as the authors' code computes it (MuHeDing/PCKD at 610b3e8, ``helper/losses.py``
    ``CategoryConLoss``/``AlignLoss``, the ``pckd`` branch of ``helper/loops.py``; defaults of the
    README command ``-a 1 -b 0.05 -f 20``, ``-d`` 0): the category contrast materialises the
    (2BV, 2BV) SupCon logits. Submodule names as ``dcdkernels.PCKDLoss`` (states load across).
    ``forward(f_s, f_t, logit_s, logit_t, labels, fc_s, fc_t)``: all B * 4 view rows, labels (B,)."""

    def __init__(
        self, s_dim, t_dim, alpha=1.0, beta=0.05, ff=20.0, delta=0.0, kd_T=4.0, temperature=4.0, base_temperature=0.07
    ):
        super().__init__()
        self.embed_s = nn.Linear(s_dim, s_dim)
        self.embed_t = nn.Linear(s_dim, t_dim)
        self.align_mlp = _mlp(s_dim, 16 * t_dim, t_dim)
        self.register_buffer("epoch", torch.ones((), dtype=torch.int64))
        self.alpha, self.beta, self.ff, self.delta, self.kd_T = alpha, beta, ff, delta, kd_T
        self.T, self.base_T = temperature, base_temperature

    def _category_con(self, f_s, fcl_s, fcl_t, labels):
        n = f_s.shape[0]
        lab = labels.view(-1, 1)
        mask = torch.eq(lab, lab.t()).float().repeat(2, 2)
        fu_s = F.normalize(self.embed_s(f_s), dim=1) @ fcl_s
        fu_t = F.normalize(self.embed_t(f_s), dim=1) @ fcl_t
        anchor = torch.cat([fu_s, fu_t], 0)
        adc = anchor @ anchor.t() / self.T
        logits = adc - adc.max(dim=1, keepdim=True)[0].detach()
        logits_mask = torch.scatter(torch.ones_like(mask), 1, torch.arange(2 * n, device=f_s.device).view(-1, 1), 0)
        mask = mask * logits_mask
        log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True) + NCE_EPS)
        loss = (-(self.T / self.base_T) * (mask * log_prob).sum(1) / mask.sum(1)).view(2, n)
        return loss[0] + loss[1]

    def forward(self, f_s, f_t, logit_s, logit_t, labels, fc_s, fc_t):
        bs = labels.shape[0]
        nor = torch.arange(4 * bs, device=f_s.device) % 4 == 0
        f_t, logit_t = f_t.detach(), logit_t.detach()
        loss_cls = F.cross_entropy(logit_s[nor], labels)
        fc_sm = torch.cat([fc_s.weight, fc_s.bias[:, None]], 1)
        fc_tm = torch.cat([fc_t.weight, fc_t.bias[:, None]], 1).detach()
        loss_corr = F.mse_loss(fc_sm, fc_tm) if fc_sm.shape == fc_tm.shape else 0.0
        aug_target = labels.unsqueeze(1).expand(-1, 4).reshape(-1)
        loss_cc = self._category_con(f_s, fc_s.weight.t(), fc_t.weight.detach().t(), aug_target)
        fa = F.normalize(self.align_mlp(f_s), dim=-1)
        loss_align = 2 - 2 * (fa * F.normalize(f_t, dim=-1)).sum(dim=-1).mean()
        T = self.kd_T
        loss_tem = (
            F.kl_div(F.log_softmax(logit_s[nor] / T, 1), F.softmax(logit_t[nor] / T, 1), reduction="none").sum(1)
            * T
            * T
            / bs
        )
        alpha = F.cross_entropy(logit_s[nor], labels, reduction="none") / loss_cls
        t = 1.005 ** int(self.epoch)
        percent = torch.where(alpha <= t, torch.ones_like(alpha), torch.exp(-alpha.pow(2)))
        percent2 = percent.detach().repeat_interleave(4)
        loss1 = self.delta * torch.dot(percent, loss_tem)
        loss2 = torch.dot(percent2, self.beta * loss_cc) / (4 * bs)
        return loss_cls + loss1 + loss2 + self.alpha * loss_corr + self.ff * loss_align
