"""Parity: the training model and the exported model are one model. For the default options and each non-default one
(normalize, exclude_instruction, bidirectional, add_eos off; left padding; each pooling mode) and under bf16 autocast,
the Embedder's ``encode`` (what training evaluates) equals the export's, loaded both by transformers' remote-code
loader (the shipped files) and by nvembed's own loader (``nvembed.hf``, folder code not executed)."""

import numpy as np
import pytest
import torch

from conftest import perturbed_embedder as _perturbed, tiny_model_config
from nvembed.config import PoolingConfig
from nvembed.export import export_model

TEXTS = ["What is the capital of France?", "Paris is the capital and largest city of France.", "x",
         "A much longer text, with punctuation; numbers 12345 and a few more words to make it the longest one here."]
TASK = "Given a question, retrieve passages that answer the question"
ATOL = 1e-5


def _pooling(mode="latent_attention", **over):
    return PoolingConfig(mode=mode, num_latents=8, num_heads=2, head_dim=16, **over)


# option -> (architecture, ModelConfig overrides); tiny random backbones of three families
CASES = {
    "default": ("llama", {}),
    "normalize_off": ("qwen2", {"pooling": _pooling(normalize=False)}),
    "instruction_pooled": ("mistral", {"pooling": _pooling(exclude_instruction=False)}),
    "causal": ("llama", {"bidirectional": False}),
    "no_eos": ("qwen2", {"add_eos": False}),
    "left_padding": ("mistral", {"padding_side": "left"}),
    "mean": ("llama", {"pooling": _pooling("mean")}),
    "last_token": ("qwen2", {"pooling": _pooling("last_token"), "padding_side": "left"}),
}


def _option_in_effect(name, emb, folder_config):
    """The non-default option is really on in both models (else the comparison would prove nothing new)."""
    feats = emb.features(TEXTS, [TASK] * len(TEXTS), max_length=64)
    tok = emb.tokenizer
    if name == "normalize_off":
        assert abs(np.linalg.norm(emb.encode(TEXTS), axis=1) - 1).max() > 1e-3
    elif name == "instruction_pooled":
        assert torch.equal(feats["pool_mask"], feats["attention_mask"])
    elif name == "causal":
        assert folder_config.text_config.is_causal is True and folder_config.bidirectional is False
    elif name == "no_eos":
        last = feats["input_ids"][torch.arange(len(TEXTS)), feats["attention_mask"].sum(1) - 1]
        assert not (last == tok.eos_token_id).any()
    elif name in ("left_padding", "last_token"):
        assert tok.padding_side == "left" and (feats["attention_mask"][:, 0] == 0).any()
    if name != "instruction_pooled":
        assert (feats["pool_mask"] < feats["attention_mask"]).any()  # the prompt is left out of pooling


_BUILT = {}


def _built(name, tmp_path_factory):
    """(Embedder, remote-code model, nvembed-loaded model) for one option, built once per module."""
    if name not in _BUILT:
        from transformers import AutoModel

        from nvembed.eval.encoders import load_nvembed_export

        arch, over = CASES[name]
        emb = _perturbed(tiny_model_config(arch, **over))
        folder = str(tmp_path_factory.mktemp(f"parity-{name}") / "final")
        export_model(emb, folder, None)
        remote = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(remote).__module__.startswith("transformers_modules"), "not the folder's shipped code"
        own = load_nvembed_export(folder)
        assert type(own).__module__ == "nvembed.hf.modeling_nvembed"
        _BUILT[name] = (emb, remote, own)
    return _BUILT[name]


def _encode_all(emb, remote, own, instruction, max_length, **kw):
    ref = emb.encode(TEXTS, instruction=instruction, max_length=max_length, **kw)
    return ref, [m.encode(TEXTS, instruction=instruction or "", max_length=max_length, **kw).numpy()
                 for m in (remote, own)]


@pytest.mark.parametrize("name", list(CASES))
def test_training_and_exported_model_agree(name, tmp_path_factory):
    emb, remote, own = _built(name, tmp_path_factory)
    _option_in_effect(name, emb, remote.config)
    for instruction in (None, TASK):
        for max_length in (512, 12):  # 12 cuts the long texts (EOS kept last when add_eos)
            ref, got = _encode_all(emb, remote, own, instruction, max_length)
            for out in got:
                np.testing.assert_allclose(out, ref, atol=ATOL, err_msg=f"{name} {instruction} {max_length}")


@pytest.mark.parametrize("name", ["default", "mean"])
def test_bf16_autocast_same_rule_both_sides(name, tmp_path_factory):
    """``autocast_dtype=torch.bfloat16`` is one argument of one encode, applied alike on both sides. The training
    model runs LoRA unmerged (two more bf16 matmuls) and the export merged, so they agree within bf16 rounding
    (the size of bf16's own deviation from fp32 here, ~2e-2 at most), not bit for bit; both exported loaders agree
    exactly."""
    emb, remote, own = _built(name, tmp_path_factory)
    full, full_got = _encode_all(emb, remote, own, TASK, 64)
    ref, got = _encode_all(emb, remote, own, TASK, 64, autocast_dtype=torch.bfloat16)
    assert ref.dtype == np.float32 and abs(ref - full).max() > 1e-4, "bf16 autocast did not run (training side)"
    np.testing.assert_array_equal(got[0], got[1])
    for out, out_full in zip(got, full_got):
        assert abs(out - out_full).max() > 1e-4, "bf16 autocast did not run (exported side)"
        np.testing.assert_allclose(out, ref, atol=4e-2)
        assert abs(out - ref).mean() < 8e-3
        cos = (out * ref).sum(1) / np.linalg.norm(out, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() > 0.995, cos
