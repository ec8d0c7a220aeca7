"""torchdistill plug-in: ``import dcdkernels.integrations.torchdistill`` registers this library's
losses in torchdistill's middle-level loss registry, so a torchdistill YAML config selects them by
key (``pip install dcdkernels[torchdistill]``).

* ``DCDKCRDLoss``: the same kwargs and io-dict forward as torchdistill's own ``CRDLoss``
  (``torchdistill/losses/mid_level.py``): a config switches by changing ``key: 'CRDLoss'`` to
  ``key: 'DCDKCRDLoss'``. The embeddings come normalised from the ``Linear4CRD`` auxiliary
  wrappers (``*_norm_module_path``); ``pos_idx`` and the optional ``contrast_idx`` come from the
  supplementary dict that ``Linear4CRD.empty`` receives (``student_empty_module_path``). Scoring
  is one fused dual-bank NCE pass (:class:`dcdkernels.CRDLoss` with the heads left to torchdistill).
  Without ``contrast_idx`` the K negatives are drawn uniformly inside the kernel. State dicts of
  torchdistill's ``CRDLoss`` (``memory_v1``, ``memory_v2``, ``params``) load directly.
* ``DCDKDCDLoss``, ``DCDKCoCoRDLoss``, ``DCDKPCKDLoss``: the loss's own constructor kwargs plus
  the io-dict paths of its inputs (``student_module_path``/``student_module_io``,
  ``teacher_module_path``/``teacher_module_io``; DCD's memory form also
  ``student_empty_module_path`` for ``pos_idx``; PCKD ``student_fc_path``/``teacher_fc_path``,
  whose hooked input is the feature and output the logits). Their heads have parameters that
  torchdistill's optimizer does not see, and PCKD needs the classifier weights: call
  :func:`bind_distillation_box` once after ``get_distillation_box``.
"""

import math

import torch
from torch import Tensor, nn

from ..losses import CoCoRDLoss, CRDLoss, DCDLoss, PCKDLoss
from ..losses._common import remap_paired_memory_keys
from ..memory import check_loadable

try:
    from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, register_mid_level_loss
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dcdkernels.integrations.torchdistill needs torchdistill: pip install dcdkernels[torchdistill]"
    ) from exc

KEYS = ("DCDKCRDLoss", "DCDKDCDLoss", "DCDKCoCoRDLoss", "DCDKPCKDLoss")


def _get(io_dict: dict, path: str, io: str, side: str):
    if path not in io_dict:
        raise KeyError(
            f"{side} io_dict has no module path {path!r} (hooked: {sorted(io_dict)}); add it to the "
            f"{side}'s forward_hook {io} list in the config"
        )
    entry = io_dict[path]
    if io not in entry:
        raise KeyError(f"{side} io_dict[{path!r}] has no {io!r}; add {path!r} to the {side}'s forward_hook {io} list")
    return entry[io]


def _supp(student_io_dict: dict, path):
    if path is None:
        return None, None
    supp = _get(student_io_dict, path, "input", "student")
    return supp["pos_idx"], supp.get("contrast_idx")


class _PreNormalized(nn.Module):
    """Stands in for CRD's ``Embed`` head when the embeddings arrive normalised (torchdistill's
    ``Normalizer4CRD``): flatten and cast to the loss dtype, nothing else."""

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class DCDKCRDLoss(CRDLoss):
    """torchdistill's ``CRDLoss`` interface on the fused CRD (see the module docstring).

    Args (torchdistill's): ``student_norm_module_path``, ``student_empty_module_path``,
    ``teacher_norm_module_path``, ``input_size`` (embedding size), ``output_size`` (bank rows N),
    ``num_negative_samples`` (K), ``num_samples`` (N of the noise prior; must equal
    ``output_size``), ``temperature``, ``momentum``, ``eps`` (only 1e-7, the kernels' constant).
    Keyword-only extras: ``backend``, ``bank_dtype``, ``z_momentum``, ``seed`` (see
    :class:`dcdkernels.CRDLoss`).

    State (``memory``, a :class:`dcdkernels.memory.PairedMemoryBank`): ``memory.bank_s``
    (torchdistill's ``memory_v1``), ``memory.bank_t`` (``memory_v2``), ``memory.log_z`` (log of
    ``params[2:4]``), the negative stream; torchdistill's own keys load as they are.
    """

    def __init__(
        self,
        student_norm_module_path,
        student_empty_module_path,
        teacher_norm_module_path,
        input_size,
        output_size,
        num_negative_samples,
        num_samples,
        temperature=0.07,
        momentum=0.5,
        eps=1e-7,
        *,
        backend="auto",
        bank_dtype=torch.float32,
        z_momentum=None,
        seed=None,
    ):
        if num_samples != output_size:
            raise ValueError(
                f"num_samples ({num_samples}) must equal output_size ({output_size}): the noise "
                "prior K/N uses the number of bank rows"
            )
        if not math.isclose(float(eps), 1e-7, rel_tol=1e-6):
            raise ValueError(f"eps must be 1e-7 (the fused kernels' NCE constant), got {eps}")
        super().__init__(
            1,
            1,
            int(output_size),
            feat_dim=int(input_size),
            nce_k=int(num_negative_samples),
            nce_t=float(temperature),
            nce_m=float(momentum),
            z_momentum=z_momentum,
            backend=backend,
            bank_dtype=bank_dtype,
            seed=seed,
        )
        self.embed_s = _PreNormalized(int(input_size))
        self.embed_t = _PreNormalized(int(input_size))
        self.student_norm_module_path = student_norm_module_path
        self.student_empty_module_path = student_empty_module_path
        self.teacher_norm_module_path = teacher_norm_module_path
        self.register_load_state_dict_pre_hook(_remap_torchdistill_keys)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        z_t = _get(teacher_io_dict, self.teacher_norm_module_path, "output", "teacher")
        z_s = _get(student_io_dict, self.student_norm_module_path, "output", "student")
        pos_idx, contrast_idx = _supp(student_io_dict, self.student_empty_module_path)
        device = z_s.device
        if self.bank_s.device != device:
            self.to(device)
        pos_idx = pos_idx.to(device)
        if contrast_idx is not None:
            contrast_idx = contrast_idx.to(device)
        return super().forward(z_s, z_t, pos_idx, contrast_idx)


def _remap_torchdistill_keys(
    module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
) -> None:
    """torchdistill ``CRDLoss.state_dict()`` keys -> ours: ``memory_v1/v2`` -> ``memory.bank_s/t``,
    ``params[2:4]`` (Z_v1, Z_v2; -1 unset) -> ``memory.log_z``; the stream keeps its current state.
    Runs after ``CRDLoss``'s own hook, so it finishes the remap and validates the result itself."""
    for old, new in (("memory_v1", "memory.bank_s"), ("memory_v2", "memory.bank_t")):
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
    params = state_dict.pop(prefix + "params", None)
    if params is not None and prefix + "memory.log_z" not in state_dict:
        z = torch.as_tensor(params)[2:4].detach().double().cpu()
        log_z = torch.where(z > 0, z.clamp_min(1e-300).log(), torch.full_like(z, float("nan")))
        state_dict[prefix + "memory.log_z"] = log_z.to(module.log_z.dtype)
    remap_paired_memory_keys(module, state_dict, prefix)
    check_loadable(module, state_dict, prefix)


class _IOPaths:
    """io-dict paths of a wrapped loss's feature inputs (the kwargs every adapter takes)."""

    def _set_paths(
        self,
        student_module_path,
        teacher_module_path,
        student_module_io,
        teacher_module_io,
        student_empty_module_path=None,
    ):
        self.student_module_path, self.student_module_io = student_module_path, student_module_io
        self.teacher_module_path, self.teacher_module_io = teacher_module_path, teacher_module_io
        self.student_empty_module_path = student_empty_module_path

    def _features(self, student_io_dict, teacher_io_dict):
        f_s = _get(student_io_dict, self.student_module_path, self.student_module_io, "student")
        f_t = _get(teacher_io_dict, self.teacher_module_path, self.teacher_module_io, "teacher")
        return f_s, f_t

    def _to_device(self, device):
        if any(b.device != device for b in self.buffers()):
            self.to(device)


class DCDKDCDLoss(_IOPaths, DCDLoss):
    """:class:`dcdkernels.DCDLoss` on io-dict inputs: ``student_module_path``/``_io`` (f_s),
    ``teacher_module_path``/``_io`` (f_t), ``student_empty_module_path`` (memory form:
    ``pos_idx``/``contrast_idx`` of the supplementary dict); the other kwargs are DCDLoss's."""

    def __init__(
        self,
        student_module_path,
        teacher_module_path,
        student_module_io="output",
        teacher_module_io="output",
        student_empty_module_path=None,
        **kwargs,
    ):
        DCDLoss.__init__(self, **kwargs)
        self._set_paths(
            student_module_path, teacher_module_path, student_module_io, teacher_module_io, student_empty_module_path
        )

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        f_s, f_t = self._features(student_io_dict, teacher_io_dict)
        self._to_device(f_s.device)
        idx, contrast_idx = _supp(student_io_dict, self.student_empty_module_path)
        idx = None if idx is None else idx.to(f_s.device)
        contrast_idx = None if contrast_idx is None else contrast_idx.to(f_s.device)
        return DCDLoss.forward(self, f_s, f_t, idx, contrast_idx)


class DCDKCoCoRDLoss(_IOPaths, CoCoRDLoss):
    """:class:`dcdkernels.CoCoRDLoss` on io-dict inputs (``student_module_path``/``_io``,
    ``teacher_module_path``/``_io``); the other kwargs are CoCoRDLoss's."""

    def __init__(
        self, student_module_path, teacher_module_path, student_module_io="output", teacher_module_io="output", **kwargs
    ):
        CoCoRDLoss.__init__(self, **kwargs)
        self._set_paths(student_module_path, teacher_module_path, student_module_io, teacher_module_io)

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        f_s, f_t = self._features(student_io_dict, teacher_io_dict)
        self._to_device(f_s.device)
        return CoCoRDLoss.forward(self, f_s, f_t)


class DCDKPCKDLoss(PCKDLoss):
    """:class:`dcdkernels.PCKDLoss` on io-dict inputs: hook the classifiers (``student_fc_path``,
    ``teacher_fc_path``; default ``'fc'``, torchvision's ResNets) for input and output: the input
    is the feature, the output the logits, ``targets`` the labels. The classifier weights come from
    the models bound by :func:`bind_distillation_box`. The other kwargs are PCKDLoss's, except that
    ``num_views`` defaults to 1: a torchdistill pipeline feeds one view per image unless its dataset
    stacks PCKD's four rotations (then pass ``num_views=4``, rows image-major)."""

    def __init__(self, student_fc_path="fc", teacher_fc_path="fc", num_views=1, **kwargs):
        super().__init__(num_views=num_views, **kwargs)
        self.student_fc_path, self.teacher_fc_path = student_fc_path, teacher_fc_path
        self._models = None

    def bind(self, student_model: nn.Module, teacher_model: nn.Module) -> None:
        """The models whose ``*_fc_path`` modules hold the classifier weights (not registered as
        submodules: the loss does not own them)."""
        self._models = (student_model, teacher_model)

    def forward(self, student_io_dict, teacher_io_dict, targets, *args, **kwargs):
        if self._models is None:
            raise RuntimeError(
                "DCDKPCKDLoss needs the classifier weights: call "
                "dcdkernels.integrations.torchdistill.bind_distillation_box(box) first"
            )
        f_s = _get(student_io_dict, self.student_fc_path, "input", "student")
        f_t = _get(teacher_io_dict, self.teacher_fc_path, "input", "teacher")
        logit_s = _get(student_io_dict, self.student_fc_path, "output", "student")
        logit_t = _get(teacher_io_dict, self.teacher_fc_path, "output", "teacher")
        f_s, f_t = (f[0] if isinstance(f, (tuple, list)) else f for f in (f_s, f_t))
        if any(b.device != f_s.device for b in self.buffers()):
            self.to(f_s.device)
        fc_s = _find_module(self._models[0], self.student_fc_path)
        fc_t = _find_module(self._models[1], self.teacher_fc_path)
        return super().forward(f_s, f_t, logit_s, logit_t, targets.to(f_s.device), fc_s, fc_t)


def _find_module(model: nn.Module, path: str) -> nn.Module:
    """``path`` in ``model``, also through torchdistill's wrappers (``model.fc`` or ``fc``)."""
    for root in (model, getattr(model, "module", None), getattr(model, "model", None)):
        if root is None:
            continue
        try:
            return root.get_submodule(path)
        except AttributeError:
            continue
    raise AttributeError(f"no module {path!r} in {type(model).__name__}")


def dcdk_losses(criterion: nn.Module):
    """The dcdkernels losses inside a torchdistill criterion (a ``WeightedSumLoss`` keeps its
    terms in a plain ``term_dict``, not as submodules)."""
    found, stack = [], [criterion]
    while stack:
        for m in stack.pop().modules():
            if isinstance(m, (CRDLoss, DCDLoss, CoCoRDLoss, PCKDLoss)) and all(m is not f for f in found):
                found.append(m)
            stack.extend(term for term, _ in getattr(m, "term_dict", {}).values() if isinstance(term, nn.Module))
    return found


def bind_distillation_box(box) -> list:
    """Once after ``torchdistill.core.distillation.get_distillation_box``: binds the models to
    ``DCDKPCKDLoss`` terms, moves the losses to the box's device and adds the trainable
    parameters of every dcdkernels loss (heads, scales) to the box's optimizer as one more
    parameter group (the first group's hyper-parameters). Returns the losses found."""
    losses = dcdk_losses(box.criterion)
    params = []
    for loss in losses:
        loss.to(box.device)
        if isinstance(loss, DCDKPCKDLoss):
            loss.bind(box.student_model, box.teacher_model)
        params.extend(p for p in loss.parameters() if p.requires_grad)
    opt = getattr(box, "optimizer", None)
    if params and opt is not None:
        known = {id(p) for g in opt.param_groups for p in g["params"]}
        new = [p for p in params if id(p) not in known]
        if new:
            opt.add_param_group({"params": new})
    return losses


for _key, _cls in zip(KEYS, (DCDKCRDLoss, DCDKDCDLoss, DCDKCoCoRDLoss, DCDKPCKDLoss)):
    if MIDDLE_LEVEL_LOSS_DICT.get(_key) is not _cls:
        register_mid_level_loss(_cls, key=_key)
