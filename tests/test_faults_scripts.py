"""Faults in the scripts (issue #14): each bad input ends in one line ``nvembed: <kind> error: ...`` on stderr and exit
code 2, and nothing written before changes.

export.py refuses targets inside a run's weights, stage or checkpoint folders and foreign folders; evaluate.py checks
BEIR folders line by line; synthesize.py / fret.py stop quickly against an endpoint that is down (a real closed port,
a real local server that stops answering) and keep what succeeded for a resume; model folders run their own Python
code only with --trust-remote-code, while nvembed exports load without it through nvembed's own model code.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO

TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "x"]
INSTRUCTION = "Given a question, retrieve passages that answer it"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"nvembed_script_{name}", os.path.join(REPO, "scripts", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _snapshot(root) -> dict:
    """{relative path: sha1} of every file under ``root`` (what 'nothing changed' compares)."""
    root = Path(root)
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _fails(capsys, main, argv, *needles) -> str:
    """``main(argv)`` exits 2 with one error line holding every needle, and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("nvembed: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# one real (tiny) training run, shared
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 1-step smoke run: RUN/config.yaml, RUN/stage1/final (training weights), RUN/final (the trainer's export)."""
    from omegaconf import OmegaConf

    from nvembed.cli import run_from_hydra

    raw = OmegaConf.load(os.path.join(REPO, "recipes", "smoke.yaml"))
    raw.output_dir = str(tmp_path_factory.mktemp("faults") / "run")
    raw.stages = ["stage1"]
    raw.stage_defs.stage1.update(max_steps=1, save_every=1, datasets=["demo/medquad.yaml"])
    run_from_hydra(raw)
    return Path(raw.output_dir)


# ---------------------------------------------------------------------------------------------------------------
# 1. export.py --out
# ---------------------------------------------------------------------------------------------------------------
def test_export_refuses_training_and_foreign_folders(run, tmp_path, capsys):
    export = _script("export")
    before = _snapshot(run)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("mine")
    for out, why in ((run / "stage1" / "final", "is training weights"),
                     (run / "stage1", "is a training stage folder"),
                     (run / "stage1" / "final" / "exported", "which is training weights"),
                     (run, "not an nvembed export"),
                     (foreign, "not an nvembed export"),
                     (run / "final", "--overwrite")):  # an earlier export: replaced only when asked
        _fails(capsys, export.main, [run, "--out", out], "nvembed: export error:", f"--out {out}", why)
    assert _snapshot(run) == before and not (run / "stage1" / "final" / "exported").exists()
    assert _snapshot(foreign) == {"todo.txt": hashlib.sha1(b"mine").hexdigest()}
    _fails(capsys, export.main, [tmp_path / "nowhere", "--out", tmp_path / "x"], "no such folder")
    assert not (tmp_path / "x").exists()


def test_export_overwrite_then_nvembed_export_loads_without_trust(run, tmp_path):
    """--overwrite replaces the trainer's export (swapped in whole); the export then loads for evaluation without
    --trust-remote-code, through nvembed's own model code: a tampered copy of the folder's code never runs."""
    from nvembed.eval.encoders import CallableEncoder, load_encoder

    export = _script("export")
    stage = _snapshot(run / "stage1")
    assert export.main([str(run), "--out", str(run / "final"), "--overwrite"]) == 0
    assert _snapshot(run / "stage1") == stage
    assert not [p for p in os.listdir(run) if p.startswith(".final.")]  # no temporary folder left behind
    embedder, _ = export.load_embedder(str(run))
    ref_q, ref_d = embedder.encode(TEXTS, instruction=INSTRUCTION), embedder.encode(TEXTS)

    tampered = tmp_path / "tampered"
    shutil.copytree(run / "final", tampered)
    for name in ("configuration_nvembed.py", "modeling_nvembed.py", "st_nvembed.py"):
        (tampered / name).write_text("raise RuntimeError('the folder copy of the model code was executed')\n")
    enc = load_encoder(str(tampered))
    assert isinstance(enc, CallableEncoder)
    np.testing.assert_allclose(enc.encode(TEXTS, instruction=INSTRUCTION), ref_q, atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS), ref_d, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# 4. trust: a folder with its own code refuses without the flag, in every script that loads a model
# ---------------------------------------------------------------------------------------------------------------
def _custom_code_folder(run, tmp_path) -> tuple:
    """An nvembed export whose config.json maps AutoModel to the folder's own ``modeling_custom.py``; importing that
    file writes a marker (the proof that folder code ran)."""
    folder = tmp_path / "custom_model"
    shutil.copytree(run / "final", folder)
    marker = tmp_path / "custom_code_ran"
    code = (folder / "modeling_nvembed.py").read_text()
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + code)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"]["AutoModel"] = "modeling_custom.NVEmbedModel"
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, marker


def _beir(root: Path, corpus=None, queries=None, qrels=None) -> Path:
    corpus = corpus if corpus is not None else [
        {"_id": "d1", "title": "Paris", "text": "Paris is the capital of France."},
        {"_id": "d2", "text": "Cats purr when they are content."},
        {"_id": "d3", "text": "The Eiffel Tower was completed in 1889."}]
    queries = queries if queries is not None else [{"_id": "q1", "text": "capital of France"},
                                                   {"_id": "q2", "text": "why do cats purr"}]
    qrels = qrels if qrels is not None else ["q1\td1\t1", "q2\td2\t1"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    for name, rows in (("corpus.jsonl", corpus), ("queries.jsonl", queries)):
        (root / name).write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{r}\n" for r in qrels))
    return root


def test_custom_model_code_runs_only_with_trust_remote_code(run, tmp_path, capsys):
    folder, marker = _custom_code_folder(run, tmp_path)
    beir = _beir(tmp_path / "beir")
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(TEXTS) + "\n")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"query": TEXTS[0], "positive": TEXTS[1]}) + "\n")
    needles = ("nvembed: model error:", str(folder), "modeling_custom.NVEmbedModel", "--trust-remote-code")
    _fails(capsys, _script("evaluate").main, [folder, "--beir", beir], *needles)
    _fails(capsys, _script("fret").main, ["--passages", passages, "--embedder", folder, "--backend", "openai",
                                          "--model", "m", "--out", tmp_path / "fret"], *needles)
    _fails(capsys, _script("mine_hard_negatives").main, ["--teacher", folder, "--input", tmp_path / "pairs.jsonl",
                                                         "--out", tmp_path / "mined.jsonl"], *needles)
    assert not marker.exists() and not (tmp_path / "fret").exists() and not (tmp_path / "mined.jsonl").exists()
    # the flag is what lets the folder's code run
    assert _script("evaluate").main([str(folder), "--beir", str(beir), "--trust-remote-code"]) == 0
    assert marker.exists()
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["num_queries"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 2. evaluate.py: BEIR folders checked line by line
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["missing_doc", "empty_queries", "bad_json", "no_id", "no_text", "no_judged_query",
                                  "short_qrels_line"])
def test_evaluate_bad_beir_folder(case, tmp_path, capsys):
    evaluate = _script("evaluate")
    kw, needles = {}, ()
    if case == "missing_doc":
        kw["qrels"] = ["q1\td1\t1", "q2\td9\t1"]
        needles = ("qrels/test.tsv:3:", "corpus-id 'd9'", "--allow-missing-docs")
    elif case == "empty_queries":
        kw["queries"] = []
        needles = ("queries.jsonl: no queries",)
    elif case == "bad_json":
        kw["corpus"] = [{"_id": "d1", "text": "a"}, '{"_id": "d2", "text": ']
        needles = ("corpus.jsonl:2: malformed JSON",)
    elif case == "no_id":
        kw["corpus"] = [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"text": "c"}]
        needles = ("corpus.jsonl:3: field '_id' missing",)
    elif case == "no_text":
        kw["corpus"] = [{"_id": "d1", "title": "only a title"}]
        needles = ("corpus.jsonl:1: field 'text' missing",)
    elif case == "no_judged_query":
        kw["qrels"] = []
        needles = ("no query of", "queries.jsonl has a judgment")
    else:
        kw["qrels"] = ["q1\td1"]
        needles = ("qrels/test.tsv:2: expected 3 tab-separated columns",)
    beir = _beir(tmp_path / "beir", **kw)
    before = _snapshot(beir)
    _fails(capsys, evaluate.main, ["bm25", "--beir", beir], "nvembed: data error:", str(beir), *needles)
    assert _snapshot(beir) == before


def test_evaluate_allow_missing_docs_counts_and_drops(tmp_path, capsys):
    beir = _beir(tmp_path / "beir", qrels=["q1\td1\t1", "q2\td2\t1", "q2\td9\t1"])
    assert _script("evaluate").main(["bm25", "--beir", str(beir), "--allow-missing-docs"]) == 0
    cap = capsys.readouterr()
    assert "dropped 1 judgment(s)" in cap.err and "d9" in cap.err
    res = json.loads(cap.out.strip().splitlines()[-1])
    assert res["num_queries"] == 2 and res["ndcg@10"] == pytest.approx(1.0)  # d9 no longer counts against q2


def test_evaluate_bad_suite_keeps_previous_table(tmp_path, capsys):
    beir = _beir(tmp_path / "beir", qrels=["q1\td1\t1", "q2\td7\t1"])
    table = tmp_path / "results.md"
    table.write_text("| previous results |\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: s\ntasks:\n  - {{name: ok, type: retrieval, path: {beir}}}\n"
                     f"  - {{name: gone, type: retrieval, path: {tmp_path / 'absent'}}}\n")
    evaluate = _script("evaluate")
    _fails(capsys, evaluate.main, ["bm25", "--suite", suite, "--table", table], "nvembed: suite error:",
           f"{suite}:4:", "task 'gone'", "field 'path'", "not found")
    suite.write_text(f"name: s\ntasks:\n  - {{name: ok, type: retrieval, path: {beir}}}\n")
    _fails(capsys, evaluate.main, ["bm25", "--suite", suite, "--table", table], "nvembed: data error:",
           "qrels/test.tsv:3:", "'d7'")
    assert table.read_text() == "| previous results |\n"


# ---------------------------------------------------------------------------------------------------------------
# 3. synthesize.py / fret.py against an endpoint that is down
# ---------------------------------------------------------------------------------------------------------------
class TinyServer:
    """An OpenAI-style HTTP server on 127.0.0.1 in a thread: answers ``limit`` requests (None: until closed) with
    ``status`` and a chat reply, then closes its listening socket, so the next connection is refused."""

    def __init__(self, limit=None, status=200):
        self.limit, self.status, self.count = limit, status, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @staticmethod
    def reply(body) -> dict:
        h = hashlib.md5(body["messages"][-1]["content"].encode()).hexdigest()[:8]  # one distinct triple per prompt
        text = json.dumps({"S1": f"sentence {h}", "S2": f"paraphrase {h}", "S3": f"other {h}"})
        return {"choices": [{"message": {"role": "assistant", "content": text}}]}

    def _serve(self):
        while not self.stopped.is_set() and (self.limit is None or self.count < self.limit):
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            with conn:
                conn.settimeout(10)
                data = chunk = b"-"
                while b"\r\n\r\n" not in data and chunk:
                    chunk = conn.recv(65536)
                    data += chunk
                head, _, body = data[1:].partition(b"\r\n\r\n")
                m = re.search(rb"content-length:\s*(\d+)", head, re.I)
                while m and chunk and len(body) < int(m.group(1)):
                    chunk = conn.recv(65536)
                    body += chunk
                if not m:  # the client went away mid-request
                    continue
                self.count += 1
                if self.limit is not None and self.count >= self.limit:
                    self.sock.close()  # before answering: the client's next connection is refused
                payload = json.dumps(self.reply(json.loads(body)) if self.status == 200 else {"error": "down"}).encode()
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n" % (self.status, len(payload)) + payload)
        self.sock.close()

    def close(self):
        self.stopped.set()
        self.thread.join(5)


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _synth_args(url, out, n=5, retries=3):
    return ["--backend", "openai", "--model", "fake", "--base-url", url, "--api-key-env", "NO_SUCH_KEY_SET",
            "--types", "sts", "--num-tasks", str(n), "--chunk-size", "2", "--concurrency", "1",
            "--max-retries", str(retries), "--out", str(out), "--no-progress"]


def test_synthesize_closed_port_fails_fast(tmp_path, capsys):
    port = _closed_port()
    t0 = time.perf_counter()
    _fails(capsys, _script("synthesize").main, _synth_args(f"http://127.0.0.1:{port}/v1", tmp_path / "out"),
           "nvembed: endpoint error:", f"http://127.0.0.1:{port}/v1/chat/completions", "Connection refused")
    assert time.perf_counter() - t0 < 15  # was 6 retries x ~51 s per item
    assert not (tmp_path / "out" / "examples.jsonl").read_text()


def test_synthesize_server_stops_midway_then_resumes(tmp_path, capsys):
    synthesize = _script("synthesize")
    out = tmp_path / "out"
    srv = TinyServer(limit=3)
    try:
        _fails(capsys, synthesize.main, _synth_args(srv.url, out), "nvembed: endpoint error:", srv.url,
               "Connection refused", "re-run the same command to resume")
    finally:
        srv.close()
    rows = [json.loads(x) for x in (out / "examples.jsonl").read_text().splitlines()]
    assert len(rows) == 3  # the 3 answered requests are kept, the 3rd from an interrupted chunk too
    kept = (out / "examples.jsonl").read_text()
    srv = TinyServer()
    try:
        assert synthesize.main(_synth_args(srv.url, out)) == 0
    finally:
        srv.close()
    assert srv.count == 2  # only the remaining items were asked for
    text = (out / "examples.jsonl").read_text()
    assert text.startswith(kept) and len(text.splitlines()) == 5
    assert json.loads((out / "stats.json").read_text())["complete"]


def test_synthesize_every_request_failing_exits_2(tmp_path, capsys):
    srv = TinyServer(status=500)
    try:
        _fails(capsys, _script("synthesize").main, _synth_args(srv.url, tmp_path / "out", n=2, retries=0),
               "nvembed: llm error:", srv.url, "all 2 request(s) of this run failed", "HTTP 500")
    finally:
        srv.close()


def test_fret_closed_port_fails_fast(run, tmp_path, capsys):
    passages = tmp_path / "passages.txt"
    passages.write_text("\n".join(TEXTS) + "\n")
    port = _closed_port()
    _fails(capsys, _script("fret").main, ["--passages", passages, "--embedder", run / "final", "--backend", "openai",
                                          "--model", "fake", "--base-url", f"http://127.0.0.1:{port}/v1",
                                          "--api-key-env", "NO_SUCH_KEY_SET", "--max-retries", "3",
                                          "--concurrency", "1", "--out", tmp_path / "fret", "--no-progress"],
           "nvembed: endpoint error:", f"127.0.0.1:{port}", "Connection refused")
