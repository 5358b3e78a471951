"""The ``tagger`` command: a click group, one thin module per subcommand."""

from __future__ import annotations

import logging
import os
import sys

import click

from tagger import __version__


class SentenceGroup(click.Group):
    """``tagger --help`` lists each command with the whole first sentence of its help, wrapped, never cut mid-way
    (click cuts summaries at the line's width with '...')."""

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=SentenceGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
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
    from . import demo, evaluate, predict, report, retrain, tag

    for command in (tag.tag, tag.finalize, retrain.retrain, evaluate.evaluate, predict.predict, demo.demo_data, demo.demo_check,
                    report.report):
        cli.add_command(command)


_register()


def main() -> None:
    try:
        cli.main(prog_name="tagger")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    from . import tag

    if tag.RAN:
        # The exit code is the job's contract with its scheduler. A normal interpreter exit runs native
        # destructors while torch's oneDNN/OpenMP pools or s3fs's event loop thread may still be alive, and
        # one of them now and then aborts the process ("terminate called without an active exception",
        # exit 134) after the job has already said how it ended. Flush, then leave without them.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
