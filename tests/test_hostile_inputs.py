"""Hostile options and inputs outside the http reader (issue 29): every float option refuses nan and inf through
one validation; ..."""

from __future__ import annotations

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
