"""The ``tagger`` command: a click group, one thin module per subcommand."""

from __future__ import annotations

import logging
import sys

import click

from tagger import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="tagger")
@click.option("-v", "--verbose", count=True, help="More log detail (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def cli(verbose: int, quiet: bool) -> None:
    """Fashion Tagger: tag catalog products from their images, retrain and evaluate the model."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose < 1:
        for noisy in ("botocore", "s3fs", "fsspec", "aiobotocore", "urllib3", "PIL", "lightning", "pytorch_lightning"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _register() -> None:
    from . import demo, evaluate, predict, retrain, tag

    for command in (tag.tag, tag.finalize, retrain.retrain, evaluate.evaluate, predict.predict, demo.demo_data, demo.demo_check):
        cli.add_command(command)


_register()


def main() -> None:
    cli(prog_name="tagger")


if __name__ == "__main__":
    main()
