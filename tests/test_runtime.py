"""``--runtime``: the bundle's network exported to ONNX and run by ONNX Runtime or OpenVINO, against
PyTorch fp32 on the same generated photos; the export cache; the choice ``auto`` makes; the errors.

Tolerance, stated once and tested here (runtimes in fp32 against PyTorch fp32, same bundle and images):

* every score (top-label softmax probability) within ``FP32_SCORE`` = 1e-4, every probability within
  the same; the export computes the same fp32 graph, only the summation order differs;
* the top label is equal, except where PyTorch's two best labels are within ``TIE_MARGIN`` = 1e-3 of
  probability (a near-tie that a last-bit difference may flip);
* OpenVINO in bf16 (only on a CPU with native bfloat16, or with TAGGER_CPU_BF16=1): the rule of bf16 autocast in
  tests/test_decode_equivalence.py, scores within 0.05 and disagreements only within 0.05 of a tie.

Every comparison here names its precision (``--precision fp32`` or bf16), so the tolerances hold whatever
``auto`` would pick; ``make test-precision`` runs the module with TAGGER_CPU_BF16=1 and =0 to keep it so.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from tagger.model import check_images, cpu, engines, export, int8
from tagger.model import choice as chooser
from tagger.model.bundle import load_bundle, save_bundle
from tagger.data.decode import decode_image
from tagger.model.predictor import Predictor, precision_settings
from tagger.model.choice import choose_runtime
from tagger.model.engines import RuntimeChoice
from tagger.model.settings import RuntimeSettingError
from tests.test_decode_equivalence import batch, image_driven, photo_like

FP32_SCORE = 1e-4
TIE_MARGIN = 1e-3
BF16_SCORE = 0.05
BF16_TIE = 0.05
CPU = torch.device("cpu")
pytestmark = pytest.mark.precision
EXPORTED = [pytest.param(name, marks=pytest.mark.skipif(not engines.installed(name), reason=f"extra [{name}] not installed"))
            for name in ("onnx", "openvino")]


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch):
    """Exports go to a cache of this module's own, never the user's ~/.cache."""
    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path_factory.getbasetemp() / "runtime-cache"))


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    return [photo_like(seed, (450, 600)) for seed in range(24)]


@pytest.fixture(scope="module")
def driven_bundle(tiny_bundle, photos, tmp_path_factory) -> str:
    """The tiny bundle with image-driven heads (see image_driven), saved as a bundle of its own: the
    exported runtimes read bundles, and random heads would make every label a near-tie."""
    bundle = load_bundle(tiny_bundle)
    images = batch([decode_image(d, bundle.input_size) for d in photos])
    net = image_driven(tiny_bundle, images).net.to(memory_format=torch.contiguous_format)
    out = tmp_path_factory.mktemp("driven") / "bundle"
    save_bundle(net, str(out), backbone=bundle.backbone, labels={a.name: list(a.labels) for a in bundle.attributes},
                training={"note": "tests: image-driven heads"})
    return str(out)


def compare(got, expected, probabilities: dict[str, np.ndarray], score_tolerance: float, tie: float) -> int:
    """Asserts the tolerance; returns how many top labels differ (all of them near-ties)."""
    flipped = 0
    for name, probs in probabilities.items():
        assert len(set(expected.indices[name])) > 1, name  # the labels do depend on the image
        top2 = np.sort(probs, axis=1)[:, -2:]
        margin = top2[:, 1] - top2[:, 0]
        same = got.indices[name] == expected.indices[name]
        assert (margin[~same] < tie).all(), (name, margin[~same])
        assert np.abs(got.scores[name] - expected.scores[name]).max() <= score_tolerance, name
        flipped += int((~same).sum())
    return flipped


@pytest.mark.parametrize("runtime", EXPORTED)
def test_exported_runtime_equals_pytorch_fp32(driven_bundle, photos, runtime):
    bundle = load_bundle(driven_bundle)
    images = batch([decode_image(d, bundle.input_size) for d in photos])
    expected = Predictor(bundle, CPU, precision="fp32", runtime="torch")(images, probabilities=True)
    predictor = Predictor(bundle, CPU, precision="fp32", runtime=runtime)
    assert predictor.runtime.name == runtime and predictor.precision_name == "fp32" and predictor.net is None
    got = predictor(images, probabilities=True)
    compare(got, expected, expected.probabilities, FP32_SCORE, TIE_MARGIN)
    for name, probs in expected.probabilities.items():
        assert np.abs(got.probabilities[name] - probs).max() <= FP32_SCORE
    # Batches of another size (the last batch of a run) go through the same dynamic-batch graph.
    odd = predictor(images[:5])
    for name in expected.indices:
        assert np.array_equal(odd.indices[name], got.indices[name][:5])
    assert predictor.labels(got)["gender"].dtype == object


@pytest.mark.skipif(not (engines.installed("openvino") and cpu.cpu_has_bf16()), reason="needs openvino and a CPU with native bfloat16")
def test_openvino_bf16_within_the_bf16_tolerance(driven_bundle, photos):
    bundle = load_bundle(driven_bundle)
    images = batch([decode_image(d, bundle.input_size) for d in photos])
    expected = Predictor(bundle, CPU, precision="fp32", runtime="torch")(images, probabilities=True)
    predictor = Predictor(bundle, CPU, precision="bf16", runtime="openvino")
    assert predictor.precision_name == "bf16"
    compare(predictor(images), expected, expected.probabilities, BF16_SCORE, BF16_TIE)


@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_export_is_cached_by_model_version_and_checked(driven_bundle, tmp_path, monkeypatch, caplog):
    bundle = load_bundle(driven_bundle)
    cache = tmp_path / "cache"
    path = export.onnx_model(bundle, cache)
    record = json.loads((cache / bundle.model_version / "export.json").read_text())
    assert record["model_version"] == bundle.model_version and record["file"] == path.name
    assert record["check"]["max_probability_difference"] <= export.EXPORT_TOLERANCE

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the cache is valid")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    assert export.onnx_model(bundle, cache) == path  # found, hash checked, not exported again
    monkeypatch.undo()

    # A file that no longer matches its recorded hash is never used: exported again, with a warning.
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="tagger.model"):
        again = export.onnx_model(bundle, cache)
    assert "does not match the sha256" in caplog.text
    assert export.file_sha256(again) == json.loads((cache / bundle.model_version / "export.json").read_text())["sha256"]

    # A record made for another model (here: claims another model_version) is not trusted either.
    record_file = cache / bundle.model_version / "export.json"
    record = json.loads(record_file.read_text())
    record["model_version"] = "0" * 16
    record_file.write_text(json.dumps(record))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tagger.model"):
        export.onnx_model(bundle, cache)
    assert "model_version differ" in caplog.text
    assert json.loads(record_file.read_text())["model_version"] == bundle.model_version


@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_a_wrong_export_is_refused(driven_bundle, tmp_path, monkeypatch):
    """The check against PyTorch catches an export that computes something else (here: a broken exporter)."""
    bundle = load_bundle(driven_bundle)
    real_export = torch.onnx.export

    def export_other_weights(module, *args, **kwargs):
        other = copy.deepcopy(module)  # the graph written differs from the network that is checked against
        with torch.no_grad():
            for head in other.net.heads.values():
                head.bias.add_(3.0 * torch.arange(head.bias.numel()))
        return real_export(other, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", export_other_weights)
    with pytest.raises(RuntimeError, match="does not compute what PyTorch computes"):
        export.onnx_model(bundle, tmp_path / "cache")
    assert not list((tmp_path / "cache" / bundle.model_version).glob("export.json"))


def test_auto_chooses_by_device_precision_and_what_is_installed(monkeypatch, caplog):
    assert choose_runtime("auto", torch.device("cuda")).name == "torch"
    with pytest.raises(RuntimeSettingError, match="CPU only"):
        choose_runtime("onnx", torch.device("cuda"))
    monkeypatch.setattr(engines, "installed", lambda name: True)
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: True)
    assert choose_runtime("auto", CPU).name == "onnx"
    assert choose_runtime("auto", CPU, "bf16").name == "openvino"  # ONNX Runtime's CPU provider has no bf16
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)
    assert choose_runtime("auto", CPU).name == "onnx"
    monkeypatch.setattr(engines, "installed", lambda name: name != "onnx")
    assert choose_runtime("auto", CPU).name == "openvino"
    monkeypatch.setattr(engines, "installed", lambda name: True)
    # Not installed: skipped, and the log names the extra that would have given the faster runtime.
    monkeypatch.setattr(engines, "installed", lambda name: name == "torch")
    with caplog.at_level(logging.WARNING, logger="tagger.model"):
        choice = choose_runtime("auto", CPU)
    assert choice.name == "torch" and "not installed" in choice.reason
    assert "fashion-tagger[onnx,openvino]" in caplog.text


def test_a_runtime_that_is_not_installed_is_an_error_naming_the_extra(monkeypatch):
    monkeypatch.setattr(engines, "installed", lambda name: name == "torch")
    for runtime, extra in (("onnx", "onnx"), ("openvino", "openvino")):
        with pytest.raises(RuntimeSettingError, match=rf"fashion-tagger\[{extra}\]"):
            choose_runtime(runtime, CPU)


def test_precision_per_runtime(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)
    assert precision_settings("auto", CPU, "onnx") == {"amp": False}
    assert precision_settings("auto", CPU, "openvino") == {"amp": False}
    with pytest.raises(ValueError, match="not available with --runtime onnx"):
        precision_settings("bf16", CPU, "onnx")
    with pytest.raises(ValueError, match="fp16 is for CUDA"):
        precision_settings("fp16", CPU, "openvino")
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: True)
    assert precision_settings("auto", CPU, "onnx") == {"amp": False}
    assert precision_settings("auto", CPU, "openvino") == {"amp": True, "amp_dtype": torch.bfloat16}


def test_a_bare_network_runs_only_with_torch(tiny_bundle):
    net = load_bundle(tiny_bundle).build_net()
    with pytest.raises(ValueError, match="bare network"):
        Predictor(net, CPU, runtime=RuntimeChoice("onnx", "test"))


@pytest.mark.parametrize("runtime", EXPORTED)
def test_tag_job_records_the_runtime_and_writes_the_same_tags(demo, driven_bundle, tmp_path, runtime):
    from tests.test_tag import read, tag

    outs = {}
    for name in ("torch", runtime):
        out = tmp_path / name
        result = tag("--catalog", str(demo.catalog), "--model", driven_bundle, "--out", str(out), "--run-date", "2026-01-02",
                     "--runtime", name, "--precision", "fp32")
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "_runs" / "run_date=2026-01-02" / "summary.json").read_text())
        assert summary["this_process"]["runtime"]["name"] == name
        assert summary["this_process"]["runtime"]["precision"] == "fp32"
        assert summary["arguments"]["runtime"] == name
        outs[name] = read(out, "tags").sort("product_id")
    plain, other = outs["torch"], outs[runtime]
    assert plain["product_id"].to_list() == other["product_id"].to_list()
    for attribute in load_bundle(driven_bundle).attribute_names:
        scores = np.abs(plain[f"{attribute}_score"].to_numpy() - other[f"{attribute}_score"].to_numpy())
        assert scores.max() <= FP32_SCORE, attribute
        # Labels may differ only where the scores say near-tie (the top score itself is then < 1/2 + tie).
        differ = plain[attribute].to_numpy() != other[attribute].to_numpy()
        assert (plain[f"{attribute}_score"].to_numpy()[differ] < 0.5 + TIE_MARGIN).all(), attribute


def test_tag_job_refuses_a_missing_runtime_with_exit_2(demo, tiny_bundle, tmp_path, monkeypatch):
    from tests.test_tag import tag

    monkeypatch.setattr(engines, "installed", lambda name: name == "torch")
    out = tmp_path / "out"
    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--runtime", "onnx")
    assert result.exit_code == 2, result.output
    assert "fashion-tagger[onnx]" in result.output
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_tag_job_refuses_bf16_with_onnx_with_exit_2(demo, tiny_bundle, tmp_path):
    from tests.test_tag import tag

    result = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(tmp_path / "o"),
                 "--runtime", "onnx", "--precision", "bf16")
    assert result.exit_code == 2, result.output
    assert "not available with --runtime onnx" in result.output


@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_an_unwritable_cache_is_an_error_saying_what_to_set(driven_bundle, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    with pytest.raises(RuntimeSettingError, match="set TAGGER_CACHE to a writable folder"):
        export.onnx_model(load_bundle(driven_bundle), blocked / "onnx")


# -- auto by measuring -----------------------------------------------------------------------------------
@pytest.fixture()
def measuring(monkeypatch, tmp_path):
    """`auto` measures (the tests' default is the fixed order), into a cache of this test's own."""
    monkeypatch.setenv("TAGGER_AUTO_RUNTIME", "measure")
    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(chooser, "MEASURE_SECONDS", 0.05)


def test_auto_measures_once_and_caches_the_choice_by_model_cpu_libraries_and_threads(driven_bundle, measuring, monkeypatch, caplog):
    bundle = load_bundle(driven_bundle)
    # CPU ms per image: the least wins.
    costs = {"torch fp32": 50.0, "torch bf16": 30.0, "onnx fp32": 24.0, "openvino fp32": 15.0, "openvino bf16": 8.0}
    timed = []
    monkeypatch.setattr(engines, "installed", lambda name: True)
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: True)

    def measure_all(b, pairs, *args):
        timed.extend(f"{r} {p}" for r, p in pairs)
        return {f"{r} {p}": costs[f"{r} {p}"] for r, p in pairs}

    monkeypatch.setattr(chooser, "_measure_all", measure_all)
    with caplog.at_level(logging.INFO, logger="tagger.model"):
        choice = choose_runtime("auto", CPU, bundle=bundle, threads=2)
    # --precision auto and a bundle with no precision check: fp32 candidates only, the arithmetic the bundle was
    # validated in, even where bf16 is native and cheaper: tag, evaluate and retrain's scoring then compute the same
    # scores on any machine (a passed check adds its candidate: the test after the int8 ones).
    assert (choice.name, choice.precision) == ("openvino", "fp32")
    fp32 = {n: r for n, r in costs.items() if n.endswith("fp32")}
    assert sorted(timed) == sorted(fp32) and choice.measured == fp32
    assert "openvino fp32 costs the least CPU here" in caplog.text and "cached in" in choice.reason
    # Same model, CPU, libraries and threads: the cached choice, nothing measured again.
    timed.clear()
    again = choose_runtime("auto", CPU, bundle=bundle, threads=2)
    assert timed == [] and (again.name, again.precision) == ("openvino", "fp32") and "measured cheapest on this CPU on" in again.reason
    # --precision bf16 asks for bf16: measured among the runtimes that compute it (another key).
    bf16 = choose_runtime("auto", CPU, "bf16", bundle=bundle, threads=2)
    assert (bf16.name, bf16.precision) == ("openvino", "bf16") and sorted(timed) == ["openvino bf16", "torch bf16"]
    key = chooser.choice_key(bundle, "auto", 2)
    assert key["model_version"] == bundle.model_version and key["threads"] == 2
    assert set(key["libraries"]) == {"torch", "onnxruntime", "openvino"} and key["cpu"]["model"]
    for change in ({"threads": 1}, {"libraries": {**key["libraries"], "openvino": "0.0"}},
                   {"cpu": {**key["cpu"], "flags_sha256": "other"}}, {"model_version": "0" * 16},
                   {"precision": "bf16"}):
        assert chooser._choice_file({**key, **change}, None) != chooser._choice_file(key, None), change
    timed.clear()
    choose_runtime("auto", CPU, bundle=bundle, threads=1)
    assert len(timed) == 3  # other threads: measured again
    # TAGGER_AUTO_RUNTIME=preference: the fixed order, nothing measured.
    monkeypatch.setenv("TAGGER_AUTO_RUNTIME", "preference")
    timed.clear()
    assert choose_runtime("auto", CPU, bundle=bundle).precision is None and timed == []


def test_a_candidate_that_fails_is_skipped_and_said_in_the_log(driven_bundle, measuring, monkeypatch, caplog):
    bundle = load_bundle(driven_bundle)
    monkeypatch.setattr(engines, "installed", lambda name: name in ("torch", "onnx"))
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)

    def broken(*args, **kwargs):
        raise RuntimeError("this engine cannot run here")

    monkeypatch.setattr(engines.OnnxRuntimeEngine, "__init__", broken)
    with caplog.at_level(logging.WARNING, logger="tagger.model"):
        choice = choose_runtime("auto", CPU, bundle=bundle)
    assert (choice.name, choice.precision) == ("torch", "fp32")
    assert "candidate onnx fp32 failed and is skipped" in caplog.text and "cannot run here" in caplog.text
    assert choice.measured["onnx fp32"].startswith("failed: RuntimeError") and choice.measured["torch fp32"] > 0
    assert list(choice.measured) == ["onnx fp32", "torch fp32"]  # candidate order, whatever failed when


def test_tag_job_measures_before_out_changes_and_records_the_choice(demo, driven_bundle, measuring, tmp_path, monkeypatch):
    from tests.test_tag import tag

    out = tmp_path / "out"
    seen = []
    real = chooser.measured_choice

    def spy(*args, **kwargs):
        seen.append(out.exists() and any(out.iterdir()))
        return real(*args, **kwargs)

    monkeypatch.setattr(chooser, "measured_choice", spy)
    result = tag("--catalog", str(demo.catalog), "--model", driven_bundle, "--out", str(out), "--run-date", "2026-01-03")
    assert result.exit_code == 0, result.output
    assert seen == [False]  # measured once, before anything under --out existed
    runtime = json.loads((out / "_runs" / "run_date=2026-01-03" / "summary.json").read_text())["this_process"]["runtime"]
    assert "measured cheapest on this CPU" in runtime["reason"]
    measured = runtime["measured_cpu_ms_per_image"]
    assert measured[f"{runtime['name']} {runtime['precision']}"] == min(v for v in measured.values() if isinstance(v, float))


# -- int8 ----------------------------------------------------------------------------------------------
INT8 = pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed (the quantizer is onnxruntime's)")


@INT8
def test_int8_is_quantized_once_per_model_and_calibration_and_runs(driven_bundle, photos, tmp_path, monkeypatch):
    bundle = load_bundle(driven_bundle)
    cache = None  # the module's cache: the tag job's test below reuses this quantization
    first = int8.int8_model(bundle, cache)
    records = list(first.parent.glob("int8-*.json"))
    assert len(records) == 1 and json.loads(records[0].read_text())["calibration"]["source"] == "generated"
    quantized = []
    monkeypatch.setattr("onnxruntime.quantization.quantize_static", lambda *a, **k: quantized.append(1))
    assert int8.int8_model(bundle, cache) == first and quantized == []  # cached: not quantized again
    # Another calibration set is another int8 model; fewer than 16 usable photos is a setting error.
    folder = tmp_path / "calibration"
    folder.mkdir()
    for i, data in enumerate(photos[:3]):
        (folder / f"{i}.jpg").write_bytes(data)
    monkeypatch.setenv("TAGGER_INT8_CALIBRATION", str(folder))
    with pytest.raises(RuntimeSettingError, match="at least 16 are needed"):
        int8.int8_model(bundle, cache)
    monkeypatch.undo()
    predictor = Predictor(bundle, CPU, precision="int8", runtime="onnx")
    reference = Predictor(bundle, CPU, precision="fp32", runtime="torch")
    images = batch([decode_image(d, bundle.input_size) for d in photos])
    got, expected = predictor(images), reference(images)
    assert predictor.precision_name == "int8"
    # The tiny model's heads are near-ties, which int8 rounding may flip: agreement is checked loosely here; the
    # shipped model's int8 accuracy on the test split is measured in its model card.
    agree = np.mean([(got.indices[n] == expected.indices[n]).mean() for n in bundle.attribute_names])
    assert agree >= 0.6 and all(np.isfinite(got.scores[n]).all() for n in bundle.attribute_names)


def test_int8_needs_an_exported_runtime():
    with pytest.raises(ValueError, match="--precision int8 runs the quantized ONNX export"):
        precision_settings("int8", CPU, "torch")
    assert precision_settings("int8", CPU, "openvino") == {"amp": False, "int8": True}
    assert chooser.candidates("auto") == [c for c in chooser.candidates("auto") if c[1] != "int8"]


@INT8
def test_tag_job_with_int8_records_it(demo, driven_bundle, tmp_path):
    from tests.test_tag import tag

    out = tmp_path / "out"
    result = tag("--catalog", str(demo.catalog), "--model", driven_bundle, "--out", str(out), "--run-date", "2026-01-04",
                 "--runtime", "onnx", "--precision", "int8")
    assert result.exit_code == 0, result.output
    runtime = json.loads((out / "_runs" / "run_date=2026-01-04" / "summary.json").read_text())["this_process"]["runtime"]
    assert (runtime["name"], runtime["precision"]) == ("onnx", "int8")
    result = tag("--catalog", str(demo.catalog), "--model", driven_bundle, "--out", str(tmp_path / "o2"), "--runtime", "torch",
                 "--precision", "int8")
    assert result.exit_code == 2 and "int8" in result.output


@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_an_unwritable_cache_leaves_the_previous_partition_as_it_was(demo, tiny_bundle, tmp_path, monkeypatch):
    """The runtime is an input: its export (or cached file) and a trial batch come before the lease and the
    start-over, so an exit 2 for an unwritable cache keeps the complete partition an earlier run wrote."""
    unwritable_cache_keeps_the_partition(demo, tiny_bundle, tmp_path, monkeypatch)


def unwritable_cache_keeps_the_partition(demo, tiny_bundle, tmp_path, monkeypatch, *extra: str) -> None:
    """``extra``: options of the second run (tests/test_ray_engine.py adds --engine ray)."""
    from tests.test_tag import tag

    out = tmp_path / "out"
    first = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", "2026-01-02",
                "--runtime", "torch", "--max-error-rate", "0.5")
    assert first.exit_code == 0, first.output
    partition = out / "tags" / "run_date=2026-01-02"
    before = sorted((p.name, p.stat().st_size) for p in partition.iterdir())
    assert "_SUCCESS" in dict(before)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")  # unwritable even for root, unlike chmod 555
    monkeypatch.setenv("TAGGER_CACHE", str(blocked))
    second = tag("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--run-date", "2026-01-02",
                 "--runtime", "onnx", "--max-error-rate", "0.5", *extra)
    assert second.exit_code == 2, second.output
    assert "set TAGGER_CACHE to a writable folder" in second.output
    assert sorted((p.name, p.stat().st_size) for p in partition.iterdir()) == before


def test_the_cpu_bf16_switch_forces_what_auto_sees(tiny_bundle, monkeypatch):
    """TAGGER_CPU_BF16 answers cpu_has_bf16 (1: as if native, 0: as if not), so both branches of auto run on any CPU."""
    monkeypatch.setenv("TAGGER_CPU_BF16", "1")
    assert cpu.cpu_has_bf16() and precision_settings("auto", CPU, "torch") == {"amp": True, "amp_dtype": torch.bfloat16}
    assert Predictor(load_bundle(tiny_bundle), CPU, precision="auto", runtime="torch").precision_name == "bf16"
    monkeypatch.setenv("TAGGER_CPU_BF16", "0")
    assert not cpu.cpu_has_bf16() and precision_settings("auto", CPU, "torch") == {}
    assert Predictor(load_bundle(tiny_bundle), CPU, precision="auto", runtime="torch").precision_name == "fp32"
    monkeypatch.setenv("TAGGER_CPU_BF16", "maybe")
    with pytest.raises(RuntimeSettingError, match="TAGGER_CPU_BF16='maybe'"):
        cpu.cpu_has_bf16()


@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_a_forged_cached_export_is_caught_at_load_and_exported_again(driven_bundle, tmp_path, caplog):
    """A record and a sha256 are easily rewritten together: another network's export, recorded under this
    model_version with its own hash, passes both. The check against PyTorch at every load catches it."""
    bundle = load_bundle(driven_bundle)
    cache = tmp_path / "cache"
    path = export.onnx_model(bundle, cache)
    other_net = bundle.build_net()
    with torch.no_grad():
        for head in other_net.heads.values():
            head.bias.add_(3.0 * torch.arange(head.bias.numel()))
    other = save_bundle(other_net, str(tmp_path / "other"), backbone=bundle.backbone,
                        labels={a.name: list(a.labels) for a in bundle.attributes})
    forged = export.onnx_model(other, tmp_path / "other-cache")
    path.write_bytes(forged.read_bytes())  # same shapes, same name; the record now vouches for it
    record_file = cache / bundle.model_version / "export.json"
    record = json.loads(record_file.read_text())
    record["sha256"] = export.file_sha256(path)
    record_file.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="tagger.model"):
        used = export.onnx_model(bundle, cache)
    assert "is not this model's network" in caplog.text and "exporting again" in caplog.text
    images = trial_batch_for(bundle)
    expected = Predictor(bundle, CPU, precision="fp32", runtime="torch")(images)
    got = Predictor(bundle, CPU, precision="fp32", runtime="onnx", runtime_cache=str(cache))(images)
    for name in bundle.attribute_names:
        assert np.abs(got.scores[name] - expected.scores[name]).max() <= FP32_SCORE
    assert export.file_sha256(used) != export.file_sha256(forged)


def trial_batch_for(bundle) -> torch.Tensor:
    return check_images.trial_images(bundle.input_size, 4)


# -- a reduced precision the bundle passed a check in --------------------------------------------------
def _checked_copy(driven_bundle, tmp_path, checks: dict[str, bool]) -> str:
    """The driven bundle copied, with precision checks recorded as passed/failed (the record as
    `tagger evaluate --check-precision` writes it, the figures made up)."""
    import shutil

    from tagger.model.bundle import record_precision_check

    folder = tmp_path / "checked"
    shutil.copytree(driven_bundle, folder)
    version = load_bundle(str(folder)).model_version
    for candidate, passed in checks.items():
        record_precision_check(str(folder), {"candidate": candidate, "model_version": version, "passed": passed,
                                             "tolerance_points": 0.5, "largest_drop_points": 0.2 if passed else 2.2})
    return str(folder)


def test_auto_adds_a_reduced_precision_only_where_the_bundle_passed_its_check_and_the_cpu_computes_it(driven_bundle, tmp_path, monkeypatch):
    from tagger.model.bundle import BundleError, record_precision_check

    plain = load_bundle(driven_bundle)
    checked = load_bundle(_checked_copy(driven_bundle, tmp_path, {"openvino bf16": True, "onnx int8": False}))
    # A check changes no prediction: the same model_version, so the export and resumable plans stay valid.
    assert checked.model_version == plain.model_version
    assert checked.validated("openvino", "bf16") and not checked.validated("onnx", "int8") and not checked.validated("torch", "bf16")
    monkeypatch.setattr(engines, "installed", lambda name: True)
    fp32 = [("onnx", "fp32"), ("openvino", "fp32"), ("torch", "fp32")]
    monkeypatch.setenv("TAGGER_CPU_BF16", "1")
    assert chooser.candidates("auto", checked) == fp32 + [("openvino", "bf16")]  # the failed int8 never competes
    assert chooser.candidates("auto", plain) == fp32 and chooser.candidates("auto") == fp32
    # The cached choice of the unchecked bundle is not reused once a check passed: the candidates are in its key.
    assert chooser._choice_file(chooser.choice_key(checked, "auto", 2), None) != chooser._choice_file(chooser.choice_key(plain, "auto", 2), None)
    # Without native bfloat16 bf16 is emulated (slower, and not what was checked): fp32 only.
    monkeypatch.setenv("TAGGER_CPU_BF16", "0")
    assert chooser.candidates("auto", checked) == fp32
    # An explicit --precision is measured among the runtimes that compute it, checked or not.
    assert chooser.candidates("int8", checked) == [("onnx", "int8"), ("openvino", "int8")]
    # int8 passed with one set of calibration photos competes only while the job calibrates on the same ones.
    from tagger.model.bundle import record_precision_check as record

    int8 = {"candidate": "openvino int8", "model_version": checked.model_version, "passed": True, "calibration": {"source": "generated"}}
    checked = record(checked.path, int8)
    assert ("openvino", "int8") in chooser.candidates("auto", checked)
    photos = tmp_path / "calibration"
    photos.mkdir()
    monkeypatch.setenv("TAGGER_INT8_CALIBRATION", str(photos))
    assert ("openvino", "int8") not in chooser.candidates("auto", checked)
    # A check is recorded only on the model it scored.
    with pytest.raises(BundleError, match="is not the checked one"):
        record_precision_check(checked.path, {"candidate": "openvino bf16", "model_version": "0" * 16, "passed": True})


@pytest.mark.skipif(not engines.installed("openvino"), reason="extra [openvino] not installed")
def test_evaluate_at_auto_scores_what_the_tag_job_computes_when_a_checked_bf16_wins(demo, driven_bundle, measuring, tmp_path, monkeypatch):
    """On a CPU with native bf16 where the bundle's checked OpenVINO bf16 costs the least, tag writes bf16 tags:
    evaluate at auto must score those, not fp32 ones (issue 18: the same numbers on one machine)."""
    from tagger.evaluation.evaluate import EvaluateConfig, evaluate as run_evaluate
    from tests.test_tag import tag

    folder = _checked_copy(driven_bundle, tmp_path, {"openvino bf16": True})
    monkeypatch.setenv("TAGGER_CPU_BF16", "1")
    costs = {"onnx fp32": 24.0, "openvino fp32": 15.0, "torch fp32": 60.0, "openvino bf16": 8.0}
    monkeypatch.setattr(chooser, "_measure_all", lambda b, pairs, *a: {f"{r} {p}": costs[f"{r} {p}"] for r, p in pairs if f"{r} {p}" in costs})
    out = tmp_path / "out"
    result = tag("--catalog", str(demo.catalog), "--model", folder, "--out", str(out), "--run-date", "2026-01-04")
    assert result.exit_code == 0, result.output
    runtime = json.loads((out / "_runs" / "run_date=2026-01-04" / "summary.json").read_text())["this_process"]["runtime"]
    assert (runtime["name"], runtime["precision"]) == ("openvino", "bf16")
    evaluation = run_evaluate(EvaluateConfig(model=folder, data=str(demo.root), split="all", workers=0, plots=False))
    assert evaluation.computed == "openvino bf16"
    # Without a passed check there is nothing but fp32 to choose: evaluate keeps the order retrain's scoring uses
    # (so it reproduces retrain's recorded metrics exactly), whatever the measuring would say.
    plain = run_evaluate(EvaluateConfig(model=driven_bundle, data=str(demo.root), split="all", workers=0, plots=False))
    assert plain.computed == chooser.choose_runtime("auto", CPU).name == "onnx"


# -- a cached export checked against the bundle's reference outputs -----------------------------------
@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_a_cached_export_that_reproduces_the_reference_outputs_spares_building_the_network(demo, driven_bundle, tmp_path, monkeypatch):
    """save_bundle records what the network computes on the check images; a later run whose cached export
    reproduces them neither imports timm nor builds the network (a run's start: ~2.5 s less), and tags the same."""
    from tagger.model.bundle import ModelBundle
    from tests.test_tag import read, tag

    bundle = load_bundle(driven_bundle)
    assert bundle.reference_outputs["images"] == check_images.check_images_digest(check_images.trial_images(bundle.input_size, 2))
    assert set(bundle.reference_outputs["probabilities"]) == set(bundle.attribute_names)
    monkeypatch.setenv("TAGGER_CACHE", str(tmp_path / "cache"))
    args = ("--catalog", str(demo.catalog), "--model", driven_bundle, "--runtime", "onnx")
    first = tag(*args, "--out", str(tmp_path / "first"), "--run-date", "2026-01-05")
    assert first.exit_code == 0, first.output

    def no_network(self):
        raise AssertionError("built the PyTorch network although the cached export reproduces the reference outputs")

    monkeypatch.setattr(ModelBundle, "_build", no_network)
    export._REFERENCE_CHECKED.clear()
    second = tag(*args, "--out", str(tmp_path / "second"), "--run-date", "2026-01-05")
    assert second.exit_code == 0, second.output
    columns = [c for c in read(tmp_path / "first", "tags", "2026-01-05").columns if c not in ("run_id", "tagged_at")]
    assert read(tmp_path / "second", "tags", "2026-01-05").select(columns).sort("product_id").equals(
        read(tmp_path / "first", "tags", "2026-01-05").select(columns).sort("product_id"))


@pytest.mark.skipif(not engines.installed("onnx"), reason="extra [onnx] not installed")
def test_reference_outputs_of_other_check_images_fall_back_to_the_pytorch_check(driven_bundle, tmp_path, caplog):
    import shutil

    folder = tmp_path / "bundle"
    shutil.copytree(driven_bundle, folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["reference_outputs"]["images"] = "sha256:made-on-other-images"
    (folder / "model.json").write_text(json.dumps(meta))
    bundle = load_bundle(str(folder))
    cache = tmp_path / "cache"
    export.onnx_model(bundle, cache)
    assert export.verified_export(bundle, cache) is None  # not usable: the tag job builds the network to check
    with caplog.at_level(logging.INFO, logger="tagger.model"):
        assert export.onnx_model(bundle, cache).is_file()
    assert "cached; checked:" in caplog.text  # against PyTorch, as before reference outputs existed
