"""model.compile: compiled decoder layers give the eager model's embeddings and gradients, and compile once for all
layers (regional compilation) instead of falling back to eager."""

import torch

from conftest import tiny_model_config
from nvembed.model import build_embedder
from nvembed.model.inputs import tokenize

BATCHES = [
    ["a", "short text", "a somewhat longer text about blood pressure in children", "what is the treatment"],
    ["one more text of middling length here", "x",
     "the longest text of the batch by some margin, with many words so that it pads the others a lot"],
]


def _step(emb, texts):
    feats = tokenize(emb.tokenizer, texts, ["Instruct: find it\nQuery: "] + [""] * (len(texts) - 1), max_length=64,
                     add_eos=True, exclude_prompt=True)
    emb.zero_grad(set_to_none=True)
    out = emb(**feats)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(len(texts)))
    (out * weights).sum().backward()
    with torch.no_grad():  # the no-grad variant too (evaluation, GradCache's first pass)
        again = emb(**feats)
    grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}
    return out.detach(), again, grads


def test_compiled_layers_match_eager():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # 2 layers compiled, bucketing on: several sequence lengths in one batch, one graph family for every layer
    cfg = dict(length_buckets=2, length_bucket_overhead=0)
    eager = build_embedder(tiny_model_config(**cfg), seed=0).train()
    compiled = build_embedder(tiny_model_config(compile=True, **cfg), seed=0).train()
    for texts in BATCHES:
        (a, a_ng, ga), (b, b_ng, gb) = _step(eager, texts), _step(compiled, texts)
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
        assert torch.allclose(a_ng, b_ng, atol=1e-5) and torch.allclose(b, b_ng, atol=1e-5)
        assert ga.keys() == gb.keys() and any("lora_" in n for n in ga)
        for n in ga:
            assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-3), (n, (ga[n] - gb[n]).abs().max())
    # it really ran compiled, and did not compile each layer (or each length) anew
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= 12, dict(counters["stats"])
    # state-dict keys unchanged: checkpoints and export see the same names
    assert eager.state_dict().keys() == compiled.state_dict().keys()

