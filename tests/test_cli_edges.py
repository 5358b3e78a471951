"""Issue 23, errors and exits: what a new user mistypes in the first hour ends in exit 2 and one line that says
what was meant, not a traceback, a minute of retries or a silent full re-tag."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from jobs.cli import cli

DATE = "2026-09-10"


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def tag(*args: str):
    return invoke("tag", "--workers", "0", "--progress", "none", "--run-date", DATE, *args)


def one_line(output: str, command: str) -> str:
    """The command's own line: exactly one, named after the command, and no traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"tagger {command}: ") and "Traceback" not in output, output
    return lines[0]


# -- --model naming a file --------------------------------------------------------------------------------
@pytest.mark.parametrize("inside", ["model.safetensors", "model.json"])
def test_model_naming_a_file_of_a_bundle_says_which_folder_was_meant(demo, tiny_bundle, tmp_path, inside):
    given = str(Path(tiny_bundle) / inside)
    result = tag("--catalog", str(demo.catalog), "--model", given, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2
    line = one_line(result.output, "tag")
    assert f"{given} is a file; a model bundle is a folder" in line and f"did you mean {tiny_bundle}?" in line
    assert not (tmp_path / "out").exists()


def test_model_naming_a_csv_is_exit_2_in_every_command(demo, tmp_path):
    catalog = str(demo.catalog)
    results = {
        "tag": tag("--catalog", catalog, "--model", catalog, "--out", str(tmp_path / "out")),
        "evaluate": invoke("evaluate", "--model", catalog, "--data", str(demo.root), "--out", str(tmp_path / "eval")),
        "predict": invoke("predict", catalog, "--model", catalog, "--out", str(tmp_path / "sheet.png")),
    }
    for command, result in results.items():
        assert result.exit_code == 2, (command, result.output)
        line = one_line(result.output, command)
        assert f"{catalog} is a file; a model bundle is a folder" in line and "models/fashion-lite0" in line, line
    assert not any((tmp_path / name).exists() for name in ("out", "eval", "sheet.png"))


def test_a_bad_bundle_is_said_before_the_manifest_line(demo, tmp_path, caplog):
    """A folder that is not a bundle: its error is the run's only line, no INFO about the manifest before it."""
    caplog.set_level(logging.INFO)
    result = tag("--catalog", str(demo.catalog), "--model", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.exit_code == 2 and "not a model bundle" in one_line(result.output, "tag")
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith("tagger")], caplog.text


# -- finalize -----------------------------------------------------------------------------------------------
def test_finalize_errors_carry_its_own_name(tmp_path, demo):
    nothing = invoke("finalize", "--out", str(tmp_path / "nothing"), "--run-date", DATE)
    assert nothing.exit_code == 2
    line = one_line(nothing.output, "finalize")
    assert "no run of 2026-09-10 to finalize" in line and "--plan-only" in line and "--run-date" in line
    a_file = invoke("finalize", "--out", str(demo.catalog), "--run-date", DATE)
    assert a_file.exit_code == 2 and "is an existing file" in one_line(a_file.output, "finalize")


# -- --since --------------------------------------------------------------------------------------------------
def test_since_naming_nothing_is_exit_2_unless_it_is_the_out_or_asked_for(demo, tiny_bundle, tmp_path):
    out = tmp_path / "out"
    base = ("--catalog", str(demo.catalog), "--model", tiny_bundle, "--out", str(out), "--max-error-rate", "0.5")
    typo = tag(*base, "--since", str(tmp_path / "ot"))
    assert typo.exit_code == 2
    line = one_line(typo.output, "tag")
    assert f"--since {tmp_path / 'ot'}: no such folder" in line and "--since-missing-ok" in line
    assert not out.exists(), "a refused --since changed --out"

    first_night = tag(*base, "--since", str(out))  # the run's own --out: the first night has nothing yet
    assert first_night.exit_code == 0, first_night.output
    asked = tag(*base, "--since", str(tmp_path / "later"), "--since-missing-ok")
    assert asked.exit_code == 0, asked.output


# -- retrain --------------------------------------------------------------------------------------------------
def retrain(*args: str):
    return invoke("retrain", *args)


def test_retrain_says_missing_data_before_looking_for_weights(tmp_path, monkeypatch):
    import tagger.model.pretrained as pretrained

    def never(*args, **kwargs):
        raise AssertionError("weights were looked for before the data was checked")

    monkeypatch.setattr(pretrained, "create_pretrained_backbone", never)
    result = retrain("--data", str(tmp_path / "nonexistent"), "--out", str(tmp_path / "model"))
    assert result.exit_code == 2
    assert f"--data: {tmp_path / 'nonexistent'}: no such folder or file" in one_line(result.output, "retrain")
    assert not (tmp_path / "model").exists()


def test_retrain_init_weights_that_are_not_weights_is_one_line(demo, tmp_path):
    import torch

    result = retrain("--data", str(demo.root), "--out", str(tmp_path / "model"), "--init-weights", str(demo.catalog))
    assert result.exit_code == 2
    line = one_line(result.output, "retrain")
    assert "--init-weights" in line and "not a weights file" in line and "weights_only" not in line

    # A real pickle of Python objects: refused without torch's advice to unpickle it anyway.
    pickled = tmp_path / "objects.pth"
    torch.save({"conv_stem.weight": torch.zeros(1), "note": Path("x")}, pickled)
    result = retrain("--data", str(demo.root), "--out", str(tmp_path / "model"), "--init-weights", str(pickled),
                     "--backbone", "test_efficientnet")
    assert result.exit_code == 2
    line = one_line(result.output, "retrain")
    assert "pickled Python objects" in line and "weights_only" not in line


def test_the_default_backbone_has_installed_weights():
    from tagger.model.pretrained import PACKAGED_WEIGHTS
    from tagger.training import RetrainConfig

    assert RetrainConfig(data="d", out="o").backbone in PACKAGED_WEIGHTS


def test_an_unreachable_hub_is_found_once_and_its_cache_looked_up_at_once(monkeypatch):
    """No minute of retries: one failed connection puts huggingface_hub offline for the lookup, and says so."""
    import socket

    import timm
    from huggingface_hub import constants

    import tagger.model.pretrained as pretrained

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(pretrained, "_hub_probe", {})
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    attempts, offline_during = [], []

    def no_route(address, timeout=None):
        attempts.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    real = timm.create_model

    def create(name, pretrained=False, **kwargs):
        if pretrained:
            offline_during.append(constants.HF_HUB_OFFLINE)
            raise OSError("offline and not in the cache")
        return real(name, pretrained=False, **kwargs)

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(timm, "create_model", create)
    for _ in range(2):
        with pytest.raises(pretrained.PretrainedWeightsUnavailable, match=r"hub \(huggingface.co\) cannot be reached"):
            pretrained.create_pretrained_backbone("test_efficientnet")
    assert len(attempts) == 1 and offline_during == [True, True]
    assert constants.HF_HUB_OFFLINE is False  # put back after the lookup


def test_tagger_help_lists_each_command_with_a_whole_sentence():
    from click.testing import CliRunner

    from jobs.cli import cli

    result = CliRunner().invoke(cli, ["--help"], terminal_width=80)
    assert result.exit_code == 0
    commands = result.output.split("Commands:", 1)[1]
    assert "..." not in commands
    for name, command in cli.commands.items():
        first = " ".join(command.help.split("\n\n")[0].split())
        assert " ".join(commands.split()).count(first.split(". ")[0].rstrip(".")) == 1, name


def test_finalize_help_names_its_exit_codes_and_every_option():
    from jobs.cli import cli as root

    command = root.commands["finalize"]
    assert "Exit codes: 0 committed" in command.help
    assert [p.opts[0] for p in command.params if isinstance(p, click.Option) and not p.help] == []


@pytest.mark.parametrize("name", ["tag", "finalize", "report", "evaluate", "predict", "retrain", "demo-data", "demo-check"])
def test_every_option_has_a_help_line(name):
    from jobs.cli import cli as root

    assert [p.opts[0] for p in root.commands[name].params if isinstance(p, click.Option) and not p.help] == []
