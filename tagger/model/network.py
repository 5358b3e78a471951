"""The network: any timm backbone with one classification head per attribute.

Each attribute has exactly one value per product, so each gets its own softmax head (trained with a
masked cross-entropy) rather than one sigmoid vector over every label of every attribute.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .pretrained import WeightsSource


@dataclass(frozen=True)
class DataConfig:
    """How pixels are prepared for a backbone: square input side, and normalisation in [0, 1] units."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class TaggerNet(nn.Module):
    """Backbone features -> dropout -> one linear head per attribute.

    ``forward`` takes uint8 images (N, 3, H, W), as the data pipeline delivers them, and normalises
    them itself: shipping uint8 to the device is 4x less traffic than float32, and the normalisation
    is then one fused op on the device, identical in training, evaluation and tagging.
    """

    def __init__(
        self,
        backbone: nn.Module,
        label_counts: Mapping[str, int],
        data_config: DataConfig,
        drop_rate: float = 0.2,
    ):
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(drop_rate)
        # Some timm models (lcnet, mobilenetv3/v4, ghostnet) pool into a wider pre-logits head than num_features.
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in label_counts.items()})
        # Buffers follow .to(device) but are not saved: model.json holds mean/std.
        self.register_buffer("pixel_mean", torch.tensor(data_config.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("pixel_std", torch.tensor(data_config.std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.data_config = data_config

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.classify(self.backbone(self.normalise(images)))

    def classify(self, pooled: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.dropout(pooled)
        return {name: head(pooled) for name, head in self.heads.items()}

    # A frozen trunk (stem + the first ``stages`` block stages) computes the same features for an image
    # in every epoch; training can cache them once and run only the rest (``--freeze-stages``).
    # ``forward(x) == forward_from(trunk(x, k), k)`` for every k, so the bundle is one ordinary network.
    # k == stage_count() freezes the whole backbone (conv_head and its BatchNorm too): the trunk's features are the
    # pooled vector the heads read, and only the heads train. Carried-over heads then see exactly the features they
    # were trained on: adding an attribute to a bundle leaves its other attributes' scores as they were.

    def stage_count(self) -> int:
        """Block stages that ``trunk``/``forward_from`` can split at; an error for other families."""
        b = self.backbone
        if not all(hasattr(b, name) for name in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
            raise ValueError(
                f"{type(b).__name__} backbones cannot be split into a frozen trunk and a trained tail "
                "(supported: timm's EfficientNet family, e.g. tf_efficientnet_lite0, efficientnet_b3); "
                "use --freeze-stages 0 to fine-tune it whole"
            )
        return len(b.blocks)

    def _whole(self, stages: int) -> bool:
        return stages >= len(self.backbone.blocks)

    def trunk(self, images: torch.Tensor, stages: int) -> torch.Tensor:
        b = self.backbone
        if self._whole(stages):
            return b(self.normalise(images))
        x = b.bn1(b.conv_stem(self.normalise(images)))
        for block in b.blocks[:stages]:
            x = block(x)
        return x

    def forward_from(self, features: torch.Tensor, stages: int) -> dict[str, torch.Tensor]:
        b = self.backbone
        if self._whole(stages):
            return self.classify(features)
        x = features
        for block in b.blocks[stages:]:
            x = block(x)
        return self.classify(b.forward_head(b.bn2(b.conv_head(x))))

    def trunk_parameters(self, stages: int):
        for module in self.trunk_modules(stages):
            yield from module.parameters()

    def trunk_modules(self, stages: int) -> list[nn.Module]:
        b = self.backbone
        if self._whole(stages):
            return [b]
        return [b.conv_stem, b.bn1, *b.blocks[:stages]]


def resolve_data_config(backbone: str, input_size: int | None = None) -> DataConfig:
    """Input size, mean and std from the backbone's pretrained config (no download needed)."""
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model(backbone, pretrained=False, num_classes=0)
    config = resolve_model_data_config(model)
    size = input_size or int(config["input_size"][-1])
    return DataConfig(size, tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]))


def create_backbone(name: str, *, pretrained: bool = False, init_weights: str | Path | None = None) -> nn.Module:
    """A timm backbone without its classifier (``num_classes=0`` -> pooled features); see
    :func:`create_backbone_with_source` for where pretrained weights come from."""
    return create_backbone_with_source(name, pretrained=pretrained, init_weights=init_weights)[0]


def create_backbone_with_source(
    name: str, *, pretrained: bool = False, init_weights: str | Path | None = None
) -> tuple[nn.Module, WeightsSource]:
    """The backbone and the source of its weights: ``--init-weights``, timm's hub or cache, an installed
    weights package (:mod:`tagger.model.pretrained`), or a random init when ``pretrained`` is off."""
    import timm

    from .pretrained import create_pretrained_backbone

    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise ValueError(f"unknown timm backbone {name!r}; similar names: {', '.join(close) or 'none'}")
    if pretrained or init_weights is not None:
        return create_pretrained_backbone(name, init_weights)
    return timm.create_model(name, pretrained=False, num_classes=0), WeightsSource("random", "")


def create_tagger_net(
    backbone: str,
    label_counts: Mapping[str, int],
    data_config: DataConfig,
    *,
    pretrained: bool = False,
    init_weights: str | Path | None = None,
    drop_rate: float = 0.2,
) -> TaggerNet:
    return TaggerNet(create_backbone(backbone, pretrained=pretrained, init_weights=init_weights), label_counts, data_config, drop_rate)
