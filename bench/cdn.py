"""Photos over HTTP against the same photos as local files: what reading from a CDN costs the tag job.

    python -m bench.cdn [--images 2000] [--rounds 2] [--workers 2] [--batch-size 64] [--no-write]

The Kaggle sample's real 225x300 photos (``$FASHION_SAMPLE_DIR``; without it the shipped demo's photos),
cycled to ``--images`` rows, are tagged twice per round by the shipped model: once as local paths, once as
``http://127.0.0.1:PORT/...`` URLs served by a threaded static server in this process (ETag, Last-Modified,
Content-Length, keep-alive: what a CDN answers), read by ``tagger/data/http.py`` under
``--allow-host 127.0.0.1:* --allow-private-addresses --allow-plain-http``. Order alternates each round; each run
is a fresh process (bench/child.py). Loopback has no network latency: the figure is the reader's own cost
(connection pool, request, streaming, checks), not a CDN's round trips. The server shares the machine's CPUs
with the job, as a CDN would not. Figures go to docs/benchmarks.md (``bench:cdn`` markers).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import statistics
import sys
import threading
import time
from datetime import datetime, timezone
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

from . import catalogs, procmem, report
from .engines import catalog, model_snapshot, SHIPPED_MODEL


def serve(root: Path) -> tuple[ThreadingHTTPServer, str]:
    """A static file server for ``root`` on 127.0.0.1 (a daemon thread; stops with this process)."""
    cache: dict[str, tuple[bytes, str, str]] = {}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            self.answer(head=False)

        def do_HEAD(self):
            self.answer(head=True)

        def answer(self, head: bool):
            path = root / unquote(self.path.lstrip("/"))
            entry = cache.get(str(path))
            if entry is None and path.is_file():
                data = path.read_bytes()
                entry = cache[str(path)] = (data, hashlib.md5(data).hexdigest(), formatdate(path.stat().st_mtime, usegmt=True))
            if entry is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data, etag, modified = entry
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Last-Modified", modified)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def url_catalog(local: Path, root: Path, base: str) -> Path:
    import csv

    target = catalogs.WORK / "cdn" / f"{local.stem}-http.csv"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(local, newline="") as source, open(target, "w", newline="") as sink:
        writer = csv.writer(sink)
        writer.writerow(["product_id", "image"])
        for row in csv.DictReader(source):
            writer.writerow([row["product_id"], f"{base}/{quote(str(Path(row['image']).relative_to(root)))}"])
    return target


def measure(spec: dict, label: str) -> dict:
    code, out, err, memory, wall = procmem.run_measured([sys.executable, "-m", "bench.child", json.dumps(spec)], interval=0.5)
    lines = [line for line in out.splitlines() if line.startswith("BENCH-RESULT ")]
    if code != 0 or not lines:
        raise RuntimeError(f"{label} failed (exit {code}):\n{err[-3000:]}")
    result = json.loads(lines[-1].removeprefix("BENCH-RESULT "))
    if result.get("errors"):
        raise RuntimeError(f"{label}: {result['errors']} error rows; the comparison needs every photo tagged")
    result["images_per_s"] = round(result["rows"] / result["wall_s"], 2)
    print(f"  {label:<10} {result['rows']:>6} img {result['images_per_s']:7.2f} img/s  wall {result['wall_s']:7.1f}s",
          file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cdn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default=str(SHIPPED_MODEL))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    command = "python -m bench.cdn " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    started = time.time()
    local, source = catalog(args.images)
    import csv

    with open(local, newline="") as handle:
        first = Path(next(csv.DictReader(handle))["image"])
    root = first.parent
    server, base = serve(root)
    remote = url_catalog(local, root, base)
    model = model_snapshot(args.model)
    common = {"variant": "tagger", "model": model, "batch_size": args.batch_size, "workers": args.workers}
    http = {"allow_hosts": ["127.0.0.1:*"], "allow_private_addresses": True, "allow_plain_http": True}
    runs: dict[str, list[dict]] = {"files": [], "http": []}
    for round_ in range(args.rounds):
        for kind in (["files", "http"] if round_ % 2 == 0 else ["http", "files"]):
            spec = {**common, "catalog": str(local if kind == "files" else remote), **(http if kind == "http" else {})}
            runs[kind].append(measure(spec, f"{kind} r{round_ + 1}"))
    server.shutdown()
    walls = {kind: statistics.median(r["wall_s"] for r in rs) for kind, rs in runs.items()}
    results = {"command": command.strip(), "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": procmem.machine_info(), "catalog": source, "images": args.images, "workers": args.workers,
               "batch_size": args.batch_size, "rounds": args.rounds, "wall_s": walls,
               "http_to_files": round(walls["http"] / walls["files"], 3), "runs": runs,
               "elapsed_s": round(time.time() - started, 1)}
    raw = catalogs.ROOT / "bench" / "results" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"cdn-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(json.dumps(results, indent=2))
    markdown = "\n".join([
        f"Command: `{results['command']}` ({results['started_at']}, {results['elapsed_s']:.0f} s)  ",
        f"Machine: {report._machine(results['machine'])}  ",
        f"Catalog: {source}, {args.images} rows; shipped model (`--runtime auto`), batch {args.batch_size}, "
        f"{args.workers} workers; {args.rounds} round(s), order alternating, each run a fresh process; the HTTP server "
        "(a threaded Python static server on 127.0.0.1, ETag + Content-Length, keep-alive) runs in the bench process.",
        "",
        "| images read as | wall (median) | img/s | runs |",
        "|---|---|---|---|",
        *(f"| {kind} | {walls[kind]:.1f} s | {args.images / walls[kind]:.1f} | "
          + ", ".join(f"{r['wall_s']:.1f} s" for r in runs[kind]) + " |" for kind in ("files", "http")),
        "",
        f"HTTP / files (time): **{results['http_to_files']:.2f}x**",
    ])
    print(markdown)
    if not args.no_write:
        report.update_section("cdn", markdown, results, module="cdn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
