"""``tagger predict``: tags for external images, shown beside them (PNG contact sheet or HTML gallery)."""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import click

from tagger.tag.config import default_workers

from .options import (
    catalog_format_option,
    id_column_option,
    image_column_option,
    text_column_option,
    device_option,
    max_image_bytes_option,
    max_image_pixels_option,
    parse_storage_options,
    precision_option,
    runtime_option,
    storage_option,
)

log = logging.getLogger("tagger.predict")

EXIT_OK, EXIT_CRASH, EXIT_INVALID_INPUT = 0, 1, 2
FORMATS = {".png": "png", ".html": "html", ".htm": "html"}
AUTO_WORKERS_FROM = 64  # fewer images than this: decode in the main process, starting workers costs more


def _out_format(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if os.path.splitext(value)[1].lower() not in FORMATS:
        raise click.BadParameter(f"{value!r}: the file name must end in .png (contact sheet) or .html (gallery)")
    return value


@click.command("predict")
@click.argument("images", nargs=-1, type=click.Path())
@click.option("--catalog", default=None, metavar="FILE",
              help="Instead of IMAGES: a manifest, read as tag reads it, one card per row; with --text-column, the tags tag "
              "writes (fused).")
@id_column_option
@image_column_option
@catalog_format_option
@text_column_option
@click.option("--model", required=True, envvar="TAGGER_MODEL", help="Model bundle folder (model.json + model.safetensors), local or s3://.")
@click.option("--out", required=True, callback=_out_format,
              help="sheet.png: a contact sheet (pages sheet-2.png, ... past --per-page); gallery.html: one self-contained page.")
@click.option("--top-k", type=click.IntRange(1, 20), default=3, show_default=True, help="Labels shown per attribute.")
@device_option
@precision_option
@runtime_option
@max_image_bytes_option
@max_image_pixels_option
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images per model call.")
@click.option("--workers", type=click.IntRange(min=0), default=None, show_default=f"0 under {AUTO_WORKERS_FROM} images, else min(8, CPUs)",
              help="Image reading/decoding processes.")
@click.option("--thumb-size", type=click.IntRange(48, 512), default=160, show_default=True, help="Thumbnail side in pixels.")
@click.option("--per-page", type=click.IntRange(min=1), default=40, show_default=True, help="Images per PNG page.")
@click.option("--table/--no-table", default=True, show_default=True,
              help="Also write the predictions as Parquet beside --out (sheet.png -> sheet.parquet).")
@storage_option
def predict(images: tuple[str, ...], catalog: str | None, id_column: str, image_column: str, catalog_format: str | None,
            text_columns: tuple[str, ...], model: str, out: str, top_k: int, device: str, precision: str, runtime: str, max_image_bytes: int,
            max_image_pixels: int, batch_size: int, workers: int | None, thumb_size: int, per_page: int, table: bool,
            storage_options: tuple[str, ...]) -> None:
    """Predict tags for IMAGES (files, or folders searched recursively for jpg/jpeg/png/webp/gif), or for the rows
    of a --catalog, and show each image with its top labels and scores. Unreadable or missing images are listed
    with their error. With --text-column the tags are fused from photo and text as `tagger tag --text-column`
    writes them; a row whose photo cannot be read but whose text can is tagged from its text.

    Exit codes: 0 done (unreadable images included); 2 invalid input (bundle, paths, options, an --out it cannot
    write: checked before the model runs); 1 any other failure.
    """
    from tagger.model.bundle import BundleError, load_bundle
    from tagger.evaluation import EvaluationError
    from tagger.predict import gallery
    from tagger.model.scoring import progress_logger, run_model
    from tagger.data.reader import image_settings
    from tagger.model.inference import InferenceSpec, resolve
    from tagger.model.scorer import NonFiniteScores
    from tagger import storage
    from tagger.data.manifest import ManifestError, read_manifest
    from tagger.tag.text_rows import text_fuser

    if bool(images) == bool(catalog):
        sys.exit(_fail(EXIT_INVALID_INPUT, "invalid input: give IMAGES (files or folders) or --catalog FILE, not both"
                       if images else "invalid input: missing IMAGES: give files or folders of images, or --catalog FILE"))
    if text_columns and not catalog:
        sys.exit(_fail(EXIT_INVALID_INPUT, "invalid input: --text-column reads a column of a catalog: give --catalog FILE "
                       "instead of IMAGES"))
    fuser = manifest = scored = None
    try:
        options = parse_storage_options(storage_options)
        check_out(out, options)  # found now, not after the model has scored every image
        bundle = load_bundle(model, options)
        if catalog:
            manifest = read_manifest(catalog, id_column=id_column, image_column=image_column, fmt=catalog_format,
                                     storage_options=options, extra_columns=tuple(text_columns))
            paths, scored = gallery.catalog_rows(manifest)
            if text_columns:  # the tag job's checks and messages: the columns, the bundle's text model, their count
                fuser = text_fuser(SimpleNamespace(catalog=catalog, text_columns=text_columns), manifest, bundle, options)
        else:
            paths = gallery.collect_images(images)
        try:  # a runtime not installed, fp16 on the CPU: said now, before any image is read
            inference = resolve(InferenceSpec(device, runtime, precision), bundle)
        except (RuntimeError, ValueError) as exc:
            raise EvaluationError(str(exc)) from None
    except (BundleError, EvaluationError, ManifestError, storage.OutputLocationError) as exc:
        sys.exit(_fail(EXIT_INVALID_INPUT, f"invalid input: {exc}"))
    if workers is None:
        workers = 0 if len(paths) < AUTO_WORKERS_FROM else default_workers()
    try:
        outputs = run_model(
            bundle, paths if scored is None else [paths[r] for r in scored], inference=inference, batch_size=batch_size, workers=workers,
            thumb_size=thumb_size, images=image_settings(max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels),
            on_batch=progress_logger("predict"),
        )
        if manifest is None:
            results = gallery.image_predictions(bundle, paths, outputs, top_k)
        else:
            results = gallery.catalog_predictions(bundle, manifest, paths, scored, outputs, fuser, top_k)
        written = write_outputs(bundle, results, out, thumb_size=thumb_size, per_page=per_page, table=table,
                                catalog=manifest is not None, text=fuser is not None)
    except PermissionError as exc:  # a file system that refuses the write although the check passed (read-only mount)
        sys.exit(_fail(EXIT_INVALID_INPUT, f"invalid input: cannot write --out {out}: {exc}; choose another --out or fix its permissions"))
    except NonFiniteScores as exc:  # says which images and what to try: no traceback, as the tag job
        sys.exit(_fail(EXIT_CRASH, f"failed: {exc}"))
    except Exception as exc:
        log.exception("predict failed")
        sys.exit(_fail(EXIT_CRASH, f"failed: {type(exc).__name__}: {exc}"))
    bad = sum(not r.ok for r in results)
    from_text = sum(r.inputs == "text" for r in results)
    click.echo(f"{len(results)} image(s), {bad} unreadable" + (f", {from_text} tagged from text" if from_text else "")
               + f" -> {', '.join(written)}", err=True)


def check_out(out: str, options) -> None:
    """Refuse an --out whose folder cannot take the files (read-only, a file in the way) or that names a folder."""
    from tagger import storage

    folder = storage.parent(out)
    try:
        storage.check_output_location(folder, options)
    except storage.OutputLocationError as exc:  # said of the file the user named, not of its folder
        raise storage.OutputLocationError(str(exc).replace(f"--out {folder}:", f"--out {out}: its folder", 1)) from None
    if not storage.is_remote(out) and os.path.isdir(out):
        raise storage.OutputLocationError(f"--out {out}: is an existing folder; name the file to write (sheet.png or gallery.html)")


def write_outputs(bundle, results, out: str, *, thumb_size: int, per_page: int, table: bool, catalog: bool = False,
                  text: bool = False) -> list[str]:
    from tagger import storage
    from tagger.predict import gallery

    written = []
    if FORMATS[os.path.splitext(out)[1].lower()] == "png":
        pages = gallery.sheet_pngs(bundle, results, per_page=per_page, thumb_size=thumb_size)
        for name, data in zip(gallery.page_names(out, len(pages)), pages):
            storage.write_bytes(name, data)
            written.append(name)
    else:
        storage.write_bytes(out, gallery.gallery_html(bundle, results, thumb_size=thumb_size).encode())
        written.append(out)
    if table:
        import io

        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(gallery.predictions_table(bundle, results, catalog=catalog, text=text), buffer)
        storage.write_bytes(gallery.table_path(out), buffer.getvalue())
        written.append(gallery.table_path(out))
    return written


def _fail(code: int, message: str) -> int:
    click.echo(f"tagger predict: {message}", err=True)
    return code
