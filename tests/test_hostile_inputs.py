"""Hostile options and inputs outside the http reader (issue 29): every float option refuses nan and inf through
one validation; ..."""

from __future__ import annotations

import os

import click
import pytest
from click.testing import CliRunner

from jobs.cli import cli
from jobs.options import FiniteFloatRange


def float_options():
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param.type, click.FloatRange) or param.type is click.FLOAT:
                yield name, param


def test_every_float_option_shares_the_finite_validation():
    found = list(float_options())
    assert len(found) >= 15
    assert [f"{n} {p.opts[0]}" for n, p in found if not isinstance(p.type, FiniteFloatRange)] == []


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
@pytest.mark.parametrize("command,option", [("report", "--max-drift"), ("report", "--min-agreement"),
                                            ("tag", "--http-deadline"), ("tag", "--max-error-rate"),
                                            ("evaluate", "--http-deadline"), ("retrain", "--lr")])
def test_nan_and_inf_are_refused_before_any_work(command, option, value):
    result = CliRunner().invoke(cli, [command, option, value])
    assert result.exit_code == 2, result.output
    assert "not a finite number" in result.output and option in result.output


# -- tagger report on an --out it cannot write ----------------------------------------------------------------
def test_report_on_a_read_only_out_is_exit_2_in_one_line(tmp_path, monkeypatch):
    from .test_report import mix_rows, write_night

    write_night(tmp_path, "2026-11-27", mix_rows({"Men": 3, "Women": 2}))
    real = os.access
    # As root writes anywhere, the read-only folder is os.access's answer (what check_output_location asks).
    monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).startswith(str(tmp_path)) and mode & os.W_OK
                        else real(path, mode))
    result = CliRunner().invoke(cli, ["report", "--out", str(tmp_path), "--run-date", "2026-11-27"])
    assert result.exit_code == 2, result.output
    assert "is not writable" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "_reports").exists()


def test_report_on_a_file_system_that_refuses_the_write_is_exit_2(tmp_path, monkeypatch):
    from tagger import storage

    from .test_report import mix_rows, write_night

    write_night(tmp_path, "2026-11-27", mix_rows({"Men": 3, "Women": 2}))

    def refuse(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(storage, "write_parquet", refuse)
    result = CliRunner().invoke(cli, ["report", "--out", str(tmp_path), "--run-date", "2026-11-27"])
    assert result.exit_code == 2, result.output
    assert "cannot write the report" in result.output and "Traceback" not in result.output


# -- attribute names may not take the tags table's own columns --------------------------------------------------
def test_the_reserved_names_are_the_tags_schemas_own_columns():
    from tagger.attributes import attribute_name_problem
    from tagger.tag.writers import tags_schema

    own = [name for name in tags_schema(["colour"]).names if name not in ("colour", "colour_score")]
    assert "images_used" in own and "needs_review" in own
    for name in [*own, "run_date"]:
        for spelling in (name, name.upper()):
            assert "clashes" in (attribute_name_problem(["colour", spelling]) or ""), spelling


# -- retrain: storage trouble in one line, as the other commands ---------------------------------------------
def test_retrain_against_a_silent_store_is_exit_4_in_one_line(tmp_path):
    from .test_operations import SHORT_BUDGET, silent_endpoint

    with silent_endpoint() as (url, _):
        result = CliRunner().invoke(cli, ["retrain", "--data", "s3://bucket/catalog.parquet", "--attribute", "colour",
                                          "--backbone", "test_efficientnet", "--no-pretrained", "--input-size", "32",
                                          "--out", str(tmp_path / "b"), "--storage-option", f"endpoint_url={url}",
                                          *SHORT_BUDGET])
    assert result.exit_code == 4, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tagger retrain: storage unavailable:"), result.output
    assert "config_kwargs.read_timeout" in lines[0], "the option that raises the deadline is named"
    assert not (tmp_path / "b").exists()


def test_retrain_without_credentials_is_an_input_error_in_one_line(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = CliRunner().invoke(cli, ["retrain", "--data", "s3://bucket/catalog.parquet", "--attribute", "colour",
                                      "--backbone", "test_efficientnet", "--no-pretrained", "--input-size", "32",
                                      "--out", str(tmp_path / "b"), "--storage-option", "endpoint_url=http://127.0.0.1:9"])
    assert result.exit_code in (2, 4), result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output, result.output


def test_corrections_name_attributes_ignoring_case_as_everywhere_else(tmp_path):
    import polars as pl

    from tagger.data.labelled import _apply_corrections

    table = pl.DataFrame({"id": ["a", "b"], "image": ["a.jpg", "b.jpg"], "baseColour": ["Red", "Blue"]})
    fixes = tmp_path / "fixes.csv"
    fixes.write_text("id,attribute,label\na,BASECOLOUR,Green\nb,basecolour,Black\n")
    fixed, _, facts = _apply_corrections(table, str(fixes), ["baseColour"], None, "id", None)
    assert fixed["baseColour"].to_list() == ["Green", "Black"]
    assert facts["applied"] == {"baseColour": {"rows": 2, "changed": 2}} and facts["other_attribute"] == {}


def test_a_silent_store_under_an_image_names_the_option_that_raises_its_deadline():
    from tagger.data.reader import StorageUnavailable, fetch_image

    from .test_operations import silent_endpoint

    with silent_endpoint() as (url, _):
        options = {"endpoint_url": url, "config_kwargs": {"connect_timeout": 1, "read_timeout": 1,
                                                          "retries": {"total_max_attempts": 1}}}
        with pytest.raises(StorageUnavailable, match="config_kwargs.read_timeout"):
            fetch_image("s3://bucket/photo.jpg", options)


def test_an_http_deadline_too_large_for_a_lock_timeout_is_refused():
    # 1e308 s would pass as finite and then overflow a lock's timeout while waiting for a pool slot.
    result = CliRunner().invoke(cli, ["tag", "--http-deadline", "1e308"])
    assert result.exit_code == 2 and "--http-deadline" in result.output



def test_retrains_manifest_errors_advise_its_own_options(tmp_path):
    data = tmp_path / "labels.csv"
    data.write_bytes(b"PAR1 this is no text")  # a Parquet file under a .csv name
    result = CliRunner().invoke(cli, ["retrain", "--data", str(data), "--attribute", "colour", "--out", str(tmp_path / "b"),
                                      "--backbone", "test_efficientnet", "--no-pretrained", "--input-size", "32"])
    assert result.exit_code == 2, result.output
    assert "--data-format" in result.output and "--catalog-format" not in result.output, result.output


def test_report_on_an_out_with_a_file_in_its_path_is_exit_2_in_one_line(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    result = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "a-file" / "out"), "--run-date", "2026-11-27"])
    assert result.exit_code == 2, result.output
    assert "is a file, so no folder can be made under it" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["=x", " =x", "a..b=x", "client_kwargs.=x", ".anon=true"])
def test_a_storage_option_without_a_key_is_refused(value):
    result = CliRunner().invoke(cli, ["tag", "--catalog", "c.csv", "--model", "m", "--out", "o", "--storage-option", value])
    assert result.exit_code == 2, result.output
    assert "--storage-option" in result.output and "KEY=VALUE" in result.output
