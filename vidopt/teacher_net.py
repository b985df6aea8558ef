"""The teacher network: torchvision's video ResNets (r3d_18, mc3_18, r2plus1d_18) with a width multiplier.

At width 1.0 they are the standard architectures, with torchvision's module names, so torchvision checkpoints load as
they are. Kept apart from vidopt.models so that what only runs students (the export workers) never imports torchvision.
"""
from __future__ import annotations

import torch
from torch import nn
from torchvision.models.video.resnet import BasicBlock, Conv2Plus1D, Conv3DNoTemporal, Conv3DSimple, VideoResNet

from vidopt.models import TeacherArch, with_frame_differences

TEACHER_LAYOUTS = {  # arch -> conv maker per residual layer (torchvision's definitions)
    "r3d_18": [Conv3DSimple] * 4,
    "mc3_18": [Conv3DSimple] + [Conv3DNoTemporal] * 3,
    "r2plus1d_18": [Conv2Plus1D] * 4,
}
BASE_WIDTHS = (64, 128, 256, 512)  # torchvision's channels per residual layer at width 1.0


def _stem(arch: str, c64: int, c45: int, cin: int = 3) -> nn.Sequential:
    """torchvision's BasicStem / R2Plus1dStem with scaled widths (same layer indices, so checkpoint keys match)."""
    if arch == "r2plus1d_18":
        return nn.Sequential(
            nn.Conv3d(cin, c45, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
            nn.BatchNorm3d(c45), nn.ReLU(inplace=True),
            nn.Conv3d(c45, c64, (3, 1, 1), stride=(1, 1, 1), padding=(1, 0, 0), bias=False),
            nn.BatchNorm3d(c64), nn.ReLU(inplace=True),
        )
    return nn.Sequential(
        nn.Conv3d(cin, c64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(c64), nn.ReLU(inplace=True),
    )


class ScaledVideoResNet(VideoResNet):
    """torchvision's VideoResNet with every channel count scaled; forward and _make_layer are torchvision's own, after
    the optional frame differences (with_frame_differences)."""

    def __init__(self, spec: TeacherArch):
        nn.Module.__init__(self)
        widths = [max(8, round(c * spec.width)) for c in BASE_WIDTHS]
        makers = TEACHER_LAYOUTS[spec.arch]
        self.inplanes = widths[0]
        self.frame_differences = spec.frame_differences
        self.stem = _stem(spec.arch, widths[0], max(4, round(45 * spec.width)), 6 if spec.frame_differences else 3)
        self.layer1 = self._make_layer(BasicBlock, makers[0], widths[0], 2, stride=1)
        self.layer2 = self._make_layer(BasicBlock, makers[1], widths[1], 2, stride=2)
        self.layer3 = self._make_layer(BasicBlock, makers[2], widths[2], 2, stride=2)
        self.layer4 = self._make_layer(BasicBlock, makers[3], widths[3], 2, stride=2)
        self.avgpool = nn.AdaptiveAvgPool3d((1, 1, 1))
        self.fc = nn.Linear(widths[3], spec.num_classes)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(with_frame_differences(x) if self.frame_differences else x)
