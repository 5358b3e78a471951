"""The text model and its fusion with the photos (tagger.model.text, tagger.model.fusion, tagger.training.fusion),
on a generated manifest: titles built from the labels, photo probabilities that know the labels less well.

Rows: text only, photos only, both, empty and very long text, non-ASCII text, and a title that belongs to
another product (a conflict). No image is decoded here; the tag job's use of the same parts is tested beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tagger.model.fusion import AttributeFusion, Fusion
from tagger.model.text import TEXT_WEIGHTS_FILE, TextFeaturizer, TextModelError, fit_text_model, load_text_part, text_section
from tagger.training.fusion import fit_fusion, label_prior

COLOURS = ("Black", "White", "Red", "Blue")
TYPES = ("Shirt", "Shoes", "Watch")
ATTRS = (("baseColour", len(COLOURS)), ("articleType", len(TYPES)))
BRANDS = ("Acme", "Roadster", "Nimbus", "Peak", "Tern")


def manifest(n: int, seed: int):
    """(titles, targets (n, 2)) of a generated catalog: '<brand> Men <colour> <type>' with some noise words."""
    rng = np.random.default_rng(seed)
    colour, kind = rng.integers(len(COLOURS), size=n), rng.integers(len(TYPES), size=n)
    titles = [f"{BRANDS[rng.integers(len(BRANDS))]} {'Men' if rng.random() < .5 else 'Women'} {COLOURS[c]} {TYPES[k]}"
              for c, k in zip(colour, kind)]
    return titles, np.stack([colour, kind], axis=1)


def photo_probs(targets: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Photo probabilities right for 80 % of rows (top score 0.9), wrong otherwise (top score 0.55)."""
    rng = np.random.default_rng(seed)
    out = {}
    for j, (name, k) in enumerate(ATTRS):
        right = rng.random(len(targets)) < 0.8
        top = np.where(right, 0.9, 0.55).astype(np.float32)
        probs = np.repeat(((1 - top) / (k - 1))[:, None], k, axis=1)
        probs[np.arange(len(targets)), np.where(right, targets[:, j], (targets[:, j] + 1) % k)] = top
        out[name] = probs
    return out


@pytest.fixture(scope="module")
def fitted():
    featurizer = TextFeaturizer(("title",))
    titles, targets = manifest(300, 0)
    model = fit_text_model([featurizer.normalise(t) for t in titles], targets, ATTRS, featurizer, c=10.0).stored()
    val_titles, val_targets = manifest(200, 1)
    val_text, present = model.probabilities([featurizer.normalise(t) for t in val_titles])
    assert present.all()
    priors = {name: label_prior(targets[:, j], k) for j, (name, k) in enumerate(ATTRS)}
    fusion, facts = fit_fusion(photo_probs(val_targets, 2), val_text, val_targets, priors, conflict_precision=0.9)
    return featurizer, model, fusion, facts


def test_text_model_reads_titles_and_knows_absent_text(fitted):
    featurizer, model, _, _ = fitted
    long_title = "Acme Men Red Shirt " + "lorem ipsum " * 20_000  # 240 kB: cut to max_chars, still read
    texts = featurizer.rows_text({"title": ["Peak Women Blue Watch", "", None, long_title, "  ", "PEAK  WOMEN\tblue   WATCH"]}, 6)
    assert texts[0] == texts[5] == "peak women blue watch"  # case and whitespace normalised
    assert len(texts[3]) == featurizer.max_chars
    probs, present = model.probabilities(texts)
    assert present.tolist() == [True, False, False, True, False, True]
    assert np.isnan(probs["baseColour"][1]).all()  # no text: no text probabilities, never a guess
    assert COLOURS[probs["baseColour"][0].argmax()] == "Blue" and TYPES[probs["articleType"][0].argmax()] == "Watch"
    assert COLOURS[probs["baseColour"][3].argmax()] == "Red" and TYPES[probs["articleType"][3].argmax()] == "Shirt"
    np.testing.assert_allclose(probs["baseColour"][0], probs["baseColour"][5])


def test_non_ascii_text_is_normalised_not_dropped(fitted):
    featurizer, model, _, _ = fitted
    texts = [featurizer.join({"title": t}) for t in ("Ｒｏａｄｓｔｅｒ Men Black Shoes", "Roadster Men Black Shoes",
                                                     "Chemise Élégante für Herren — 紳士 シャツ")]
    assert texts[0] == texts[1]  # NFKC folds full-width letters to ASCII
    probs, present = model.probabilities(texts)
    assert present.all() and np.isfinite(probs["articleType"][2]).all()
    np.testing.assert_allclose(probs["articleType"].sum(axis=1), 1.0, rtol=1e-5)


def test_fusion_modes_and_conflict(fitted):
    featurizer, model, fusion, facts = fitted
    assert set(facts["attributes"]) == {"baseColour", "articleType"}
    titles, targets = manifest(4, 7)
    titles[3] = titles[0]  # row 3 carries row 0's title: a title pasted on the wrong product
    targets[3] = [(targets[0, 0] + 1) % len(COLOURS), (targets[0, 1] + 1) % len(TYPES)]
    photo = {name: np.eye(k, dtype=np.float32)[targets[:, j]] * 0.96 + 0.04 / k for j, (name, k) in enumerate(ATTRS)}
    text, present = model.probabilities([featurizer.normalise(t) if i != 1 else "" for i, t in enumerate(titles)])
    photo_ok = np.array([True, True, False, True])  # row 2's photo could not be read
    fused = fusion.combine(photo, photo_ok, text, present)
    assert fused.mode.tolist() == ["both", "photos", "text", "both"]
    # Photos alone: exactly the image model's probabilities (a catalog without text is tagged as before).
    for name, _ in ATTRS:
        np.testing.assert_array_equal(fused.probs[name][1], photo[name][1])
        np.testing.assert_array_equal(fused.probs[name][2], text[name][2])
    assert fused.conflicts(0) == [] and fused.conflicts(1) == [] and fused.conflicts(2) == []
    assert fused.conflicts(3) == ["baseColour", "articleType"]
    assert fused.photo_top["baseColour"][3] == targets[3, 0] and fused.text_top["baseColour"][3] == targets[0, 0]
    nothing = fusion.combine(photo, np.zeros(4, bool), text, np.zeros(4, bool))
    assert nothing.mode.tolist() == [""] * 4 and np.isnan(nothing.probs["baseColour"]).all()


def test_fusion_is_at_least_as_good_as_either_input_on_held_out_rows(fitted):
    featurizer, model, fusion, _ = fitted
    titles, targets = manifest(300, 3)
    # Titles that drop the colour for a third of rows: the photos then carry that attribute.
    rng = np.random.default_rng(4)
    vague = rng.random(300) < 1 / 3
    titles = [" ".join(w for w in t.split() if w not in COLOURS) if v else t for t, v in zip(titles, vague)]
    photo = photo_probs(targets, 5)
    text, present = model.probabilities([featurizer.normalise(t) for t in titles])
    fused = fusion.combine(photo, np.ones(300, bool), text, present)
    for j, (name, _) in enumerate(ATTRS):
        accuracy = {k: float((p.argmax(1) == targets[:, j]).mean()) for k, p in
                    (("photos", photo[name]), ("text", text[name]), ("both", fused.probs[name]))}
        assert accuracy["both"] >= max(accuracy["photos"], accuracy["text"]) - 0.01, (name, accuracy)
    # Where the title names no colour the photos carry it: far above the text's guess (a quarter), near the photos' 80 %.
    right = fused.probs["baseColour"].argmax(1) == targets[:, 0]
    assert right[vague].mean() > 0.6 > (text["baseColour"].argmax(1) == targets[:, 0])[vague].mean() + 0.2


def test_bundle_text_part_round_trip_and_refusals(fitted, tiny_bundle, tmp_path):
    """The text part is data: written beside an untouched image model, read back equal, refused when altered."""
    from tagger.model.bundle import load_bundle

    featurizer, model, fusion, _ = fitted
    folder = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, folder)
    image_weights = (folder / "model.safetensors").read_bytes()
    before = load_bundle(str(folder))
    # The tiny bundle's attributes are the demo's; give the text part a bundle-shaped stand-in with ours.
    stand_in = type("B", (), {"path": str(folder), "attributes": [type("A", (), {"name": n, "labels": ["x"] * k})() for n, k in ATTRS]})()
    weights = model.to_bytes()
    meta = json.loads((folder / "model.json").read_text())
    meta["text"] = text_section(model, fusion, weights, metrics={})
    (folder / TEXT_WEIGHTS_FILE).write_bytes(weights)
    (folder / "model.json").write_text(json.dumps(meta, indent=2))
    after = load_bundle(str(folder))
    assert after.model_version == before.model_version  # the image model's identity is unchanged
    assert (folder / "model.safetensors").read_bytes() == image_weights

    def read(name):
        return (folder / name).read_bytes()

    part = load_text_part(stand_in, meta, read)
    assert part.fields == ("title",) and part.text_version == meta["text"]["text_version"]
    texts = ["acme men red shirt", ""]
    np.testing.assert_array_equal(part.model.probabilities(texts)[0]["baseColour"], model.probabilities(texts)[0]["baseColour"])
    assert load_text_part(stand_in, {"attributes": []}, read) is None  # no text section: photos only

    damaged = bytearray(weights)
    damaged[-3] ^= 0xFF
    (folder / TEXT_WEIGHTS_FILE).write_bytes(bytes(damaged))
    with pytest.raises(TextModelError, match="sha256 differs"):
        load_text_part(stand_in, meta, read)
    (folder / TEXT_WEIGHTS_FILE).unlink()
    with pytest.raises(TextModelError, match="text.safetensors is missing"):
        load_text_part(stand_in, meta, read)
    (folder / TEXT_WEIGHTS_FILE).write_bytes(weights)
    wrong = json.loads(json.dumps(meta))
    wrong["text"]["fusion"][0]["rule"] = "vote"
    with pytest.raises(ValueError, match="rule must be one of"):
        load_text_part(stand_in, wrong, read)


def test_shipped_bundle_text_part():
    """models/fashion-lite0 reads titles, its image part is the one its model_version names, and its card has the figures."""
    from tagger.model.bundle import load_bundle

    folder = Path(__file__).resolve().parent.parent / "models" / "fashion-lite0"
    bundle = load_bundle(str(folder))
    meta = json.loads((folder / "model.json").read_text())
    part = load_text_part(bundle, meta, lambda name: (folder / name).read_bytes())
    assert part is not None and part.fields == ("productDisplayName",)
    assert bundle.model_version == "58ca5108eca44017"
    probs, present = part.model.probabilities([part.model.featurizer.normalise("Nike Men Yellow T-Shirts")])
    labels = {a.name: a.labels for a in bundle.attributes}
    assert labels["gender"][probs["gender"][0].argmax()] == "Men"
    assert labels["baseColour"][probs["baseColour"][0].argmax()] == "Yellow"
    figures = meta["text"]["metrics"]["test"]
    for name, row in figures.items():
        assert row["both"] >= max(row["photos"], row["text"]), name
    assert "photos only" in (folder / "MODEL_CARD.md").read_text()


def test_fusion_refuses_malformed_descriptions():
    spec = AttributeFusion("colour", thresholds={"text": 0.5, "both": 0.5}).to_json()
    assert Fusion.from_json([spec], {"colour": 4}, "x").attributes[0].rule == "fused"
    with pytest.raises(ValueError, match="bundle's attributes in order"):
        Fusion.from_json([spec], {"gender": 2}, "x")
    bad = dict(spec, thresholds={"text": 2.0, "both": 0.5})
    with pytest.raises(ValueError, match=r"thresholds must be in \[0, 1\]"):
        Fusion.from_json([bad], {"colour": 4}, "x")
    with pytest.raises(ValueError, match="hash_bits"):
        TextFeaturizer(("title",), hash_bits=40)
    with pytest.raises(ValueError, match="distinct non-empty"):
        TextFeaturizer(("title", "title"))
