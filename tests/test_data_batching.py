"""Task conversions and batch composition on small files, plus the shipped demo specs."""

import collections
from pathlib import Path

import pytest

from nvembed.data import Example, build_stage_data

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda m: None)


def jsonl(tmp_path, name, rows):
    import json
    (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def spec(tmp_path, name, body):
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"name: {name}\n" + body, encoding="utf-8")
    return str(p)


@pytest.fixture
def retr(tmp_path):
    rows = [{"q": f"query {i}", "p": [f"pos {i}a", f"pos {i}b"], "n": [f"neg {i}"] if i % 2 else []}
            for i in range(40)]
    jsonl(tmp_path, "r.jsonl", rows)
    return spec(tmp_path, "retr", "task: retrieval\ninstruction: Given a query, retrieve its passage\n"
                "source: {path: r.jsonl}\nfields: {query: q, positive: p, negatives: n}\n")


@pytest.fixture
def cls(tmp_path):
    rows = [{"t": f"text {i}", "y": f"class_{i % 4}"} for i in range(40)]
    jsonl(tmp_path, "c.jsonl", rows)
    bins = [{"t": f"review {i}", "y": i % 2} for i in range(20)]
    jsonl(tmp_path, "b.jsonl", bins)
    body = "instruction: Classify the text\nsource: {{path: {f}}}\nfields: {{text: t, label: y}}\n"
    return {
        "example": spec(tmp_path, "cex", "task: classification\nlabel_mode: example\n" + body.format(f="c.jsonl")),
        "label": spec(tmp_path, "clab", "task: classification\nlabel_mode: label\nlabel_texts: {class_0: zero}\n"
                      + body.format(f="c.jsonl")),
        "binary": spec(tmp_path, "cbin", "task: classification\nlabel_texts: {0: negative, 1: positive}\n"
                       + body.format(f="b.jsonl")),
        "cluster": spec(tmp_path, "clu", "task: clustering\n" + body.format(f="c.jsonl")),
    }


def all_examples(data, steps=None):
    return [e for s in range(steps or data.steps_per_epoch) for e in data.batch(s)]


def test_retrieval_examples(retr):
    data = build_stage_data([retr], num_hard_negatives=3, batch_size=4, **QUIET)
    exs = all_examples(data)
    assert data.steps_per_epoch == 10 and len(exs) == 40 and len({e.query for e in exs}) == 40
    for e in exs:
        i = e.query.split()[1]
        assert isinstance(e, Example) and e.positive in (f"pos {i}a", f"pos {i}b")
        assert len(e.negatives) == 3 and e.positive not in e.negatives
        assert e.instruction == "Given a query, retrieve its passage" and not e.symmetric and e.dataset == "retr"
        if int(i) % 2:
            assert f"neg {i}" in e.negatives  # own hard negative kept, the rest filled
    assert data.stats["retr"]["negatives_filled"] == 20 * 3 + 20 * 2


def test_sts_threshold_and_symmetry(tmp_path):
    jsonl(tmp_path, "s.jsonl", [{"a": f"a{i}", "b": f"b{i}", "s": 4.0 if i < 5 else 3.9} for i in range(10)])
    s = spec(tmp_path, "sts", "task: sts\ninstruction: Retrieve semantically similar text\n"
             "source: {path: s.jsonl}\nfields: {text1: a, text2: b, score: s}\nmin_score: 4\n")
    data = build_stage_data([s], num_hard_negatives=2, batch_size=5, **QUIET)
    exs = all_examples(data)
    assert len(exs) == 10 and data.stats["sts"]["filtered"] == {"score < 4": 5}
    pairs = {(e.query, e.positive) for e in exs}
    assert pairs == {(f"a{i}", f"b{i}") for i in range(5)} | {(f"b{i}", f"a{i}") for i in range(5)}
    assert all(e.symmetric and len(e.negatives) == 2 and e.positive not in e.negatives for e in exs)


def test_classification_example_vs_label(cls):
    ex = all_examples(build_stage_data([cls["example"]], num_hard_negatives=3, batch_size=8, **QUIET))
    label = {f"text {i}": i % 4 for i in range(40)}
    for e in ex:
        assert e.positive in label and e.positive != e.query and label[e.positive] == label[e.query]
        assert all(label[n] != label[e.query] for n in e.negatives) and len(e.negatives) == 3
    lab = all_examples(build_stage_data([cls["label"]], num_hard_negatives=3, batch_size=8, **QUIET))
    texts = {"zero", "class 1", "class 2", "class 3"}
    for e in lab:
        want = "zero" if label[e.query] == 0 else f"class {label[e.query]}"
        assert e.positive == want and set(e.negatives) == texts - {want}


def test_binary_uses_label_texts_and_clustering_is_example_based(cls):
    data = build_stage_data([cls["binary"]], num_hard_negatives=2, batch_size=4, **QUIET)
    for e in all_examples(data):
        want = "positive" if int(e.query.split()[1]) % 2 else "negative"
        other = ({"positive", "negative"} - {want}).pop()
        assert e.positive == want and e.negatives == [other, other]
    assert data.stats["cbin"]["negatives_filled"] > 0
    for e in all_examples(build_stage_data([cls["cluster"]], batch_size=8, **QUIET)):
        assert e.positive.startswith("text ") and e.positive != e.query


def test_homogeneous_vs_blended_and_weights(retr, cls, tmp_path):
    specs = [retr, cls["example"]]
    homo = build_stage_data(specs, batch_size=4, batching="homogeneous", **QUIET)
    for s in range(40):
        assert len({e.dataset for e in homo.batch(s)}) == 1
    # weight 3:1 -> 75% of slots over many batches
    w = Path(cls["example"]).read_text() + "weight: 3\n"
    Path(cls["example"]).write_text(w)
    for mode in ("homogeneous", "blended"):
        data = build_stage_data(specs, batch_size=4, batching=mode, **QUIET)
        counts = collections.Counter(e.dataset for s in range(200) for e in data.batch(s))
        assert abs(counts["cex"] / sum(counts.values()) - 0.75) < 0.05, (mode, counts)
    blended = build_stage_data(specs, batch_size=8, batching="blended", **QUIET)
    assert any(len({e.dataset for e in blended.batch(s)}) == 2 for s in range(10))


def key(e):
    return (e.dataset, e.query, e.positive if e.symmetric else "")


def test_sharding_determinism_resume(retr, tmp_path):
    kw = dict(batch_size=4, num_hard_negatives=2, seed=7, **QUIET)
    a = build_stage_data([retr], process_index=0, num_processes=2, **kw)
    b = build_stage_data([retr], process_index=1, num_processes=2, **kw)
    assert a.steps_per_epoch == 5
    seen = []
    for s in range(a.steps_per_epoch):
        qa, qb = {e.query for e in a.batch(s)}, {e.query for e in b.batch(s)}
        assert len(qa) == 4 and len(qb) == 4 and not qa & qb
        seen += list(qa | qb)
    assert len(set(seen)) == 40  # one epoch = one pass, no duplicates across shards
    fresh = build_stage_data([retr], process_index=0, num_processes=2, **kw)
    for s in (0, 3, 7, 12):  # resume: any step rebuilds identically, also past the first epoch
        assert fresh.batch(s) == a.batch(s)
    assert [e.query for e in a.batch(0)] != [e.query for e in a.batch(5)]  # new epoch, new permutation
    other = build_stage_data([retr], process_index=0, num_processes=2, **{**kw, "seed": 8})
    assert [e.query for e in other.batch(0)] != [e.query for e in a.batch(0)]
    epoch2 = {e.query for s in range(5, 10) for d in (a, b) for e in d.batch(s)}
    assert len(epoch2) == 40


def test_demo_specs_produce_batches():
    demo = ROOT / "data_specs" / "demo"
    s1 = build_stage_data(["demo/medquad.yaml", "demo/qnli.yaml"], stage="stage1", num_hard_negatives=2,
                          batch_size=4, specs_root=ROOT / "data_specs", **QUIET)
    b = s1.batch(0)
    assert len(b) == 4 and all(len(e.negatives) == 2 and e.instruction for e in b)
    stage2 = [str(p) for p in sorted(demo.glob("*.yaml"))]
    s2 = build_stage_data(stage2, stage="stage2", num_hard_negatives=3, batch_size=16, batching="blended", **QUIET)
    got = collections.Counter(e.dataset for s in range(20) for e in s2.batch(s))
    assert len(got) == len(stage2) and all(len(e.negatives) == 3 for e in s2.batch(1))
    st = s2.stats
    assert st["medquad"]["rows_read"] > 1000 and st["stsb"]["filtered"]["score < 4"] > 0
    assert all(v["rows_skipped"] == 0 for v in st.values())


def test_hf_dataset_folder_with_nested_columns(tmp_path):
    import datasets
    rows = {"query": [f"q{i}" for i in range(12)],
            "positive_passages": [[{"docid": str(i), "text": f"doc {i}"}] for i in range(12)],
            "negative_passages": [[{"docid": f"n{i}", "text": f"hard {i}"}] for i in range(12)]}
    rows["query"][5] = ""  # a bad row: skipped and counted, never dropped silently
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "hfdata"))
    s = spec(tmp_path, "tev", "task: retrieval\ninstruction: Find passages\non_error: skip\nsource: {hf: hfdata}\n"
             "fields: {query: query, positive: positive_passages.text, negatives: negative_passages.text}\n")
    data = build_stage_data([s], num_hard_negatives=1, batch_size=11, **QUIET)
    exs = data.batch(0)
    assert data.stats["tev"]["rows_skipped"] == 1 and data.stats["tev"]["rows_read"] == 12
    assert all(e.positive == f"doc {e.query[1:]}" and e.negatives == [f"hard {e.query[1:]}"] for e in exs)
    assert len({e.query for e in exs}) == 11
