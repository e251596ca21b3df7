"""NV-Embed drop-in.

1. ``encode(texts, instruction=...)`` takes NV-Embed's whole prefix (``"Instruct: {task}\\nQuery: "``, used as given) or
   a bare task (wrapped): the same embeddings, in the Embedder, the exported AutoModel and the sentence-transformers
   module; ``max_length`` bounds the whole row as NV-Embed's does.
2. ``model.name_or_path`` = a folder in NV-Embed's published layout (config.json with ``text_config`` /
   ``latent_attention_config``, sharded safetensors with ``embedding_model.*`` / ``latent_attention_model.*`` keys)
   starts training from its decoder and its latent-attention head: the loaded model's embeddings equal NV-Embed's
   forward written out here from the paper / model-code description, a few training steps run, and the export loads
   where nvembed is not installed. Keys or shapes that do not fit fail with the file and the key.
"""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from conftest import REPO, TINY, TINY_TOKENIZER
from nvembed.config import LoraConfig, ModelConfig, PoolingConfig
from nvembed.model import build_embedder
from nvembed.model.inputs import build_prompt, is_full_prompt
from nvembed.model.nvembed_layout import CheckpointLayoutError

TASK = "Given a question, retrieve passages that answer the question"
PREFIX = f"Instruct: {TASK}\nQuery: "  # what code written for NV-Embed passes as `instruction`
TEXTS = ["are judo throws allowed in wrestling?", "how to become a radiology technician in michigan?", "x",
         "A much longer passage, with punctuation; numbers 12345 and enough words to be the longest text here."]
HEAD = dict(num_latents_value=8, num_cross_heads=2, hidden_dim=32, latent_dim=32, cross_dim_head=16)
ATOL = 1e-5


# ---- a tiny checkpoint in NV-Embed's layout ----------------------------------------------------------------------
def write_nvembed_checkpoint(folder, seed=0):
    """config.json as NV-Embed-v2's (bidir_mistral text_config, latent_attention_config), weights in two shards with
    an index, tokenizer files beside them; every head weight random and non-trivial."""
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    text = {k: v for k, v in TINY["mistral"].items() if k != "model_type"}
    decoder = MistralModel(MistralConfig(vocab_size=1024, **text))
    d, r, h, dh = HEAD["hidden_dim"], HEAD["num_latents_value"], HEAD["num_cross_heads"], HEAD["cross_dim_head"]
    g = torch.Generator().manual_seed(seed + 1)

    def rnd(*shape, scale=0.3, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    p = "latent_attention_model."
    head = {p + "latents": rnd(r, d, scale=1.0),
            p + "cross_attend_blocks.0.norm.weight": rnd(d, scale=0.1, base=1.0),
            p + "cross_attend_blocks.0.norm.bias": rnd(d, scale=0.1),
            p + "cross_attend_blocks.0.norm_context.weight": rnd(d, scale=0.1, base=1.0),
            p + "cross_attend_blocks.0.norm_context.bias": rnd(d, scale=0.1),
            p + "cross_attend_blocks.0.fn.to_q.weight": rnd(h * dh, d),
            p + "cross_attend_blocks.0.fn.to_kv.weight": rnd(2 * h * dh, d),
            p + "cross_attend_blocks.0.fn.to_out.weight": rnd(d, h * dh),
            p + "cross_attend_blocks.1.norm.weight": rnd(d, scale=0.1, base=1.0),
            p + "cross_attend_blocks.1.norm.bias": rnd(d, scale=0.1),
            p + "cross_attend_blocks.1.fn.net.0.weight": rnd(8 * d, d),
            p + "cross_attend_blocks.1.fn.net.0.bias": rnd(8 * d, scale=0.1),
            p + "cross_attend_blocks.1.fn.net.2.weight": rnd(d, 4 * d, scale=0.1),
            p + "cross_attend_blocks.1.fn.net.2.bias": rnd(d, scale=0.1)}
    state = {f"embedding_model.{k}": v.contiguous() for k, v in decoder.state_dict().items()}
    state.update(head)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, os.path.join(folder, fname), metadata={"format": "pt"})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)
    # as NV-Embed-v2's: written by transformers 4.42 (legacy generation keys), Mistral's sliding window set (which
    # their bidirectional decoder never applies: a window of 8 here would change every longer text)
    legacy = {"torch_dtype": "float32", "max_length": 20, "num_beams": 1, "temperature": 1.0, "use_bfloat16": False,
              "add_cross_attention": False, "bad_words_ids": None, "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
              "rope_theta": 10000.0, "transformers_version": "4.42.4"}
    text_config = {**decoder.config.to_dict(), **legacy, "sliding_window": 8, "model_type": "bidir_mistral",
                   "_name_or_path": "nvidia/NV-Embed-v2", "architectures": ["MistralModel"]}
    config = {"model_type": "nvembed", "architectures": ["NVEmbedModel"], "add_eos": True, "add_pad_token": True,
              "is_mask_instruction": True, "mask_type": "b", "padding_side": "right", "hidden_size": d,
              "auto_map": {"AutoConfig": "configuration_nvembed.NVEmbedConfig",
                           "AutoModel": "modeling_nvembed.NVEmbedModel"},
              "latent_attention_config": {"model_type": "latent_attention", "output_normalize": True, **HEAD},
              "text_config": text_config, "torch_dtype": "float32"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    AutoTokenizer.from_pretrained(TINY_TOKENIZER).save_pretrained(folder)
    return folder


def nvembed_reference(folder, texts, instruction="", max_length=4096):
    """NV-Embed's ``encode`` written out from its description (papers.md 1.3), on the raw tensors of ``folder``:
    tokenizer(instruction + text + eos, max_length), right padding with EOS, the first len(tokenize(instruction))
    positions left out of pooling; a stock transformers Mistral decoder with a padding-only (bidirectional) mask;
    token states cross-attend to the latents (pre-norm on both, K/V from the latents, per-head softmax), residual;
    pre-norm GEGLU feed-forward, residual; masked mean; L2 normalisation."""
    from transformers import AutoTokenizer, MistralConfig, MistralModel

    config = json.load(open(os.path.join(folder, "config.json")))
    drop = ("model_type", "architectures", "_name_or_path", "sliding_window")  # their mask ignores the window
    text = {k: v for k, v in config["text_config"].items() if k not in drop}
    tok = AutoTokenizer.from_pretrained(folder, config=MistralConfig(**text))  # config.json is not the decoder's
    tok.pad_token, tok.padding_side = tok.eos_token, "right"
    batch = tok([instruction + t + tok.eos_token for t in texts], max_length=max_length, padding=True,
                truncation=True, return_tensors="pt")
    pool = batch["attention_mask"].clone()
    if instruction:
        pool[:, :len(tok.tokenize(instruction))] = 0
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))["weight_map"]
    w = {}
    for fname in set(index.values()):
        w.update(load_file(os.path.join(folder, fname)))
    decoder = MistralModel(MistralConfig(**text)).eval()
    decoder.load_state_dict({k[len("embedding_model."):]: v for k, v in w.items() if k.startswith("embedding_model.")})
    att = batch["attention_mask"].bool()
    mask = torch.zeros(att.shape[0], 1, att.shape[1], att.shape[1])
    mask.masked_fill_(~att[:, None, None, :], torch.finfo(torch.float32).min)  # padding keys only: no causal part
    with torch.no_grad():
        hid = decoder(input_ids=batch["input_ids"], attention_mask=mask).last_hidden_state
    p = "latent_attention_model.cross_attend_blocks."
    head_cfg = config["latent_attention_config"]
    heads, dh = head_cfg["num_cross_heads"], head_cfg["cross_dim_head"]
    d = hid.shape[-1]
    x = F.layer_norm(hid, (d,), w[p + "0.norm.weight"], w[p + "0.norm.bias"])
    lat = w["latent_attention_model.latents"]
    lat = F.layer_norm(lat, (lat.shape[-1],), w[p + "0.norm_context.weight"], w[p + "0.norm_context.bias"])
    q = (x @ w[p + "0.fn.to_q.weight"].T).unflatten(-1, (heads, dh)).transpose(1, 2)  # [B, h, L, dh]
    k, v = (lat @ w[p + "0.fn.to_kv.weight"].T).chunk(2, dim=-1)
    k, v = (t.unflatten(-1, (heads, dh)).transpose(0, 1) for t in (k, v))  # [h, r, dh]
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v  # [B, h, L, dh]
    hid = attn.transpose(1, 2).flatten(2) @ w[p + "0.fn.to_out.weight"].T + hid
    y = F.layer_norm(hid, (d,), w[p + "1.norm.weight"], w[p + "1.norm.bias"])
    a, gate = (y @ w[p + "1.fn.net.0.weight"].T + w[p + "1.fn.net.0.bias"]).chunk(2, dim=-1)
    hid = (a * F.gelu(gate)) @ w[p + "1.fn.net.2.weight"].T + w[p + "1.fn.net.2.bias"] + hid
    m = pool.unsqueeze(-1).float()
    emb = (hid * m).sum(1) / m.sum(1)
    return F.normalize(emb, dim=-1).numpy(), batch["input_ids"], pool


def model_cfg(folder, **pooling):
    head = {"num_latents": 8, "num_heads": 2, "head_dim": 16, **pooling}
    return ModelConfig(name_or_path=folder, pooling=PoolingConfig(**head),
                       lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_nvembed_checkpoint(str(tmp_path_factory.mktemp("nvembed") / "NV-Embed-tiny"))


@pytest.fixture(scope="module")
def embedder(ckpt):
    return build_embedder(model_cfg(ckpt), seed=0).eval()


def test_nvembed_checkpoint_is_not_taken_for_an_export(ckpt, tmp_path):
    """A published NV-Embed checkpoint has an export's model_type and auto_map; is_export (used by load_encoder,
    check_export_dir and scripts/export.py) must still tell them apart, by its latent_attention_config."""
    from nvembed.eval.encoders import is_nvembed_export
    from nvembed.export import AUTO_MAP, ExportError, check_export_dir, is_export
    from nvembed.model.nvembed_layout import is_nvembed_checkpoint

    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    assert cfg["model_type"] == "nvembed" and is_nvembed_checkpoint(ckpt)
    assert not is_export(ckpt) and not is_nvembed_export(ckpt)
    with pytest.raises(ExportError, match="not an nvembed export"):  # --overwrite cannot replace a downloaded model
        check_export_dir(ckpt, overwrite=True)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "nvembed", "auto_map": AUTO_MAP}))
    assert is_export(str(export)) and is_nvembed_export(export)
    (export / "config.json").write_text(json.dumps({"model_type": "nvembed", "auto_map": {"AutoModel": "x.Y"}}))
    assert not is_export(str(export))


# ---- 1. the instruction convention ---------------------------------------------------------------------------------
def test_full_prefix_or_bare_task_same_rule_everywhere():
    template = "Instruct: {instruction}\nQuery: "
    cases = {TASK: False, PREFIX: True, f"Instruct: {TASK}\nQuery:": True, f"  {PREFIX}": True,
             "Instruct me how to cook rice": False, "Query: what?": False, f"Instruct: {TASK}": False}
    for text, full in cases.items():
        assert is_full_prompt(text, template) is full, text
        assert build_prompt(text, template) == (text if full else template.format(instruction=text))
    assert build_prompt(TASK, template) == build_prompt(PREFIX, template) == PREFIX
    assert build_prompt("", template) == build_prompt(None, template) == ""
    # a template without a recognisable frame never mistakes a task for a prefix
    assert build_prompt(TASK, "{instruction}: ") == TASK + ": "


def test_embedder_full_prefix_equals_bare_task_and_max_length(ckpt, embedder):
    bare = embedder.encode(TEXTS, instruction=TASK)
    np.testing.assert_array_equal(embedder.encode(TEXTS, instruction=PREFIX), bare)
    assert np.abs(bare - embedder.encode(TEXTS)).max() > 1e-3  # the instruction does change the query
    # max_length bounds BOS + prefix + text + EOS, like NV-Embed's tokenizer(instruction + text + eos, max_length);
    # NV-Embed's call cuts the appended EOS off a long row, nvembed keeps it last (as in training)
    n = 40
    feats = embedder.features(TEXTS, [PREFIX] * len(TEXTS), max_length=n)
    assert torch.equal(feats["input_ids"], embedder.features(TEXTS, [TASK] * len(TEXTS), max_length=n)["input_ids"])
    _, theirs, _ = nvembed_reference(ckpt, TEXTS, PREFIX, max_length=n)
    eos = embedder.tokenizer.eos_token_id
    assert theirs.shape[1] == feats["input_ids"].shape[1] == n
    longest = int(np.argmax([len(t) for t in TEXTS]))
    assert feats["attention_mask"][longest].sum() == n
    assert feats["input_ids"][longest, :-1].tolist() == theirs[longest, :-1].tolist()
    assert feats["input_ids"][longest, -1] == eos != theirs[longest, -1]
    np.testing.assert_array_equal(embedder.encode(TEXTS, PREFIX, max_length=n),
                                  embedder.encode(TEXTS, TASK, max_length=n))


# ---- 2. NV-Embed's layout as a starting point ----------------------------------------------------------------------
def test_loaded_checkpoint_equals_nvembed_forward(ckpt, embedder):
    from nvembed.model.nvembed_layout import HEAD_KEYS, HEAD_PREFIX, read_checkpoint

    ck = read_checkpoint(ckpt)
    assert ck.text_config["model_type"] == "mistral" and len(set(ck.files.values())) == 2
    own = embedder.model.latent_attention_model.state_dict()
    raw = ck.tensors([HEAD_PREFIX + k for k in HEAD_KEYS])
    for theirs, ours in HEAD_KEYS.items():  # the key map, weight by weight
        assert torch.equal(own[ours], raw[HEAD_PREFIX + theirs]), (theirs, ours)
    assert not any(p.requires_grad for n, p in embedder.named_parameters() if "base_layer" in n)
    assert all(p.requires_grad for p in embedder.model.latent_attention_model.parameters())
    docs, _, _ = nvembed_reference(ckpt, TEXTS)
    np.testing.assert_allclose(embedder.encode(TEXTS), docs, atol=ATOL)
    # queries as NV-Embed code sends them, and as a bare task
    ref, ids, their_pool = nvembed_reference(ckpt, TEXTS, PREFIX)
    ours = embedder.features(TEXTS, [PREFIX] * len(TEXTS))
    assert torch.equal(ours["input_ids"], ids)
    same = [i for i in range(len(TEXTS)) if torch.equal(ours["pool_mask"][i], their_pool[i])]
    # NV-Embed masks the first len(tokenize(prefix)) positions, a count without BOS that includes the prefix's
    # trailing space token: right when that space merges into the first word ("Ġhow"), which is the usual case, one
    # token short when it does not ("x" here: NV-Embed then pools the lone "Ġ"). nvembed leaves every prefix token out.
    assert same == [0, 1, 3]
    assert (their_pool[2] - ours["pool_mask"][2]).abs().sum() == 1
    for got in (embedder.encode(TEXTS, instruction=PREFIX), embedder.encode(TEXTS, instruction=TASK)):
        np.testing.assert_allclose(got[same], ref[same], atol=ATOL)
    # the head is not a pass-through: plain mean pooling of the same decoder gives other vectors
    mean = build_embedder(model_cfg(ckpt, mode="mean"), seed=0).encode(TEXTS)
    assert np.abs(mean - docs).max() > 1e-2


def test_weight_listing_read_once_per_start(ckpt, tmp_path):
    """One start (tokenizer, decoder checks and load, head) lists the shards' keys and shapes once; a folder whose
    files changed is listed again."""
    from nvembed.model import nvembed_layout

    nvembed_layout._read_checkpoint.cache_clear()
    build_embedder(model_cfg(ckpt), seed=0)
    info = nvembed_layout._read_checkpoint.cache_info()
    assert info.misses == 1 and info.hits >= 3, info
    copy = str(tmp_path / "copy")
    shutil.copytree(ckpt, copy)
    assert nvembed_layout.read_checkpoint(copy).head["num_cross_heads"] == 2
    c = json.load(open(os.path.join(copy, "config.json")))
    c["latent_attention_config"]["num_cross_heads"] = 4
    json.dump(c, open(os.path.join(copy, "config.json"), "w"), indent=4)  # rewritten: a new mtime
    assert nvembed_layout.read_checkpoint(copy).head["num_cross_heads"] == 4


def _broken_copy(src, dst, edit_weights=None, edit_config=None, reindex=True):
    shutil.copytree(src, dst)
    if edit_config:
        path = os.path.join(dst, "config.json")
        c = json.load(open(path))
        edit_config(c)
        json.dump(c, open(path, "w"))
    if edit_weights:
        index_path = os.path.join(dst, "model.safetensors.index.json")
        index = json.load(open(index_path))
        for fname in set(index["weight_map"].values()):
            state = load_file(os.path.join(dst, fname))
            edit_weights(state)
            save_file(state, os.path.join(dst, fname))
            if reindex:
                index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != fname or k in state}
        json.dump(index, open(index_path, "w"))
    return dst


def test_keys_or_shapes_that_do_not_fit_name_file_and_key(ckpt, tmp_path, capsys):
    from nvembed.errors import cli

    q = "latent_attention_model.cross_attend_blocks.0.fn.to_q.weight"
    with pytest.raises(CheckpointLayoutError, match=r"model-0000\d-of-00002\.safetensors: weight "
                       r"'latent_attention_model\.latents' has shape \[8, 32\], but model\.pooling builds \[4, 32\]"
                       r".*set model\.pooling: num_latents=8, num_heads=2, head_dim=16"):
        build_embedder(model_cfg(ckpt, num_latents=4))
    with pytest.raises(CheckpointLayoutError, match=r"num_cross_heads=2 but model.pooling.num_heads=4"):
        build_embedder(model_cfg(ckpt, num_heads=4, head_dim=8))  # same widths, other head split
    missing = _broken_copy(ckpt, str(tmp_path / "missing"), edit_weights=lambda s: s.pop(q, None))
    with pytest.raises(CheckpointLayoutError, match=rf"missing weight '{q}'"):
        build_embedder(model_cfg(missing))
    stale = _broken_copy(ckpt, str(tmp_path / "stale"), edit_weights=lambda s: s.pop(q, None), reindex=False)
    with pytest.raises(CheckpointLayoutError, match=rf"index\.json: puts weight '{q}' in model-0000\d-of-00002"):
        build_embedder(model_cfg(stale))
    wide = _broken_copy(ckpt, str(tmp_path / "wide"),
                        edit_config=lambda c: c["text_config"].update(intermediate_size=96))
    with pytest.raises(CheckpointLayoutError, match=r"safetensors: weight 'embedding_model\.layers\.0\.mlp\.\w+_proj"
                                                    r"\.weight' has shape \[\d+, \d+\], but text_config in .*config"
                                                    r"\.json builds"):
        build_embedder(model_cfg(wide))
    # one line through the CLI error path, exit code 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(lambda: build_embedder(model_cfg(missing)))()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("nvembed: checkpoint error: ") and q in err[0]
    with pytest.raises(CheckpointLayoutError, match="model.name_or_path="):
        build_embedder(ModelConfig(random_init=dict(TINY["mistral"]), tokenizer=TINY_TOKENIZER,
                                   pooling=PoolingConfig(num_latents=8, num_heads=2, head_dim=16))).load_weights(ckpt)


@pytest.fixture(scope="module")
def trained(ckpt, tmp_path_factory):
    """A few stage-1 steps from the NV-Embed checkpoint (smoke data), exported."""
    from omegaconf import OmegaConf

    from nvembed.cli import finalize
    from nvembed.config import validate
    from nvembed.training.trainer import Trainer

    raw = OmegaConf.to_container(OmegaConf.load(os.path.join(REPO, "recipes", "smoke.yaml")))
    raw["model"] = {"name_or_path": ckpt, "pooling": {"num_latents": 8, "num_heads": 2, "head_dim": 16},
                    "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}}
    raw["stages"] = ["stage1"]
    raw["stage_defs"]["stage1"].update(max_steps=3, save_every=0)
    raw["output_dir"] = str(tmp_path_factory.mktemp("run") / "run")
    raw["logging"].update(progress_bar=False)
    cfg = finalize(validate(raw))
    trainer = Trainer(cfg, specs_root=os.path.join(REPO, "data_specs"))
    result = trainer.run()
    return cfg, trainer.embedder.eval(), result["final"]


def _run_without_nvembed(folder, tmp_path, instruction, prompt):
    """test_export's loader script (nvembed blocked from import), given NV-Embed-style arguments."""
    import subprocess
    import sys

    from test_export import NO_NVEMBED

    script = tmp_path / "load.py"
    script.write_text(NO_NVEMBED)
    out = tmp_path / "emb.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    r = subprocess.run([sys.executable, str(script), folder, str(out), instruction, prompt], cwd=str(tmp_path),
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    return np.load(out)


def test_training_from_checkpoint_then_export_loads_without_nvembed(ckpt, trained, tmp_path):
    from test_export import TEXTS as EXPORT_TEXTS
    from test_export import _load_both

    cfg, emb, final = trained
    rows = [json.loads(l) for l in open(os.path.join(cfg.output_dir, "metrics.jsonl")) if l.strip()]
    losses = [r["loss"] for r in rows if r.get("event") == "step"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    start = build_embedder(model_cfg(ckpt), seed=0)
    moved = [n for n, p in emb.model.latent_attention_model.state_dict().items()
             if not torch.equal(p, start.model.latent_attention_model.state_dict()[n])]
    assert "latents" in moved and "to_q.weight" in moved  # the NV-Embed head itself was trained
    exported = json.load(open(os.path.join(final, "config.json")))
    from nvembed.export import is_export
    assert is_export(final) and not is_export(ckpt)
    assert exported["text_config"]["model_type"] == "mistral" and exported["num_latents"] == 8
    hf, st = _load_both(final)
    q = emb.encode(TEXTS, instruction=TASK)
    for got in (hf.encode(TEXTS, instruction=PREFIX).numpy(), hf.encode(TEXTS, instruction=TASK).numpy(),
                hf.encode(TEXTS, PREFIX, 512).numpy(), st.encode(TEXTS, prompt=PREFIX), st.encode(TEXTS, prompt=TASK)):
        np.testing.assert_allclose(got, q, atol=ATOL)
    np.testing.assert_array_equal(hf.encode(TEXTS, PREFIX, 12).numpy(), hf.encode(TEXTS, TASK, 12).numpy())
    # where nvembed is not importable: AutoModel given NV-Embed's full prefix, sentence-transformers the bare task
    got = _run_without_nvembed(final, tmp_path, instruction=PREFIX, prompt=TASK)
    q, d = emb.encode(EXPORT_TEXTS, instruction=TASK), emb.encode(EXPORT_TEXTS)
    for key, ref in (("hf_q", q), ("st_q", q), ("hf_d", d), ("st_d", d)):
        np.testing.assert_allclose(got[key], ref, atol=ATOL, err_msg=key)
