"""What ``--since`` pays to learn the current version of every image, without reading any, on the real sample.

    python -m bench.versions [--repeat 3] [--no-write]

Local: ``os.stat`` of every sample image, one by one and through the thread pool of
:func:`tagger.tag.incremental.current_versions`. S3: the sample uploaded to moto's S3 server on loopback, then
versions found by listing the folder (one LIST per 1,000 keys) and by a HEAD per object. Loopback moto
answers in well under a millisecond, so the S3 figures count requests more than they show real S3 latency
(tens of ms per request, which the thread pool overlaps for HEADs); the request counts are what carry over.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

from . import catalogs, procmem, report


def timed(function, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.versions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench.versions " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        images = sorted(catalogs.sample_dir().joinpath("images").glob("*.jpg"))
    except catalogs.SampleMissing as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 0

    import pyarrow as pa

    from tagger.tag import incremental
    from tagger.data.reader import local_version, read_image

    paths = [str(p) for p in images]
    rows = []
    serial, serial_versions = timed(lambda: [local_version(os.stat(p)) for p in paths], args.repeat)
    pooled, pooled_versions = timed(lambda: incremental.current_versions(pa.array(paths)).to_pylist(), args.repeat)
    assert pooled_versions == serial_versions
    reading, _ = timed(lambda: [read_image(p, None)[1] for p in paths[:500]], 1)
    rows.append(("local, os.stat one by one", len(paths), serial, len(paths), "0"))
    rows.append(("local, current_versions (serial on cache hits, else 32 threads)", len(paths), pooled, len(paths), "0"))
    from unittest import mock

    with mock.patch.object(incremental, "FAST_STAT_S", 0.0):
        forced, forced_versions = timed(lambda: incremental.current_versions(pa.array(paths)).to_pylist(), args.repeat)
    assert forced_versions == serial_versions
    rows.append(("local, current_versions forced through the 32-thread pool", len(paths), forced, len(paths), "0"))
    rows.append(("local, reading every file instead (read_image, 500 files, scaled)", len(paths), reading * len(paths) / 500, len(paths), "0"))

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from moto.server import ThreadedMotoServer

    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
        fs.mkdir("bench-sample")
        fs.put([str(p) for p in images], "bench-sample/images/")
        urls = [f"s3://bench-sample/images/{p.name}" for p in images]
        results = {}
        for mode, minimum in (("listing", 1), ("head", 10**9)):
            incremental.LIST_MIN_OBJECTS = minimum
            seconds, versions = timed(lambda: incremental.current_versions(pa.array(urls)).to_pylist(), args.repeat)
            results[mode] = (seconds, versions)
        assert results["listing"][1] == results["head"][1] and None not in results["listing"][1]
        pages = -(-len(urls) // 1000)
        rows.append(("S3 (moto, loopback), one listing of the folder", len(urls), results["listing"][0], pages, f"{pages} LIST"))
        rows.append(("S3 (moto, loopback), a HEAD per object (32 threads)", len(urls), results["head"][0], len(urls), f"{len(urls)} HEAD"))
    finally:
        server.stop()

    lines = [f"Command: `{command.strip()}` ({datetime.now(timezone.utc).isoformat(timespec='seconds')})  ",
             f"Machine: {report._machine(procmem.machine_info())}  ",
             f"The real sample's {len(paths)} images (warm page cache); median of {args.repeat}.", "",
             "| how | images | seconds | images/s | requests |", "|---|---|---|---|---|"]
    for name, n, seconds, _, requests in rows:
        lines.append(f"| {name} | {n:,} | {seconds:.3f} | {n / seconds:,.0f} | {requests} |")
    markdown = "\n".join(lines)
    print(markdown)
    if not args.no_write:
        report.update_section("versions", markdown, {"rows": [list(r) for r in rows]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
