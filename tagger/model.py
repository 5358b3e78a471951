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


class PretrainedWeightsUnavailable(RuntimeError):
    """The requested ImageNet weights could not be had; never replaced by a silent random init."""


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
        features = self.backbone(self.normalise(images))
        features = self.dropout(features)
        return {name: head(features) for name, head in self.heads.items()}


def resolve_data_config(backbone: str, input_size: int | None = None) -> DataConfig:
    """Input size, mean and std from the backbone's pretrained config (no download needed)."""
    import timm
    from timm.data import resolve_model_data_config

    model = timm.create_model(backbone, pretrained=False, num_classes=0)
    config = resolve_model_data_config(model)
    size = input_size or int(config["input_size"][-1])
    return DataConfig(size, tuple(float(v) for v in config["mean"]), tuple(float(v) for v in config["std"]))


def create_backbone(name: str, *, pretrained: bool = False, init_weights: str | Path | None = None) -> nn.Module:
    """A timm backbone without its classifier (``num_classes=0`` -> pooled features).

    ``pretrained`` fetches ImageNet weights from the Hugging Face hub; ``init_weights`` loads them from
    a local file through timm's own ``pretrained_cfg_overlay`` path (safetensors or a torch state dict).
    """
    import timm

    if not timm.is_model(name.split(".")[0]):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:8]
        raise ValueError(f"unknown timm backbone {name!r}; similar names: {', '.join(close) or 'none'}")
    if init_weights is not None:
        path = Path(init_weights)
        if not path.is_file():
            raise PretrainedWeightsUnavailable(f"--init-weights {path}: no such file")
        return timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay={"file": str(path)})
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=0)
        except Exception as exc:
            raise PretrainedWeightsUnavailable(
                f"could not load ImageNet-pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                "On a machine without access to the Hugging Face hub, pass --init-weights PATH with a local "
                "weights file, or --no-pretrained to train from random initialisation on purpose."
            ) from exc
    return timm.create_model(name, pretrained=False, num_classes=0)


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
