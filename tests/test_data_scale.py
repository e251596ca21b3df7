"""Data that does not live in RAM (issue #17 item 1): the data cache is built once and reused, a changed file
rebuilds it, a bad line deep in a file is still named file:line (in-process and by worker processes), and a rank keeps
no Python object per row and reads only the rows of its batches."""

import gc
import json
import os
import threading
import tracemalloc

import pyarrow as pa
import pytest

from nvembed.data import SpecError, build_stage_data
from nvembed.data.cache import cache_dir
from nvembed.data.sources import WORKERS_ENV
from nvembed.data.spec import load_spec
from nvembed.data.tasks import TaskData

ROWS = 20_000
QUIET = dict(log=lambda m: None)


def line(i):
    return json.dumps({"q": f"question number {i} about topic {i % 97}", "p": f"the passage that answers {i}",
                       "n": [f"a wrong passage {i}", f"another wrong one {i * 7}"]}) + "\n"


@pytest.fixture
def data(tmp_path, monkeypatch):
    """20k retrieval rows and their spec, with a private data cache."""
    monkeypatch.setenv("NVEMBED_DATA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "train.jsonl"
    path.write_text("".join(line(i) for i in range(ROWS)), encoding="utf-8")
    spec = tmp_path / "train.yaml"
    spec.write_text("name: train\ntask: retrieval\ninstruction: Find the passage\nsource: {path: train.jsonl}\n"
                    "fields: {query: q, positive: p, negatives: n}\n")
    return path, spec


def entries():
    return sorted(p.name for p in cache_dir().glob("*.json"))


def test_cache_built_once_reused_and_rebuilt_when_the_file_changes(data):
    path, spec = data
    first = TaskData(load_spec(spec), **QUIET)
    assert first.source.entry.built and len(first.source) == ROWS and len(entries()) == 1
    q0 = first.source.fetch([0])[0]["query"]
    # rewrite the bytes in place keeping size, mtime and inode: a start that parsed the file would see the change
    st = os.stat(path)
    with open(path, "r+b") as f:
        head = f.read(len(q0) + 20)
        f.seek(0)
        f.write(head.replace(b"question", b"QUESTION"))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = TaskData(load_spec(spec), **QUIET)
    assert not again.source.entry.built and again.source.fetch([0])[0]["query"] == q0
    assert again.source.entry.key == first.source.entry.key
    # a real edit (new mtime, one more row) is a new entry; the stale one is removed, and so is what a killed build
    # left (its temporary file, its lock free)
    killed = cache_dir() / f".{'0' * 32}.rows.arrow.tmp-99999"
    killed.write_bytes(b"partial")
    with open(path, "a", encoding="utf-8") as f:
        f.write(line(ROWS))
    changed = TaskData(load_spec(spec), **QUIET)
    assert changed.source.entry.built and len(changed.source) == ROWS + 1
    assert changed.source.fetch([0])[0]["query"].startswith("QUESTION")
    assert entries() == [f"{changed.source.entry.key}.json"] and not killed.exists()


@pytest.mark.parametrize("workers", ["1", "2"], ids=["in-process", "2-workers"])
def test_bad_line_deep_in_the_file_is_named(data, monkeypatch, workers):
    path, spec = data
    monkeypatch.setenv(WORKERS_ENV, workers)
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text[15_000] = '{"q": "broken", "p": \n'  # line 15001
    text[17_000] = '{"q": "no passage"}\n'  # line 17001
    path.write_text("".join(text), encoding="utf-8")
    with pytest.raises(SpecError, match=rf"^{path}:15001: malformed JSON \(Expecting value\) \(spec {spec}"):
        build_stage_data([str(spec)], **QUIET)
    assert entries() == []  # a failed build leaves no entry
    spec.write_text(spec.read_text() + "on_error: skip\n")
    for built in (True, False):  # the start that maps the cache reports exactly what the one that built it did
        logs = []
        d = build_stage_data([str(spec)], log=logs.append)
        assert d.tasks[0].source.entry.built == built
        st = d.stats["train"]
        assert st["rows_read"] == ROWS and st["examples"] == ROWS - 2 and st["rows_skipped"] == 2
        assert st["skipped"] == {"malformed JSON (Expecting value)": 1, "missing field": 1}
        assert f"[data] train: skipped {path}:15001: malformed JSON (Expecting value)" in logs
        assert f"[data] train: skipped {path}:17001: field 'p': missing field" in logs


def test_workers_build_the_same_cache_as_one_process(data, monkeypatch, tmp_path):
    path, spec = data
    got = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("NVEMBED_DATA_CACHE", str(tmp_path / f"cache{workers}"))
        monkeypatch.setenv(WORKERS_ENV, workers)
        d = build_stage_data([str(spec)], batch_size=16, **QUIET)
        assert d.tasks[0].source.entry.built
        got[workers] = (d.tasks[0].source.fetch(range(0, ROWS, 997)), [d.batch(s) for s in (0, 5, 900)],
                        d.tasks[0].source.locate(ROWS - 1))
    assert got["1"] == got["2"] and got["1"][2] == f"{path}:{ROWS}"


def test_concurrent_ranks_build_once(data):
    _, spec = data
    out = []
    threads = [threading.Thread(target=lambda: out.append(TaskData(load_spec(spec), **QUIET))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(t.source.entry.built for t in out) == [False, True] and len(entries()) == 1


def test_a_rank_holds_no_row_and_reads_only_its_batches(data):
    _, spec = data
    build_stage_data([str(spec)], **QUIET)  # the cache is built (by any rank) before the measured start
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()
    ranks = [build_stage_data([str(spec)], batch_size=8, num_hard_negatives=2, process_index=r, num_processes=2,
                              **QUIET) for r in range(2)]
    fetched = {r: [] for r in range(2)}
    for r, d in enumerate(ranks):  # spy on the real reads: every row index a rank fetches from the table
        table = d.tasks[0].source.table
        real = table.rows
        table.rows = lambda idxs, columns=None, real=real, r=r: fetched[r].extend(idxs) or real(idxs, columns)
    steps = 50
    seen = {r: [e.query for s in range(steps) for e in d.batch(s)] for r, d in enumerate(ranks)}
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - before
    tracemalloc.stop()
    # numpy index arrays only (rows, one permutation): a Python str per row alone would be >= 50 bytes a row
    assert held / (2 * ROWS) < 40, held
    for r in range(2):
        assert len(fetched[r]) == steps * 8 and len(set(seen[r])) == steps * 8  # its own examples, nothing else
    assert not set(seen[0]) & set(seen[1])


def test_unwritable_cache_folder_is_one_user_error(data, monkeypatch, tmp_path):
    from nvembed.data.cache import CacheError

    _, spec = data
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("NVEMBED_DATA_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(CacheError, match=r"a_file/cache .*set NVEMBED_DATA_CACHE to a writable folder") as e:
        build_stage_data([str(spec)], **QUIET)
    assert e.value.kind == "data cache"
