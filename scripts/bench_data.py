#!/usr/bin/env python
"""Data-layer benchmark (not a test): start-up time and peak RSS of ``build_stage_data`` on a large retrieval JSONL.

Writes ``--rows`` synthetic retrieval rows (query, positive, 2 hard negatives; random words, ~300 bytes a row) to
``--work``/train.jsonl with its spec, then measures four starts, each rank a process of its own:

* cold, 1 rank: empty data cache, so the file is parsed and checked (worker processes) into the cache;
* warm, 1 rank: the same cache, reused;
* cold, 2 ranks: an empty cache and two processes at once (``process_index`` 0 and 1): one builds, the other waits on
  the entry's lock and maps the result;
* warm, 2 ranks.

Each start then reads ``--steps`` batches of ``--batch`` examples per rank. Reported per rank: start-up seconds (to
the returned StageData), seconds for the batches, peak RSS (``ru_maxrss``) and, sampled every 20 ms, the peak of
RssAnon (memory the process owns) and RssFile (pages of the memory-mapped cache it touched: page cache, shared by
the ranks of a node and dropped by the kernel under pressure), with the process's RSS before the data layer (Python,
numpy, pyarrow) for reference.

    python scripts/bench_data.py --rows 5000000 --work /tmp/bench_data      # ~1.5 GB of JSONL, a few minutes
    python scripts/bench_data.py --rows 20000 --steps 5                     # script check, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from _proc import proc_status  # noqa: E402  (scripts/_proc.py: this script's folder is on sys.path)


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = [f"w{i:05d}" for i in range(20000)]
    words = np.asarray(vocab, dtype=object)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            q = rng.integers(0, len(vocab), size=(n, 7))
            d = rng.integers(0, len(vocab), size=(n, 3, 12))
            lines = []
            for i in range(n):
                docs = [" ".join(words[d[i, k]]) for k in range(3)]
                lines.append(json.dumps({"query": " ".join(words[q[i]]) + "?", "positive": docs[0],
                                         "negatives": docs[1:]}))
            f.write("\n".join(lines) + "\n")


SPEC = """name: bench
task: retrieval
instruction: Given a question, retrieve the passage that answers it
source: {path: train.jsonl}
fields: {query: query, positive: positive, negatives: negatives}
"""


def _status() -> dict:
    return proc_status("VmRSS", "RssAnon", "RssFile")


def child(a: argparse.Namespace) -> None:
    """One rank: build the stage data, read batches, print one JSON line."""
    from nvembed.data import build_stage_data

    base = _status()
    peak = dict(base)
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            for k, v in _status().items():
                peak[k] = max(peak.get(k, 0), v)
            time.sleep(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    data = build_stage_data([a.spec], stage="stage1", num_hard_negatives=2, batch_size=a.batch, seed=1,
                            process_index=a.rank, num_processes=a.world, log=lambda m: None)
    t_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for s in range(a.steps):
        n += len(data.batch(s))
    t_batches = time.perf_counter() - t0
    stop.set()
    t.join()
    for k, v in _status().items():
        peak[k] = max(peak.get(k, 0), v)
    src = data.tasks[0].source
    print(json.dumps({"rank": a.rank, "world": a.world, "start_s": round(t_start, 2), "batches_s": round(t_batches, 2),
                      "examples": n, "rows": len(src), "cache": src.cache_note,
                      "maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                      "peak_anon_mib": round(peak["RssAnon"]), "peak_file_mib": round(peak["RssFile"]),
                      "before_mib": round(base["VmRSS"])}), flush=True)


def run_ranks(a: argparse.Namespace, spec: Path, cache: Path, world: int) -> list:
    env = dict(os.environ, NVEMBED_DATA_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, __file__, "--child", "--spec", str(spec), "--rank", str(r),
                               "--world", str(world), "--steps", str(a.steps), "--batch", str(a.batch)],
                              env=env, stdout=subprocess.PIPE, text=True) for r in range(world)]
    out = []
    for p in procs:
        stdout, _ = p.communicate()
        if p.returncode:
            raise SystemExit(f"rank failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--work", default=None, help="folder for the data and caches (default: a temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--steps", type=int, default=200, help="batches read per rank after start-up")
    ap.add_argument("--batch", type=int, default=32, help="examples per rank and batch")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "train.jsonl"
    try:
        if not data.exists() or sum(1 for _ in open(data, "rb")) != a.rows:
            t0 = time.perf_counter()
            write_data(data, a.rows)
            print(f"wrote {a.rows} rows, {data.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        spec = work / "bench.yaml"
        spec.write_text(SPEC)
        results = []
        for world in (1, 2):
            cache = work / f"cache_{world}rank"
            shutil.rmtree(cache, ignore_errors=True)
            for phase in ("cold", "warm"):
                for r in run_ranks(a, spec, cache, world):
                    r["phase"] = phase
                    results.append(r)
                    print(json.dumps(r), flush=True)
        size = sum(f.stat().st_size for f in (work / "cache_1rank").glob("*.arrow"))
        print(f"\n{a.rows} rows, JSONL {data.stat().st_size / 1e9:.2f} GB, cache {size / 1e9:.2f} GB; "
              f"{a.steps} batches of {a.batch} per rank; cpus {os.cpu_count()}\n")
        print("| start | ranks | rank | start-up s | batches s | peak RSS MiB | peak RssAnon MiB | peak RssFile MiB "
              "| RSS before MiB | cache |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
        for r in results:
            print(f"| {r['phase']} | {r['world']} | {r['rank']} | {r['start_s']} | {r['batches_s']} | "
                  f"{r['maxrss_mib']} | {r['peak_anon_mib']} | {r['peak_file_mib']} | {r['before_mib']} | "
                  f"{r['cache']} |")
    finally:
        if not a.keep and not a.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
