"""Latency of text-to-image search through the real service (``imtext serve``) on 127.0.0.1.

Rows:

* **1K real**: ``imtext serve --export-dir EXPORT --gallery GALLERY`` (the built-in test split:
  1,000 images, exact index), started as a user starts it.
* **100K and 1M synthetic**: the same service (same encoders, routes and uvicorn) over a gallery
  of made-up embeddings: ``--clusters`` random unit centres, each point a centre plus Gaussian
  noise, normalised (real embeddings cluster too). They are written to the service's cache
  exactly as an embedded gallery would be, so the server loads them and its indexes from the
  cache; one row per index kind (exact, and each of ``--approx``).

Each request is ``GET /api/search?q=CAPTION&k=10`` with a caption of the gallery's test split, so
the text encoder runs in every request. The client is bounded: ``--concurrency`` threads, each
with one keep-alive connection, send ``--requests`` requests in all after ``--warmup`` untimed
ones; latency is measured per request at the client (p50, p99) and requests/s is requests over the
wall time. Client and server share the machine's cores.

Index memory is the size of the index file (what the server holds in memory for it). Recall@10
of an approximate index is the share of the exact index's top 10 it returns, over ``--queries``
queries (gallery points plus noise, normalised). The baseline, measured in the same run, is the 1K
exact row: the table gives each row's p99 over the baseline's.

Run: ``.venv/bin/python bench/bench_serve.py --export artifacts/kfp/<run>/export/onnx``;
``--smoke`` runs tiny sizes once (``make test`` does, on stand-in encoders).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from imtext.config import ServeConfig, load_stage_config  # noqa: E402


def serve_config(index: str, threads: int | None) -> ServeConfig:
    import dataclasses

    cfg = load_stage_config("serve", REPO / "params.yaml")
    return dataclasses.replace(cfg, index=index, threads=threads, poll_seconds=0.0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: Norm of the Gaussian noise around a cluster centre (unit norm): a point keeps a cosine of about
#: 0.7 with its centre, two points of a cluster about 0.5. Queries are gallery points plus noise of
#: norm QUERY_NOISE (a cosine of about 0.9 with their point, like a caption with its image here).
POINT_NOISE, QUERY_NOISE = 1.0, 0.5


def recipe(args: argparse.Namespace) -> str:
    """What the synthetic embeddings depend on: the cache key of their gallery."""
    return f"seed {args.seed}, clusters {args.clusters}, noise {POINT_NOISE}"


def unit_rows(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def with_noise(rows: np.ndarray, norm: float, rng: np.random.Generator) -> np.ndarray:
    """``rows`` plus Gaussian noise whose expected norm is ``norm``, normalised."""
    scale = np.float32(norm / np.sqrt(rows.shape[1]))
    return unit_rows(rows + rng.standard_normal(rows.shape, dtype=np.float32) * scale)


def clustered_embeddings(size: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """(size, dim) float32 unit vectors: random unit cluster centres plus noise, normalised."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((clusters, dim), dtype=np.float32))
    out = np.empty((size, dim), np.float32)
    for start in range(0, size, 100_000):  # in blocks: bounded temporary memory
        stop = min(size, start + 100_000)
        out[start:stop] = with_noise(
            centres[rng.integers(0, clusters, stop - start)], POINT_NOISE, rng
        )
    return out


def test_captions(gallery: Path, limit: int = 2000) -> list[str]:
    data = json.loads((gallery / "dataset.json").read_text())
    captions = [
        s["raw"] for image in data["images"] if image["split"] == "test" for s in image["sentences"]
    ]
    return captions[:limit]


# ---------------------------------------------------------------- server side


def run_synthetic_server(args: argparse.Namespace) -> None:
    """The service over the synthetic gallery whose cache ``prepare_synthetic`` wrote."""
    import logging

    from imtext.serve.gallery import synthetic_gallery
    from imtext.serve.index import IndexCache
    from imtext.serve.model import ExportDirSource
    from imtext.serve.server import run_server
    from imtext.serve.service import Service

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    cfg = serve_config(args.index, args.threads)
    gallery = synthetic_gallery(args.size, recipe(args))
    service = Service(ExportDirSource(args.export), gallery, cfg, IndexCache(args.cache))
    run_server(service, cfg, "127.0.0.1", args.port)


def prepare_synthetic(args, size: int, kinds: list[str]) -> dict[str, dict]:
    """Write the synthetic gallery's embeddings and each index kind to the cache (as the server
    would) and measure each index: build seconds, file bytes, recall@10 against exact."""
    import faiss

    from imtext.serve.gallery import synthetic_gallery
    from imtext.serve.index import IndexCache, configure_search, index_name, search
    from imtext.serve.model import ExportDirSource
    from imtext.serve.state import build_state

    source = ExportDirSource(args.export)
    model = source.load(source.current_version())
    dim = model.encoders.spec.embed_dim
    gallery = synthetic_gallery(size, recipe(args))
    vectors = clustered_embeddings(size, dim, args.clusters, args.seed)
    cache = IndexCache(args.work / "cache")
    rows = {}
    for kind in kinds:
        cfg = serve_config(kind, args.threads)
        start = time.monotonic()
        state = build_state(
            model, gallery, cfg, cache, print, embeddings=(vectors, np.zeros((0, dim), np.float32))
        )
        rows[kind] = {
            "build_s": time.monotonic() - start,
            "bytes": state.index_bytes,
            "source": state.index_source,
            "file": cache.folder(model.cache_key, gallery.digest)
            / f"{index_name(kind, cfg, size)}.faiss",
        }
        del state
    rng = np.random.default_rng(args.seed + 1)
    queries = with_noise(vectors[rng.integers(0, size, args.queries)], QUERY_NOISE, rng)
    del vectors
    _, truth = search(faiss.read_index(str(rows["exact"]["file"])), queries, 10)
    for kind in kinds:
        index = configure_search(
            faiss.read_index(str(rows[kind]["file"])), serve_config(kind, args.threads)
        )
        rows[kind]["recall"] = recall_at_10(index, queries, truth)
        if kind == "ivf":
            rows[kind]["sweep"] = probe_sweep(index, queries, truth, args.probes)
        del index
    return rows


def recall_at_10(index, queries: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top 10 (``truth``) that ``index`` returns in its top 10."""
    from imtext.serve.index import search

    _, found = search(index, queries, 10)
    return float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))


def probe_sweep(index, queries: np.ndarray, truth: np.ndarray, probes: list[int]) -> list[dict]:
    """Recall@10 and in-process milliseconds per query (one at a time, no HTTP, no text encoder)
    of an IVF index at each ``nprobe``."""
    results = []
    for probe in probes:
        index.nprobe = min(probe, index.nlist)
        start = time.perf_counter()
        for query in queries[:200]:
            index.search(query[None], 10)
        ms = (time.perf_counter() - start) / min(200, len(queries)) * 1000
        results.append(
            {
                "probe": probe,
                "lists": index.nlist,
                "recall": recall_at_10(index, queries, truth),
                "ms": ms,
            }
        )
    return results


# ---------------------------------------------------------------- client side


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"the server did not become ready; its log:\n{log.read_text()}"
                ) from None
            time.sleep(0.5)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def load(port: int, captions: list[str], requests: int, warmup: int, concurrency: int) -> dict:
    """Bounded client: ``concurrency`` threads with keep-alive connections send ``requests``
    timed requests (after ``warmup`` untimed ones); p50, p99 (ms) and requests/s."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(requests))
    lock = threading.Lock()

    def one(conn: http.client.HTTPConnection, i: int) -> float:
        path = f"/api/search?k=10&q={quote(captions[i % len(captions)])}"
        start = time.perf_counter()
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200:
            failures.append(f"{response.status} {body[:200]!r}")
        return elapsed

    def worker(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for i in range(warmup):
            one(conn, offset * 1000 + i)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            latencies.append(one(conn, i))
        conn.close()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    ms = sorted(x * 1000 for x in latencies)
    return {
        "p50": statistics.median(ms),
        "p99": ms[min(len(ms) - 1, int(round(0.99 * (len(ms) - 1))))],
        "rps": len(ms) / wall,
    }


def measure(command: list[str], args, captions: list[str], name: str) -> tuple[dict, dict]:
    port = free_port()
    log = args.work / f"server-{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO
        )
    try:
        ready = wait_ready(f"http://127.0.0.1:{port}", proc, log, args.ready_timeout)
        result = load(port, captions, args.requests, args.warmup, args.concurrency)
    finally:
        stop(proc)
    return ready, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", type=Path, required=True, help="export directory (ONNX)")
    parser.add_argument("--gallery", type=Path, default=REPO / "data/shapes")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--approx", nargs="*", default=["ivf"], choices=["ivf", "hnsw"])
    parser.add_argument("--clusters", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=1000, help="recall@10 queries")
    parser.add_argument("--probes", type=int, nargs="*", default=[8, 16, 32, 64, 128])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=10, help="untimed requests per thread")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads in the server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=1800)
    parser.add_argument("--work", type=Path, default=REPO / "artifacts/bench/serve")
    parser.add_argument("--out", type=Path, default=REPO / "artifacts/bench/bench_serve.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, few requests")
    # The synthetic server (started by this script itself).
    parser.add_argument("--_serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--index", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._serve:
        run_synthetic_server(args)
        return
    if args.smoke:
        args.sizes, args.clusters, args.queries, args.probes = [3000], 30, 50, [4]
        args.requests, args.warmup, args.concurrency = 20, 2, 1
    args.work.mkdir(parents=True, exist_ok=True)
    captions = test_captions(args.gallery)
    imtext = [str(Path(sys.executable).parent / "imtext")]
    rows = []
    real = [
        *imtext, "serve", "--export-dir", str(args.export), "--gallery", str(args.gallery),
        "--index", "exact", "--poll-seconds", "0", "--cache-dir", str(args.work / "cache"),
    ]  # fmt: skip
    ready, result = measure(real, args, captions, "real")
    rows.append({"gallery": f"{ready['gallery']['images']:,} real", "index": "exact",
                 "build_s": None, "bytes": ready["index"]["bytes"], "recall": 1.0, **result})  # fmt: skip
    print(rows[-1], flush=True)
    for size in args.sizes:
        kinds = ["exact", *args.approx]
        built = prepare_synthetic(args, size, kinds)
        for kind in kinds:
            command = [
                sys.executable, __file__, "--_serve", "--export", str(args.export),
                "--size", str(size), "--seed", str(args.seed), "--index", kind,
                "--clusters", str(args.clusters),
                "--cache", str(args.work / "cache"), "--threads", str(args.threads),
            ]  # fmt: skip
            ready, result = measure(command, args, captions, f"{size}-{kind}")
            assert ready["index"]["source"] == "loaded", ready
            rows.append({"gallery": f"{size:,} synthetic", "index": kind, **built[kind], **result})
            print({k: v for k, v in rows[-1].items() if k not in ("file", "sweep")}, flush=True)
    table = format_table(rows, args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)


def format_table(rows: list[dict], args) -> str:
    baseline = rows[0]["p99"]
    lines = [
        f"requests {args.requests} (+{args.warmup} warm-up per thread), concurrency "
        f"{args.concurrency}, FAISS threads {args.threads}, CPUs {os.cpu_count()}",
        "",
        "| gallery | index | build s | index MB | recall@10 | p50 ms | p99 ms | req/s | p99 / 1K exact |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("build_s") is None:
            build = "-"  # the real gallery: the server's own log has its time
        elif row.get("source") == "loaded":
            build = "cached"  # built by an earlier run with the same data and settings
        else:
            build = f"{row['build_s']:.1f}"
        lines.append(
            f"| {row['gallery']} | {row['index']} | {build} | {row['bytes'] / 1e6:.1f} | "
            f"{row['recall']:.3f} | {row['p50']:.1f} | {row['p99']:.1f} | {row['rps']:.1f} | "
            f"{row['p99'] / baseline:.2f}x |"
        )
    for row in rows:
        if row.get("sweep"):
            lines += [
                "",
                f"IVF on {row['gallery']} ({row['sweep'][0]['lists']} lists): recall@10 and "
                "search ms per query in-process (no HTTP, no text encoder), by lists scanned",
                "",
                "| ivf_probe | recall@10 | ms / query |",
                "|---|---|---|",
                *(f"| {s['probe']} | {s['recall']:.3f} | {s['ms']:.2f} |" for s in row["sweep"]),
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
