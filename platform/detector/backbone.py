"""ResNet backbones: FPN (torchvision ``BackboneWithFPN``) or C4 (detectron2 R50-C4).

- Normalization layers follow torchvision's detection builders
  (``fasterrcnn_resnet50_fpn``): ``FrozenBatchNorm2d`` when the backbone starts from
  weights (``ModelConfig.backbone_weights``), plain ``BatchNorm2d`` when it trains from
  scratch (frozen identity statistics would leave a random ResNet unnormalized).
- ``backbone_weights: base-crops`` (shapes): a ResNet pretrained once on the world's
  base-class crops (:mod:`~ovdlab.platform.detector.backbone_pretraining`), resolved to
  its cached file on the driver, then loaded like ImageNet weights.
- ``trainable_layers`` counts from the top, as torchvision's ``_resnet_fpn_extractor``:
  ``layer4, layer3, layer2, layer1, conv1`` (5 also trains ``bn1``); the rest is frozen.
  With C4, ``layer4`` is the RoI box head (res5) and the same count applies to it, so
  the default 3 equals detectron2's ``FREEZE_AT=2``.
- C4 (detectron2 ``ResNet`` + ``Res5ROIHeads``): the backbone is stem..res4 (stride 16,
  1024 channels for R50, 256 for R18); :class:`Res5BoxHead` runs res5 (stride 2) on
  14x14 RoIAlign features and mean-pools to 2048 (512 for R18).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet18, resnet50
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ovdlab.platform.config import BASE_CROP_BACKBONE, ModelConfig

_RESNETS = {"resnet18": resnet18, "resnet50": resnet50}
_LAYERS_TOP_DOWN = ["layer4", "layer3", "layer2", "layer1", "conv1"]

# Output stride of the C4 backbone (res4) and of the res5 box head on the RoI grid.
C4_STRIDE = 16
C4_POOL_SIZE = 14


@dataclass
class Backbone:
    """What the detector needs from :func:`build_backbone`.

    ``body`` maps an image batch to an ordered dict of feature maps; ``out_channels``
    is their channel count (for the RPN head); ``box_head`` is the C4 res5 head (None
    for FPN, whose box head is built by the RoI heads from ``out_channels``).
    """

    body: nn.Module
    out_channels: int
    box_head: nn.Module | None
    feature_names: list[str]


class C4Body(nn.Module):
    """ResNet stem + res2..res4 (detectron2 R50-C4 backbone), one feature map ``"0"``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return OrderedDict([("0", x)])


class Res5BoxHead(nn.Module):
    """detectron2 ``Res5ROIHeads`` box head: res5 on RoI features, then spatial mean."""

    def __init__(self, layer4: nn.Module, out_channels: int) -> None:
        super().__init__()
        self.res5 = layer4
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x).mean(dim=(2, 3))


def _load_weights(net: nn.Module, path: str) -> None:
    if path == BASE_CROP_BACKBONE:
        raise ValueError(
            f"model.backbone_weights={BASE_CROP_BACKBONE} names a pretraining, not a file: the driver "
            "replaces it with the cached file before the model is built (resolve_backbone_weights)"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"backbone weights not found: {file}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"backbone weights {file}: expected a state dict, got {type(state).__name__}")
    result = net.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"backbone weights {file} do not fit {type(net).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {result.unexpected_keys[:5]}{'...' if len(result.unexpected_keys) > 5 else ''}"
        )


def _freeze(net: nn.Module, trainable_layers: int) -> None:
    """torchvision ``_resnet_fpn_extractor`` freezing: only the top layers train."""
    train = _LAYERS_TOP_DOWN[:trainable_layers]
    if trainable_layers == 5:
        train.append("bn1")
    for name, param in net.named_parameters():
        if not any(name.startswith(layer) for layer in train):
            param.requires_grad_(False)


def build_resnet(cfg: ModelConfig) -> nn.Module:
    """The torchvision ResNet with the config's normalization, weights and freezing."""
    pretrained = cfg.backbone_weights is not None
    norm_layer = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d
    net = _RESNETS[cfg.backbone](weights=None, norm_layer=norm_layer)
    if pretrained:
        _load_weights(net, cfg.backbone_weights)
    _freeze(net, cfg.trainable_layers)
    return net


def build_backbone(cfg: ModelConfig) -> Backbone:
    """ResNet-18/50 + FPN (P2-P6, ``cfg.fpn_channels``) or C4 (res4 body + res5 head)."""
    net = build_resnet(cfg)
    res5_channels = net.inplanes  # 512 * block expansion after construction
    if cfg.neck == "fpn":
        in_channels = [res5_channels // 8, res5_channels // 4, res5_channels // 2, res5_channels]
        body = BackboneWithFPN(
            net,
            return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
            in_channels_list=in_channels,
            out_channels=cfg.fpn_channels,
            extra_blocks=LastLevelMaxPool(),
        )
        return Backbone(body=body, out_channels=cfg.fpn_channels, box_head=None, feature_names=["0", "1", "2", "3"])
    return Backbone(
        body=C4Body(net),
        out_channels=res5_channels // 2,
        box_head=Res5BoxHead(net.layer4, res5_channels),
        feature_names=["0"],
    )
