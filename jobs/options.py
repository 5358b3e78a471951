"""Options and parsing shared by several commands."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from tagger.data.decode import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS
from tagger.model.settings import DEVICES, PRECISIONS, RUNTIMES


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
        names = key.strip().split(".")
        if not all(name.strip() for name in names):  # '=x', 'a..b=x': an empty key would be passed on, and ignored
            raise click.BadParameter(f"expected KEY=VALUE with a KEY such as anon or client_kwargs.region_name, got {item!r}",
                                     param_hint="--storage-option")
        target = options
        *parents, leaf = names
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = value
    return options


class FiniteFloatRange(click.FloatRange):
    """``click.FloatRange`` that also refuses ``nan`` and ``inf``: every comparison with NaN is false, so a NaN
    threshold would switch its gate off without a word, and an infinite deadline is no deadline. Every float
    option of every command uses it (one validation, not one per option)."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = click.FLOAT.convert(value, param, ctx)  # the text -> float, as click does
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return super().convert(number, param, ctx)


class CommandError(click.ClickException):
    """One line on stderr, ``tagger COMMAND: MESSAGE``, and the command's exit code (2: invalid input)."""

    def __init__(self, command: str, message: str, exit_code: int = 2):
        super().__init__(message)
        self.command = command
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"tagger {self.command}: {self.format_message()}", err=True)


storage_option = click.option(
    "--storage-option",
    "storage_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="fsspec/s3fs option, repeatable; dotted keys nest (client_kwargs.region_name=eu-west-1). Credentials: the AWS chain.",
)


# The model's and the image path's settings, declared once for every command that scores images (tag, evaluate,
# predict): one spelling, one default, one help text. Evaluate and predict compute what the tag job computes at the
# same settings (tagger.model.inference.resolve), so the tag job's setting shows the scores it writes
# (docs/reference/options.md says so).
device_option = click.option(
    "--device", type=click.Choice(DEVICES), default="auto", show_default=True,
    help="auto uses CUDA when a GPU is visible, and says so.",
)
precision_option = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
    help="Model arithmetic. auto: fp16 on CUDA; on a CPU fp32, or a reduced precision the bundle passed a check in "
    "where the CPU computes it natively.",
)
runtime_option = click.option(
    "--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
    help="What runs the model. auto: PyTorch on CUDA; on a CPU the installed runtime that costs the least CPU per "
    "image, measured once per model and CPU.",
)
max_image_bytes_option = click.option(
    "--max-image-bytes", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGE_BYTES, show_default=True,
    help="Larger image files are too_large errors, refused from their size before they are read.",
)
max_image_pixels_option = click.option(
    "--max-image-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_IMAGE_PIXELS, show_default=True,
    help="Decompression-bomb guard: larger images become error rows (too_large), refused from their header.",
)


# How a command reads a catalog manifest (tag; predict --catalog): tagger.data.manifest.read_manifest's options.
id_column_option = click.option("--id-column", default="product_id", show_default=True, help="Manifest column with the product id.")
image_column_option = click.option(
    "--image-column", default="image", show_default=True,
    help="Manifest column with the image: a path relative to the manifest, an absolute path or an s3:// URL.",
)
catalog_format_option = click.option(
    "--catalog-format", type=click.Choice(["csv", "parquet", "jsonl"]), default=None, help="Override the format guessed from the name.",
)
text_column_option = click.option(
    "--text-column", "text_columns", multiple=True, metavar="COLUMN",
    help="A catalog column of text (title, description) the bundle's text model reads beside the photos; repeatable, "
    "in the bundle's field order.",
)


def image_options(command):
    """--max-image-bytes, --max-image-pixels and the http options: how a command reads its photos (evaluate,
    retrain; tag adds --draft-decode). The config they fill builds one tagger.data.reader.ImageSettings."""
    return max_image_bytes_option(max_image_pixels_option(http_options(command)))


def http_options(command):
    """--allow-host, --allow-private-addresses, --allow-plain-http and --http-deadline: which http(s):// images a
    command may read (tag, evaluate, retrain; tagger.data.http.http_policy)."""
    options = [
        click.option("--allow-host", "allow_hosts", multiple=True, metavar="HOST", envvar="TAGGER_ALLOW_HOSTS",
                     help="Read https:// images from HOST (repeatable; *.example.com: subdomains; HOST:8443 or HOST:*: another port "
                     "than 443). Else none is read."),
        click.option("--allow-private-addresses", is_flag=True, envvar="TAGGER_ALLOW_PRIVATE_ADDRESSES",
                     help="Let allowed hosts resolve to private, loopback or link-local addresses (a CDN inside your network)."),
        click.option("--allow-plain-http", is_flag=True, envvar="TAGGER_ALLOW_PLAIN_HTTP",
                     help="Also read http:// (not only https://) from the allowed hosts: a server you trust on a network "
                     "you trust."),
        click.option("--http-deadline", type=FiniteFloatRange(1, 86_400), default=120.0, show_default=True,
                     help="Seconds one http(s) image may take, retries of 429/5xx included; past it the server counts as "
                     "unavailable (exit 4, as S3 down)."),
    ]
    for option in reversed(options):  # as stacked decorators: --help lists them in this order
        command = option(command)
    return command
