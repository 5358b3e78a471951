"""``tagger demo-check``: the built-in demo's tags against the true labels; ``tagger demo-data``: drawn test data.

``make tag`` tags demo/catalog.csv (real product photos) with the shipped model and runs ``demo-check``.
``demo-data`` draws a synthetic Kaggle-layout data set (shapes in named colours) for tests and experiments.
"""

from __future__ import annotations

import time
from pathlib import Path

import click


@click.command("demo-data")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("data/drawn"), show_default=True,
              help="Folder to write styles.csv, images/, catalog.csv, catalog_images/ and catalog_truth.csv into.")
@click.option("--n-train", type=click.IntRange(min=18), default=1200, show_default=True, help="Labelled products in styles.csv.")
@click.option("--n-catalog", type=click.IntRange(min=1), default=200, show_default=True, help="Held-back products in catalog.csv.")
@click.option("--n-bad", type=click.IntRange(min=0), default=2, show_default=True, help="Deliberately bad catalog rows (missing, corrupt).")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed draws the same products.")
def demo_data(out: Path, n_train: int, n_catalog: int, n_bad: int, seed: int) -> None:
    """Draw synthetic products: styles.csv + images/ for retrain, catalog.csv (+ truth) for tag (tests, experiments)."""
    from tagger.demo.drawn import make_demo_dataset

    started = time.time()
    demo = make_demo_dataset(out, n_train=n_train, n_catalog=n_catalog, n_bad=n_bad, seed=seed)
    click.echo(f"demo dataset in {demo.root} ({n_train} labelled, {n_catalog} + {n_bad} catalog rows) in {time.time() - started:.1f}s", err=True)


@click.command("demo-check")
@click.option("--out", default="out/demo", show_default=True, help="The tag job's output root.")
@click.option("--run-date", default=None, help="Partition to check (default: the latest complete one).")
@click.option("--truth", type=click.Path(exists=True, dir_okay=False), default="demo/truth.csv", show_default=True,
              help="CSV of product_id + the model's attributes (an empty cell: no true value, not scored; a column the tags lack: ignored).")
@click.option("--photos-out", default=None, help="A second run's output root, tagged from the photos alone: its figures "
              "beside --out's (make tag: titles and photos alone).")
def demo_check(out: str, run_date: str | None, truth: str, photos_out: str | None) -> None:
    """How often the demo tags equal the true labels: accuracy per attribute on the demo catalog."""
    name, tags, scores = _scores(out, run_date, truth)
    inputs = ""
    if "inputs" in tags.columns:
        counts = tags["inputs"].value_counts(sort=True).iter_rows()
        inputs = "; inputs: " + ", ".join(f"{mode} {n}" for mode, n in counts)
    click.echo(f"demo tags vs true labels ({name}, {len(tags)} tagged products{inputs}):")
    if photos_out is None:
        for attribute, value in scores.items():
            click.echo(f"  {attribute:<15} {value:6.1%}")
        return
    _, _, photos = _scores(photos_out, run_date, truth)
    click.echo(f"  {'':<15} {'photos':>7} {'with titles' if inputs else out:>12}")
    for attribute, value in scores.items():
        click.echo(f"  {attribute:<15} {photos.get(attribute, float('nan')):7.1%} {value:12.1%}")


def _scores(out: str, run_date: str | None, truth: str):
    import polars as pl

    from tagger.demo.drawn import score_against_truth
    from tagger.tag.writers import read_complete_partition

    partitions = sorted(p.name for p in Path(out, "tags").glob("run_date=*") if (p / "_SUCCESS").exists())
    if not partitions:
        raise click.ClickException(f"{out}/tags has no complete partition; run `make tag` first")
    name = f"run_date={run_date}" if run_date else partitions[-1]
    tags = pl.from_arrow(read_complete_partition(str(Path(out, "tags", name))))
    try:
        return name, tags, score_against_truth(tags, truth)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
