"""torchdistill plug-in (issue 14): the registry keys, DCDKCRDLoss against torchdistill's own
CRDLoss, and a torchdistill YAML config run through torchdistill's DistillationBox."""

import copy
import os

import pytest
import torch
from helpers import close_fp32 as _close
from torch import nn

pytest.importorskip("torchdistill")
pytest.importorskip("torchvision")

from torchdistill.losses.mid_level import CRDLoss as TDCRDLoss  # noqa: E402
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_mid_level_loss  # noqa: E402

from dcdkernels.integrations import torchdistill as dcdk_td  # noqa: E402

N, D, K, B = 40, 16, 9, 6


pytestmark = pytest.mark.usefixtures("single_thread")


def test_keys_registered():
    for key in dcdk_td.KEYS:
        assert key in MIDDLE_LEVEL_LOSS_DICT, key
    assert MIDDLE_LEVEL_LOSS_DICT["DCDKCRDLoss"] is dcdk_td.DCDKCRDLoss


def _crd_kwargs():
    return dict(
        student_norm_module_path="normalizer",
        student_empty_module_path="empty",
        teacher_norm_module_path="normalizer",
        input_size=D,
        output_size=N,
        num_negative_samples=K,
        num_samples=N,
        temperature=0.07,
        momentum=0.5,
        eps=1e-7,
    )


def _io(z_s, z_t, pos_idx, contrast_idx):
    student = {"normalizer": {"output": z_s}, "empty": {"input": {"pos_idx": pos_idx, "contrast_idx": contrast_idx}}}
    return student, {"normalizer": {"output": z_t}}


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_crd_equals_torchdistill_over_three_steps(backend):
    """Same kwargs (through the registry, as a YAML config builds it), same state, same inputs:
    loss, gradients and both memory buffers equal torchdistill's CRDLoss at every step."""
    torch.manual_seed(0)
    ref = TDCRDLoss(**_crd_kwargs())
    cfg = {"key": "DCDKCRDLoss", "kwargs": dict(_crd_kwargs())}
    ours = get_mid_level_loss(cfg)
    ours.backend = backend
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # torchdistill's keys load directly
    assert torch.equal(ours.bank_s, ref.memory_v1) and torch.equal(ours.bank_t, ref.memory_v2)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        h_s = torch.randn(B, D, generator=gen)
        h_t = torch.randn(B, D, generator=gen)
        pos = torch.randperm(N, generator=gen)[:B]
        neg = torch.randint(0, N, (B, K), generator=gen)
        contrast_idx = torch.cat([pos[:, None], neg], dim=1)
        grads = []
        losses = []
        for mod in (ref, ours):
            a = h_s.clone().requires_grad_(True)
            b = h_t.clone().requires_grad_(True)
            z_s = a / a.pow(2).sum(1, keepdim=True).pow(0.5)  # torchdistill's Normalizer4CRD
            z_t = b / b.pow(2).sum(1, keepdim=True).pow(0.5)
            loss = mod(*_io(z_s, z_t, pos.clone(), contrast_idx.clone()))
            loss.backward()
            losses.append(loss.detach().reshape(()))
            grads.append((a.grad, b.grad))
        _close(losses[1], losses[0], f"loss, step {step}")
        _close(grads[1][0], grads[0][0], f"grad student, step {step}")
        _close(grads[1][1], grads[0][1], f"grad teacher, step {step}")
        _close(ours.bank_s, ref.memory_v1, f"memory_v1, step {step}")
        _close(ours.bank_t, ref.memory_v2, f"memory_v2, step {step}")
        _close(ours.log_z.double().exp(), ref.params[2:4].detach().double(), f"Z, step {step}")


def test_crd_rejects_what_it_cannot_honour():
    kw = _crd_kwargs()
    with pytest.raises(ValueError, match="num_samples"):
        dcdk_td.DCDKCRDLoss(**{**kw, "num_samples": N + 1})
    with pytest.raises(ValueError, match="eps"):
        dcdk_td.DCDKCRDLoss(**{**kw, "eps": 1e-5})
    loss = dcdk_td.DCDKCRDLoss(**kw)
    with pytest.raises(KeyError, match="normalizer"):
        loss({"empty": {"input": {"pos_idx": torch.arange(B)}}}, {"normalizer": {"output": torch.randn(B, D)}})


def test_dcd_adapter_equals_the_loss():
    from dcdkernels.losses import DCDLoss

    torch.manual_seed(0)
    ref = DCDLoss(12, 20, feat_dim=8)
    torch.manual_seed(0)
    ours = get_mid_level_loss(
        {
            "key": "DCDKDCDLoss",
            "kwargs": dict(
                student_module_path="model.avgpool", teacher_module_path="model.avgpool", s_dim=12, t_dim=20, feat_dim=8
            ),
        }
    )
    f_s, f_t = torch.randn(B, 12), torch.randn(B, 20)
    got = ours({"model.avgpool": {"output": f_s}}, {"model.avgpool": {"output": f_t}}, None)
    torch.testing.assert_close(got, ref(f_s, f_t), rtol=0, atol=0)


def test_cocord_adapter_equals_the_loss():
    from dcdkernels.losses import CoCoRDLoss

    kw = dict(s_dim=12, t_dim=20, embed_dim=16, hidden_dim=16, pred_dim=8, queue_size=32, pred_weight=0.0)
    torch.manual_seed(0)
    ref = CoCoRDLoss(**kw)
    torch.manual_seed(0)
    ours = get_mid_level_loss(
        {
            "key": "DCDKCoCoRDLoss",
            "kwargs": dict(student_module_path="model.avgpool", teacher_module_path="model.avgpool", **kw),
        }
    )
    for _ in range(2):  # the queue moves identically
        f_s, f_t = torch.randn(B, 12), torch.randn(B, 20)
        got = ours({"model.avgpool": {"output": f_s}}, {"model.avgpool": {"output": f_t}}, None)
        torch.testing.assert_close(got, ref(f_s, f_t), rtol=0, atol=0)
    assert torch.equal(ours.queue, ref.queue)


def test_pckd_adapter_and_bind():
    """DCDKPCKDLoss reads features and logits from the classifiers' hooks and the weights from
    the bound models; bind_distillation_box also puts the loss's heads into the optimizer."""
    from types import SimpleNamespace

    from dcdkernels.losses import PCKDLoss

    student, teacher = nn.Linear(12, 5), nn.Linear(20, 5)
    student_model, teacher_model = nn.Sequential(), nn.Sequential()
    student_model.fc, teacher_model.fc = student, teacher
    torch.manual_seed(0)
    ref = PCKDLoss(12, 20, num_views=1)
    torch.manual_seed(0)
    ours = get_mid_level_loss({"key": "DCDKPCKDLoss", "kwargs": dict(s_dim=12, t_dim=20)})
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    criterion = nn.Module()
    criterion.term_dict = {"pckd": (ours, 1.0)}  # as torchdistill's WeightedSumLoss keeps its terms
    box = SimpleNamespace(
        criterion=criterion,
        optimizer=opt,
        device=torch.device("cpu"),
        student_model=student_model,
        teacher_model=teacher_model,
    )
    with pytest.raises(RuntimeError, match="bind_distillation_box"):
        ours({}, {}, torch.zeros(B, dtype=torch.int64))
    assert dcdk_td.bind_distillation_box(box) == [ours]
    assert len(opt.param_groups) == 2 and len(opt.param_groups[1]["params"]) == len(list(ours.parameters()))
    assert len(dcdk_td.bind_distillation_box(box)) == 1 and len(opt.param_groups) == 2  # idempotent
    f_s, f_t = torch.randn(B, 12), torch.randn(B, 20)
    y = torch.randint(0, 5, (B,))
    s_io = {"fc": {"input": (f_s,), "output": student(f_s)}}
    t_io = {"fc": {"input": (f_t,), "output": teacher(f_t)}}
    got = ours(s_io, t_io, y)
    want = ref(f_s, f_t, student(f_s), teacher(f_t), y, student, teacher)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_crd_in_kernel_negatives_without_contrast_idx():
    """Without contrast_idx (torchdistill's own draw() path) the negatives come from the kernel's
    stream, which advances by B*K per training step."""
    loss = dcdk_td.DCDKCRDLoss(**_crd_kwargs())
    z = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    out = loss(*_io(z, z.flip(0), torch.arange(B), None))
    assert torch.isfinite(out) and int(loss.rng_state[1]) == B * K


# ------------------------------------------------------------------ one epoch of a YAML config
_IMAGES_PER_CLASS, _CLASSES = 8, 2


def _tiny_image_folder(root):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in range(_CLASSES):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(_IMAGES_PER_CLASS):
            px = (torch.rand(16, 16, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(os.path.join(root, f"class{c}", f"{i}.png"))


class _Tiny(nn.Module):
    """A 'torchvision-shaped' classifier: ``avgpool`` then ``fc``, as the CRD config hooks."""

    def __init__(self, width, num_classes=_CLASSES):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(torch.relu(self.conv(x))), 1))


_YAML = """
datasets:
  tiny:
    train: &train !import_call
      key: 'torchvision.datasets.ImageFolder'
      init:
        kwargs:
          root: '{root}'
          transform: !import_call
            key: 'torchvision.transforms.ToTensor'
            init:
train:
  num_epochs: 1
  train_data_loader:
    dataset_id: 'tiny/train'
    sampler:
      class_or_func: !import_get
        key: 'torch.utils.data.RandomSampler'
      kwargs:
    kwargs:
      batch_size: 4
      num_workers: 0
    dataset_wrapper:
      key: 'CRDDatasetWrapper'
      kwargs:
        num_negative_samples: &k 5
        mode: 'exact'
        ratio: 1.0
  teacher:
    forward_proc: 'forward_batch_supp_dict'
    sequential: []
    auxiliary_model_wrapper:
      key: 'Linear4CRD'
      kwargs:
        input_module_path: 'model.avgpool'
        linear_kwargs: {{in_features: 6, out_features: &feat 8, bias: True}}
        power: 2
    forward_hook:
      input: []
      output: ['model.avgpool', 'normalizer']
    wrapper:
    requires_grad: True
    frozen_modules: ['model']
  student:
    forward_proc: 'forward_batch_supp_dict'
    adaptations:
    sequential: []
    auxiliary_model_wrapper:
      key: 'Linear4CRD'
      kwargs:
        input_module_path: 'model.avgpool'
        linear_kwargs: {{in_features: 4, out_features: *feat, bias: True}}
        power: 2
    forward_hook:
      input: ['empty']
      output: ['model.avgpool', 'normalizer']
    wrapper:
    requires_grad: True
    frozen_modules: []
  optimizer:
    key: 'SGD'
    kwargs:
      lr: 0.05
      momentum: 0.9
  criterion:
    key: 'WeightedSumLoss'
    kwargs:
      sub_terms:
        ce:
          criterion:
            key: 'CrossEntropyLoss'
            kwargs:
              reduction: 'mean'
          criterion_wrapper:
            key: 'SimpleLossWrapper'
            kwargs:
              input:
                is_from_teacher: False
                module_path: '.'
                io: 'output'
              target:
                uses_label: True
          weight: 1.0
        crd:
          criterion:
            key: '{key}'
            kwargs:
              teacher_norm_module_path: 'normalizer'
              student_norm_module_path: 'normalizer'
              student_empty_module_path: 'empty'
              input_size: *feat
              output_size: &n {n}
              num_negative_samples: *k
              num_samples: *n
              temperature: 0.07
              momentum: 0.5
              eps: 0.0000001
          weight: 0.8
"""


def _run_epoch(tmp_path, key):
    """One epoch of the config through torchdistill's own machinery: ``load_yaml_file`` (its
    ``!import_call`` tags build the dataset), ``get_distillation_box`` (data loader with its
    CRDDatasetWrapper, Linear4CRD wrappers, forward hooks, the criterion from the registry,
    optimizer) and the box's ``pre_epoch_process`` / ``forward_process`` / ``post_forward_process``
    loop of torchdistill's example script ``examples/torchvision/image_classification.py``
    (``train_one_epoch``; the script itself is not part of the package)."""
    from torchdistill.common import yaml_util
    from torchdistill.core.distillation import get_distillation_box

    root = str(tmp_path / "images")
    _tiny_image_folder(root)
    path = tmp_path / "crd.yaml"
    path.write_text(_YAML.format(root=root, key=key, n=_CLASSES * _IMAGES_PER_CLASS))
    config = yaml_util.load_yaml_file(str(path))
    dataset_dict = {"tiny/train": config["datasets"]["tiny"]["train"]}
    torch.manual_seed(0)
    teacher, student = _Tiny(6), _Tiny(4)
    box = get_distillation_box(teacher, student, dataset_dict, config["train"], torch.device("cpu"), None, False, 1)
    if key.startswith("DCDK"):
        assert dcdk_td.bind_distillation_box(box)
    box.pre_epoch_process(epoch=0)
    losses = []
    for sample_batch, targets, supp_dict in box.train_data_loader:
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss)
        losses.append(float(loss.detach()))
    return box, losses


def test_yaml_config_runs_one_epoch(tmp_path):
    box, losses = _run_epoch(tmp_path, "DCDKCRDLoss")
    assert len(losses) == (_CLASSES * _IMAGES_PER_CLASS) // 4
    assert all(torch.isfinite(torch.tensor(losses)))
    crd = dcdk_td.dcdk_losses(box.criterion)[0]
    assert isinstance(crd, dcdk_td.DCDKCRDLoss)
    assert torch.isfinite(crd.log_z).all()  # Z set by the first batch
    # Every dataset row was written once by the momentum update: unit rows.
    torch.testing.assert_close(crd.bank_s.norm(dim=1), torch.ones(crd.bank_s.shape[0]))
