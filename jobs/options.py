"""Options and parsing shared by several commands."""

from __future__ import annotations

import json
from typing import Any

import click


def parse_storage_options(values: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs -> fsspec storage options; dotted keys nest (``client_kwargs.region_name=eu-west-1``),
    values are JSON when they parse as JSON (``anon=true``, ``config_kwargs.retries={"max_attempts": 10}``)."""
    options: dict[str, Any] = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--storage-option")
        key, raw = item.split("=", 1)
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options


storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec/s3fs option, repeatable; dotted keys nest, e.g. client_kwargs.region_name=eu-west-1. "
    "Credentials come from the standard AWS chain (environment, AWS_PROFILE, instance role).",
)
