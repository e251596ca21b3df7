"""Configuration of an exported nvembed text embedder (transformers remote code; needs no ``nvembed`` install).

The backbone's own configuration is nested as ``text_config`` (a normal transformers config with its
``model_type``: llama, mistral, qwen2, ...); the pooling head and the input conventions are flat fields.
"""

from transformers import AutoConfig, PretrainedConfig

try:  # transformers >= 5.x composite-config spec; older 5.x releases read the plain ``sub_configs`` mapping
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # pragma: no cover
    SubConfigSpec = None


def _text_config(value):
    if value is None or isinstance(value, PretrainedConfig):
        return value
    if isinstance(value, dict):
        values = dict(value)
        model_type = values.pop("model_type", None)
        if not model_type:
            raise ValueError("NVEmbedConfig.text_config needs a 'model_type' (the backbone architecture)")
        values.pop("transformers_version", None)
        return AutoConfig.for_model(model_type, **values)
    raise TypeError(f"NVEmbedConfig.text_config must be a dict or a PretrainedConfig, got {type(value)}")


class NVEmbedConfig(PretrainedConfig):
    """Backbone config + pooling head + input conventions of an nvembed embedding model.

    Args:
        text_config: the decoder backbone's config (dict with ``model_type`` or a config object).
        bidirectional: remove the causal mask at load (``config.is_causal=False`` and every module's ``is_causal``).
        pooling_mode: ``latent_attention`` (NV-Embed), ``mean`` or ``last_token`` (``modeling_nvembed.POOLING_MODES``).
        num_latents, num_heads, head_dim, latent_dim, ff_mult: latent-attention head shape (head_dim / latent_dim
            None = hidden size).
        normalize: L2-normalise the embeddings.
        exclude_instruction: leave the prompt tokens out of the pooled mean (they are still attended to).
        query_template: prompt put before a query, ``{instruction}`` is replaced by the task instruction.
        add_eos: append the EOS token to every text.
        padding_side: ``right`` or ``left``.
        max_seq_length: default token limit of ``encode``.
    """

    model_type = "nvembed"
    if SubConfigSpec is not None:
        sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}
    else:  # pragma: no cover
        sub_configs = {"text_config": AutoConfig}

    def __init__(
        self,
        text_config=None,
        bidirectional=True,
        pooling_mode="latent_attention",
        num_latents=512,
        num_heads=8,
        head_dim=None,
        latent_dim=None,
        ff_mult=4,
        normalize=True,
        exclude_instruction=True,
        query_template="Instruct: {instruction}\nQuery: ",
        add_eos=True,
        padding_side="right",
        max_seq_length=512,
        **kwargs,
    ):
        self.text_config = _text_config(text_config)
        self.bidirectional = bool(bidirectional)
        self.pooling_mode = pooling_mode
        self.num_latents = int(num_latents)
        self.num_heads = int(num_heads)
        self.head_dim = head_dim
        self.latent_dim = latent_dim
        self.ff_mult = int(ff_mult)
        self.normalize = bool(normalize)
        self.exclude_instruction = bool(exclude_instruction)
        self.query_template = query_template
        self.add_eos = bool(add_eos)
        self.padding_side = padding_side
        self.max_seq_length = int(max_seq_length)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)

    @property
    def hidden_size(self):
        return self.text_config.hidden_size if self.text_config is not None else None
