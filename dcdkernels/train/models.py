"""Model zoo of the reference trainers.

Every model takes ``forward(x, is_feat=False, preact=False)`` and returns the logits, or with
``is_feat=True`` the pair ``(feats, logits)`` where ``feats`` is a list of intermediate feature
maps whose last element is the pooled penultimate vector (the input of the classifier): the
interface of RepDistiller's CIFAR models, so its distillers (CRD uses ``feats[-1]``) plug in.
Each model also exposes ``feat_dim`` (size of ``feats[-1]``); ``get_classifier(model)`` returns
its final ``nn.Linear`` (whose weight rows are PCKD's category centres). Parameter names follow
RepDistiller's, so its published teacher checkpoints (``{'model': state_dict}``) load with
``--teacher-ckpt``.

The CIFAR architectures follow the definitions of RepDistiller's ``models/`` (HobbitLong/
RepDistiller: resnet.py, wrn.py, vgg.py (the ``_bn`` variants, as its ``model_dict`` maps
``vgg8``/``vgg13`` to them), mobilenetv2.py (``mobile_half``: expansion 6, width 0.5),
ShuffleNetv1.py, ShuffleNetv2.py (net_size 1)), so layer shapes, parameter counts and the feature
list match; they are re-implemented here, not copied. Two small CNNs (``digits_teacher``,
``digits_student``) serve the embedded 8x8 digits dataset and train on a CPU in seconds;
``resnet18`` / ``resnet34`` are torchvision's (ImageNet-style inputs, ``--dataset imagefolder``).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["MODELS", "build_model", "get_classifier", "model_names"]


def _kaiming_fan_out(module):
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _he_normal_fan_out(module, linear_std=None):
    """N(0, sqrt(2 / (k*k*out))) convs, unit BN, zero Linear bias (and N(0, linear_std) weight)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def _out(feats, logits, is_feat):
    return (feats, logits) if is_feat else logits


# ----------------------------------------------------------------------------------------------
# CIFAR ResNet (resnet8/14/20/32/44/56/110, resnet8x4, resnet32x4): 3 stages, 6n+2 layers
# ----------------------------------------------------------------------------------------------
def _three_stage_forward(model, head, x, is_feat, preact):
    """conv1-bn1-relu, three stages that also return their pre-activation, pool, ``head``: the
    forward of RepDistiller's CIFAR ResNets and ShuffleNetV1 (which name the head fc / linear)."""
    f0 = F.relu(model.bn1(model.conv1(x)))
    f1, p1 = model.layer1(f0)
    f2, p2 = model.layer2(f1)
    f3, p3 = model.layer3(f2)
    f4 = F.adaptive_avg_pool2d(f3, 1).flatten(1)
    feats = [f0, p1, p2, p3, f4] if preact else [f0, f1, f2, f3, f4]
    return _out(feats, head(f4), is_feat)


class _ResBasic(nn.Module):
    expansion = 1

    def __init__(self, c_in, c_out, stride=1, last=False):
        super().__init__()
        self.last = last
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        pre = y + (x if self.downsample is None else self.downsample(x))
        out = F.relu(pre)
        return (out, pre) if self.last else out


class CifarResNet(nn.Module):
    def __init__(self, depth, widths, num_classes=100, in_channels=3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        c = widths[0]
        stages = []
        for i, (w, s) in enumerate(zip(widths[1:], (1, 2, 2))):
            blocks = [_ResBasic(c if j == 0 else w, w, s if j == 0 else 1, last=(j == n - 1)) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            c = w
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(c, num_classes)
        self.feat_dim = c
        _kaiming_fan_out(self)

    def forward(self, x, is_feat=False, preact=False):
        return _three_stage_forward(self, self.fc, x, is_feat, preact)


# ----------------------------------------------------------------------------------------------
# Wide ResNet (wrn_16_1/2, wrn_40_1/2): pre-activation blocks, depth 6n+4
# ----------------------------------------------------------------------------------------------
class _WideBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.convShortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)

    def forward(self, x):
        a = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(a))))
        # an identity block adds the raw input, a projecting block the projected activation
        return y + (x if self.convShortcut is None else self.convShortcut(a))


class _WideGroup(nn.Module):
    def __init__(self, n, c_in, c_out, stride):
        super().__init__()
        self.layer = nn.Sequential(
            *[_WideBlock(c_in if j == 0 else c_out, c_out, stride if j == 0 else 1) for j in range(n)]
        )

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen, num_classes=100, in_channels=3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        self.block1 = _WideGroup(n, ch[0], ch[1], 1)
        self.block2 = _WideGroup(n, ch[1], ch[2], 2)
        self.block3 = _WideGroup(n, ch[2], ch[3], 2)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.feat_dim = ch[3]
        _he_normal_fan_out(self)

    def forward(self, x, is_feat=False, preact=False):
        f0 = self.conv1(x)
        f1 = self.block1(f0)
        f2 = self.block2(f1)
        f3 = self.block3(f2)
        f4 = F.adaptive_avg_pool2d(F.relu(self.bn1(f3)), 1).flatten(1)
        logits = self.fc(f4)
        if preact:
            f1, f2, f3 = self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2), self.bn1(f3)
        return _out([f0, f1, f2, f3, f4], logits, is_feat)


# ----------------------------------------------------------------------------------------------
# VGG with BN, FC layers removed (vgg8 = cfg S, vgg11 = A, vgg13 = B, vgg16 = D, vgg19 = E)
# ----------------------------------------------------------------------------------------------
_VGG_CFG = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _vgg_stage(widths, c_in):
    layers = []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        c_in = w
    return nn.Sequential(*layers[:-1])  # the stage ends on BN: the caller applies the ReLU


class VGG(nn.Module):
    def __init__(self, cfg, num_classes=100, in_channels=3):
        super().__init__()
        cfg = _VGG_CFG[cfg]
        c = in_channels
        stages = []
        for widths in cfg:
            stages.append(_vgg_stage(widths, c))
            c = widths[-1]
        self.block0, self.block1, self.block2, self.block3, self.block4 = stages
        self.classifier = nn.Linear(512, num_classes)
        self.feat_dim = 512
        _he_normal_fan_out(self, linear_std=0.01)

    def forward(self, x, is_feat=False, preact=False):
        h = x.shape[2]
        f0 = F.relu(self.block0(x))
        x = F.max_pool2d(f0, 2)
        p1 = self.block1(x)
        f1 = F.relu(p1)
        p2 = self.block2(F.max_pool2d(f1, 2))
        f2 = F.relu(p2)
        x = F.max_pool2d(f2, 2)
        p3 = self.block3(x)
        f3 = F.relu(p3)
        x = F.max_pool2d(f3, 2) if h == 64 else f3
        p4 = self.block4(x)
        f4 = F.relu(p4)
        f5 = F.adaptive_avg_pool2d(f4, 1).flatten(1)
        logits = self.classifier(f5)
        feats = [f0, p1, p2, p3, p4, f5] if preact else [f0, f1, f2, f3, f4, f5]
        return _out(feats, logits, is_feat)


# ----------------------------------------------------------------------------------------------
# MobileNetV2 (RepDistiller's ``mobile_half``: expansion T=6, width 0.5, 1280-d head)
# ----------------------------------------------------------------------------------------------
def _conv_bn_relu(c_in, c_out, k, s):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _InvRes(nn.Module):
    def __init__(self, c_in, c_out, stride, t):
        super().__init__()
        hidden = c_in * t
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False),
            nn.BatchNorm2d(c_out),
        )

    def forward(self, x):
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=100, t=6, width=0.5, in_channels=3):
        super().__init__()
        setting = [
            (1, 16, 1, 1),
            (t, 24, 2, 1),
            (t, 32, 3, 2),
            (t, 64, 4, 2),
            (t, 96, 3, 1),
            (t, 160, 3, 2),
            (t, 320, 1, 1),
        ]
        c = int(32 * width)
        self.conv1 = _conv_bn_relu(in_channels, c, 3, 2)
        self.blocks = nn.ModuleList()
        for tt, ch, n, s in setting:
            out = int(ch * width)
            layers = []
            for i in range(n):
                layers.append(_InvRes(c, out, s if i == 0 else 1, tt))
                c = out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.feat_dim = self.last_channel
        _he_normal_fan_out(self, linear_std=0.01)

    def forward(self, x, is_feat=False, preact=False):
        f0 = self.conv1(x)
        x = self.blocks[1](self.blocks[0](f0))
        f1 = x
        f2 = x = self.blocks[2](x)
        f3 = x = self.blocks[4](self.blocks[3](x))
        f4 = x = self.blocks[6](self.blocks[5](x))
        # RepDistiller pools with AvgPool2d(input_size // 16, ceil_mode=True): 2x2 on 32x32
        # inputs, i.e. a global average here
        f5 = F.adaptive_avg_pool2d(self.conv2(x), 1).flatten(1)
        logits = self.classifier(f5)
        return _out([f0, f1, f2, f3, f4, f5], logits, is_feat)


# ----------------------------------------------------------------------------------------------
# ShuffleNet V1 (groups 3, 240/480/960) and V2 (net size 1: 116/232/464, 1024 head)
# ----------------------------------------------------------------------------------------------
def _channel_shuffle(x, groups):
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleV1Unit(nn.Module):
    def __init__(self, c_in, c_out, stride, groups, last=False):
        super().__init__()
        self.stride, self.last = stride, last
        mid = c_out // 4
        self.g1 = 1 if c_in == 24 else groups  # the first unit sees the 24-channel stem: no grouping
        self.conv1 = nn.Conv2d(c_in, mid, 1, groups=self.g1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, 1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        y = _channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        y = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(y)))))
        if self.stride == 2:
            pre = torch.cat([y, F.avg_pool2d(x, 3, 2, 1)], 1)
        else:
            pre = y + x
        out = F.relu(pre)
        return (out, pre) if self.last else out


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes=100, out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c = 24
        stages = []
        for planes, n in zip(out_planes, num_blocks):
            units = []
            for i in range(n):
                # a stride-2 unit concatenates its input, so its branch makes planes - c_in channels
                units.append(
                    _ShuffleV1Unit(c, planes - (c if i == 0 else 0), 2 if i == 0 else 1, groups, last=(i == n - 1))
                )
                c = planes
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(c, num_classes)
        self.feat_dim = c

    def forward(self, x, is_feat=False, preact=False):
        return _three_stage_forward(self, self.linear, x, is_feat, preact)


class _ShuffleV2Unit(nn.Module):
    def __init__(self, c, last=False):
        super().__init__()
        self.last = last
        h = c // 2
        self.conv1 = nn.Conv2d(h, h, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(h)
        self.conv2 = nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False)
        self.bn2 = nn.BatchNorm2d(h)
        self.conv3 = nn.Conv2d(h, h, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(h)

    def forward(self, x):
        h = x.shape[1] // 2
        x1, x2 = x[:, :h], x[:, h:]
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        pre = self.bn3(self.conv3(y))
        out = _channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        return (out, torch.cat([x1, pre], 1)) if self.last else out


class _ShuffleV2Down(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        mid = c_out // 2
        # left branch: depthwise stride 2, pointwise; right: pointwise, depthwise stride 2, pointwise
        self.conv1 = nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, 3, 2, 1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return _channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes=100, out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        c = 24
        stages = []
        for ch, n in zip(out_channels[:3], num_blocks):
            stages.append(
                nn.Sequential(_ShuffleV2Down(c, ch), *[_ShuffleV2Unit(ch, last=(i == n - 1)) for i in range(n)])
            )
            c = ch
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(c, out_channels[3], 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feat_dim = out_channels[3]

    def forward(self, x, is_feat=False, preact=False):
        f0 = F.relu(self.bn1(self.conv1(x)))
        x, p1 = self.layer1(f0)
        f1 = x
        x, p2 = self.layer2(x)
        f2 = x
        x, p3 = self.layer3(x)
        f3 = x
        f4 = F.adaptive_avg_pool2d(F.relu(self.bn2(self.conv2(x))), 1).flatten(1)
        logits = self.linear(f4)
        feats = [f0, p1, p2, p3, f4] if preact else [f0, f1, f2, f3, f4]
        return _out(feats, logits, is_feat)


# ----------------------------------------------------------------------------------------------
# Small CNNs for the embedded digits dataset (1x8x8 inputs)
# ----------------------------------------------------------------------------------------------
class DigitsCNN(nn.Module):
    """conv-BN-ReLU stages on 8x8 inputs, a 2x2 max pool after the stages listed in ``pool_after``,
    then a global average and a linear classifier. ``feat_dim`` = last width."""

    def __init__(self, widths, num_classes=10, in_channels=1, pool_after=(1,)):
        super().__init__()
        c = in_channels
        self.stages = nn.ModuleList()
        for w in widths:
            self.stages.append(
                nn.Sequential(nn.Conv2d(c, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
            )
            c = w
        self.pool_after = set(pool_after)
        self.fc = nn.Linear(c, num_classes)
        self.feat_dim = c
        _kaiming_fan_out(self)

    def forward(self, x, is_feat=False, preact=False):
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            feats.append(x)
            if i in self.pool_after:
                x = F.max_pool2d(x, 2)
        f = F.adaptive_avg_pool2d(x, 1).flatten(1)
        feats.append(f)
        return _out(feats, self.fc(f), is_feat)


def digits_teacher(num_classes=10, in_channels=1):
    """3 conv stages (32, 64, 128), 94k parameters."""
    return DigitsCNN((32, 64, 128), num_classes, in_channels, pool_after=(1,))


def digits_student(num_classes=10, in_channels=1):
    """2 thin conv stages (8, 16), 1.4k parameters: weak enough for a teacher to help."""
    return DigitsCNN((8, 16), num_classes, in_channels, pool_after=(0,))


# ----------------------------------------------------------------------------------------------
# torchvision ResNets (ImageNet-style inputs): torchvision's own modules and parameter names, so
# its checkpoints (e.g. ``ResNet34_Weights.IMAGENET1K_V1``, a bare state_dict) load as teachers
# ----------------------------------------------------------------------------------------------
def _torchvision_resnet(blocks):
    from torchvision.models.resnet import BasicBlock, ResNet

    class TorchvisionResNet(ResNet):
        """``torchvision.models.resnet18/34`` with the zoo's ``forward(x, is_feat)``: ``feats`` =
        the four stage outputs and the pooled 512-d vector (the input of ``fc``)."""

        def __init__(self, num_classes=1000, in_channels=3):
            super().__init__(BasicBlock, blocks, num_classes=num_classes)
            if in_channels != 3:
                self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
                nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
            self.feat_dim = 512

        def forward(self, x, is_feat=False, preact=False):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            feats = []
            for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
                x = layer(x)
                feats.append(x)
            f = torch.flatten(self.avgpool(x), 1)
            feats.append(f)
            return _out(feats, self.fc(f), is_feat)

    return TorchvisionResNet


MODELS = {
    "resnet18": lambda **kw: _torchvision_resnet([2, 2, 2, 2])(**kw),
    "resnet34": lambda **kw: _torchvision_resnet([3, 4, 6, 3])(**kw),
    "resnet8": lambda **kw: CifarResNet(8, [16, 16, 32, 64], **kw),
    "resnet14": lambda **kw: CifarResNet(14, [16, 16, 32, 64], **kw),
    "resnet20": lambda **kw: CifarResNet(20, [16, 16, 32, 64], **kw),
    "resnet32": lambda **kw: CifarResNet(32, [16, 16, 32, 64], **kw),
    "resnet44": lambda **kw: CifarResNet(44, [16, 16, 32, 64], **kw),
    "resnet56": lambda **kw: CifarResNet(56, [16, 16, 32, 64], **kw),
    "resnet110": lambda **kw: CifarResNet(110, [16, 16, 32, 64], **kw),
    "resnet8x4": lambda **kw: CifarResNet(8, [32, 64, 128, 256], **kw),
    "resnet32x4": lambda **kw: CifarResNet(32, [32, 64, 128, 256], **kw),
    "wrn_16_1": lambda **kw: WideResNet(16, 1, **kw),
    "wrn_16_2": lambda **kw: WideResNet(16, 2, **kw),
    "wrn_40_1": lambda **kw: WideResNet(40, 1, **kw),
    "wrn_40_2": lambda **kw: WideResNet(40, 2, **kw),
    "vgg8": lambda **kw: VGG("S", **kw),
    "vgg11": lambda **kw: VGG("A", **kw),
    "vgg13": lambda **kw: VGG("B", **kw),
    "vgg16": lambda **kw: VGG("D", **kw),
    "vgg19": lambda **kw: VGG("E", **kw),
    "MobileNetV2": lambda **kw: MobileNetV2(**kw),
    "ShuffleV1": lambda **kw: ShuffleNetV1(**kw),
    "ShuffleV2": lambda **kw: ShuffleNetV2(**kw),
    "digits_teacher": digits_teacher,
    "digits_student": digits_student,
}
# RepDistiller's names for the same networks
ALIASES = {"mobile_half": "MobileNetV2", "vgg8_bn": "vgg8", "vgg13_bn": "vgg13"}

# RepDistiller (train_student.py / train_teacher.py) trains these at lr 0.01 instead of 0.05
LOW_LR_MODELS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}


def get_classifier(model):
    """The final ``nn.Linear`` of a zoo model (PCKD's category centres are its weight rows)."""
    model = getattr(model, "module", model)  # DDP
    for name in ("fc", "linear", "classifier"):
        layer = getattr(model, name, None)
        if isinstance(layer, nn.Sequential):
            layer = layer[-1]
        if isinstance(layer, nn.Linear):
            return layer
    raise AttributeError(f"{type(model).__name__} has no fc/linear/classifier nn.Linear")


def model_names():
    return sorted(MODELS)


def canonical_name(name):
    return ALIASES.get(name, name)


def build_model(name, num_classes, in_channels=3):
    name = canonical_name(name)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(model_names())}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels)
