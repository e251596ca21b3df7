import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
