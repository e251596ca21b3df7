"""Backbone switch, instruction exclusion from pooling, latent-attention shapes and masking, training weight files."""

import pytest
import torch

from conftest import tiny_model_config
from nvembed.config import PoolingConfig
from nvembed.model import build_embedder, load_backbone, load_tokenizer
from nvembed.hf.modeling_nvembed import LatentAttentionPooling
from nvembed.model.inputs import tokenize


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bidirectional_switch(arch, attn):
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (1, 10))
    changed = ids.clone()
    changed[0, 8] = (changed[0, 8] + 7) % 1000 + 5  # change a LATER token
    for bidir in (True, False):
        cfg = tiny_model_config(arch, bidirectional=bidir, attn_implementation=attn)
        torch.manual_seed(0)
        model = load_backbone(cfg, vocab_size=1024).eval()
        with torch.no_grad():
            a = model(input_ids=ids).last_hidden_state
            b = model(input_ids=changed).last_hidden_state
        early_moved = (a[0, :8] - b[0, :8]).abs().max().item()
        if bidir:
            assert early_moved > 1e-4, "bidirectional: earlier positions must see a later token"
        else:
            assert early_moved < 1e-6, "causal: earlier positions must not see a later token"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bidirectional_still_masks_padding(arch):
    cfg = tiny_model_config(arch, bidirectional=True)
    torch.manual_seed(0)
    model = load_backbone(cfg, vocab_size=1024).eval()
    ids = torch.randint(5, 1000, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 6:] = 0  # two padding positions on the right
    other = ids.clone()
    other[0, 6:] = torch.randint(5, 1000, (2,))  # different garbage under the padding
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, :6]
        b = model(input_ids=other, attention_mask=mask).last_hidden_state[0, :6]
    assert torch.allclose(a, b, atol=1e-6)


def test_pool_mask_excludes_instruction_both_padding_sides():
    tok = load_tokenizer(tiny_model_config())
    prompt = "Instruct: Given a question, retrieve passages that answer it\nQuery: "
    texts = ["what is the capital of france", "hi"]
    prompt_ids = tok(prompt.rstrip(" "), add_special_tokens=True)["input_ids"]
    results = {}
    for side in ("right", "left"):
        tok.padding_side = side
        f = tokenize(tok, texts, [prompt, ""], max_length=64, add_eos=True)
        att, pool, ids = f["attention_mask"], f["pool_mask"], f["input_ids"]
        # the prompted row: prompt tokens attended, not pooled; text tokens (and EOS) pooled
        real = ids[0][att[0].bool()].tolist()
        pooled = ids[0][pool[0].bool()].tolist()
        unpooled = ids[0][(att[0] - pool[0]).bool()].tolist()
        # pooled tokens are a suffix of the real tokens: the text (the prompt's trailing space merges into its
        # first word, which then counts as text) and the EOS
        assert real[len(real) - len(pooled):] == pooled
        assert tok.decode(unpooled, skip_special_tokens=True) == prompt.rstrip(" ")
        assert tok.decode(pooled[:-1]).strip() == texts[0]
        assert pooled[-1] == tok.eos_token_id
        assert len(unpooled) >= len(prompt_ids) - 1
        # the row without prompt pools every real token; padding is never pooled
        assert torch.equal(pool[1], att[1])
        assert (pool <= att).all()
        results[side] = pooled
    assert results["right"] == results["left"]


def test_embeddings_do_not_depend_on_padding_side():
    cfg = tiny_model_config()
    emb = build_embedder(cfg, seed=0).eval()
    texts = ["a short one", "a much longer text that needs more tokens than the first"]
    out = {}
    for side in ("right", "left"):
        emb.tokenizer.padding_side = side
        out[side] = emb.encode(texts, instruction="Find similar sentences")
    assert abs(out["right"] - out["left"]).max() < 1e-4
    assert abs((out["right"] ** 2).sum(-1) - 1).max() < 1e-5


def test_instruction_changes_embedding_but_is_not_pooled():
    cfg = tiny_model_config()
    emb = build_embedder(cfg, seed=0).eval()
    a = emb.encode(["the same text"], instruction="Task one")
    b = emb.encode(["the same text"], instruction="A completely different task")
    assert abs(a - b).max() > 1e-5  # instruction tokens are still attended to (bidirectional)


def test_latent_attention_shapes_and_masking():
    torch.manual_seed(0)
    head = LatentAttentionPooling(32, num_latents=16, num_heads=4, head_dim=8, latent_dim=None, ff_mult=4)
    assert head.latents.shape == (16, 32)
    assert head.to_q.weight.shape == (32, 32)  # 4 heads x 8
    assert head.to_kv.weight.shape == (64, 32)
    assert head.to_out.weight.shape == (32, 32)
    assert head.ff[0].weight.shape == (32 * 4 * 2, 32)  # GEGLU doubles the inner width
    assert head.ff[2].weight.shape == (32, 32 * 4)
    assert all(m.bias is None for m in (head.to_q, head.to_kv, head.to_out))
    hidden = torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = head(hidden, mask)
    assert out.shape == (2, 32)
    # tokens attend only to latents: masked positions cannot change the pooled result of row 0
    hidden2 = hidden.clone()
    hidden2[0, 3:] = torch.randn(2, 32) * 100
    assert torch.allclose(head(hidden2, mask)[0], out[0], atol=1e-5)
    # NV-Embed sizes: hidden 4096, 512 latents, 8 heads of 4096 -> ~0.74B parameters (papers.md 1.3)
    with torch.device("meta"):
        big = LatentAttentionPooling(4096, num_latents=512, num_heads=8, head_dim=None, latent_dim=None, ff_mult=4)
    n = sum(p.numel() for p in big.parameters())
    assert 0.70e9 < n < 0.78e9


def test_zero_init_head_starts_as_mean_pooling():
    head = build_embedder(tiny_model_config(), seed=0).model.latent_attention_model  # hidden 32, zero_init_residual
    torch.manual_seed(0)
    hidden, mask = torch.randn(3, 6, 32), torch.tensor([[1] * 6, [1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1]])
    m = mask.unsqueeze(-1).float()
    assert torch.allclose(head(hidden, mask), (hidden * m).sum(1) / m.sum(1), atol=1e-6)
    out = head(hidden, mask).sum()
    out.backward()
    assert head.to_out.weight.grad.abs().sum() > 0  # the zero branch still learns


def test_pooler_modes():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 32)
    att = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    pool = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    mean = build_embedder(tiny_model_config(pooling=PoolingConfig(mode="mean", normalize=False))).model
    last = build_embedder(tiny_model_config(pooling=PoolingConfig(mode="last_token", normalize=False))).model
    assert mean.latent_attention_model is None and last.latent_attention_model is None
    out = mean.pool(hidden, att, pool)
    assert torch.allclose(out[0], hidden[0, 1:3].mean(0))
    assert torch.allclose(out[1], hidden[1, 2:4].mean(0))
    out = last.pool(hidden, att, pool)
    assert torch.allclose(out[0], hidden[0, 2]) and torch.allclose(out[1], hidden[1, 3])


def test_lora_trains_adapters_and_full_head():
    emb = build_embedder(tiny_model_config(), seed=0)
    trainable = {n for n, p in emb.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable)
    assert all(p.requires_grad for p in emb.model.latent_attention_model.parameters())
    assert not any("embed_tokens" in n for n in trainable)
    from nvembed.config import LoraConfig
    full = build_embedder(tiny_model_config(lora=LoraConfig(enabled=False)), seed=0)
    assert all(p.requires_grad for p in full.parameters())


def test_checkpoint_of_the_earlier_layout_loads(tmp_path):
    """Training weights saved before the model was one NVEmbedModel (keys ``backbone.*`` / ``pooler.head.*``) load
    with load_weights (init_from, resume) and with load_state_dict (DeepSpeed's resume), giving the same model."""
    from safetensors.torch import load_file, save_file

    from nvembed.model.embedder import WEIGHTS

    cfg = tiny_model_config()
    trained = build_embedder(cfg, seed=0)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    trained.save_weights(str(tmp_path))
    state = load_file(str(tmp_path / WEIGHTS))
    old = {k.replace("model.embedding_model.", "backbone.").replace("model.latent_attention_model.", "pooler.head."): v
           for k, v in state.items()}
    assert any(k.startswith("pooler.head.") for k in old) and all(k.startswith(("backbone.", "pooler.")) for k in old)
    save_file(old, str(tmp_path / WEIGHTS))
    texts = ["the same text", "another one"]
    want = trained.encode(texts, instruction="Task one")
    fresh = build_embedder(cfg, seed=0)
    assert abs(fresh.encode(texts, instruction="Task one") - want).max() > 1e-3
    fresh.load_weights(str(tmp_path))
    assert abs(fresh.encode(texts, instruction="Task one") - want).max() < 1e-6
    other = build_embedder(cfg, seed=0)
    other.load_state_dict(old, strict=False)
    assert abs(other.encode(texts, instruction="Task one") - want).max() < 1e-6
