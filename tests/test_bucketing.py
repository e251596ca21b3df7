"""Length bucketing: the plan is the exact optimum, and embeddings and gradients equal the unsplit batch."""

import itertools
import random

import pytest
import torch

from conftest import tiny_model_config
from nvembed.model import build_embedder
from nvembed.model.bucketing import padded_tokens, plan_buckets
from nvembed.model.inputs import tokenize


def _brute_force(lengths, k_max, overhead):
    srt = sorted(lengths)
    n, best = len(srt), float("inf")
    for k in range(1, min(k_max, n) + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0,) + cuts + (n,)
            cost = sum((e - s) * srt[e - 1] + overhead for s, e in zip(bounds, bounds[1:]))
            best = min(best, cost)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_optimal_and_covers_every_row_once(seed):
    rnd = random.Random(seed)
    lengths = [rnd.randint(1, 60) for _ in range(rnd.randint(1, 11))]
    for k_max, overhead in ((1, 0), (2, 0), (3, 16), (4, 5), (8, 0)):
        plan = plan_buckets(lengths, k_max, overhead)
        assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
        assert 1 <= len(plan) <= k_max
        cost = sum(len(b) * max(lengths[i] for i in b) + overhead for b in plan)
        assert cost == _brute_force(lengths, k_max, overhead), (lengths, k_max, overhead, plan)


def test_no_split_when_lengths_are_equal_or_overhead_too_high():
    assert len(plan_buckets([7] * 10, 4, 1)) == 1
    assert len(plan_buckets([10, 11, 12, 60], 4, 1000)) == 1
    assert [len(b) for b in plan_buckets([10, 11, 12, 60], 4, 5)] == [3, 1]


def test_exact_plan_has_a_fixed_number_of_buckets():
    """ZeRO-3 mode: the number of backbone calls depends only on the row count, never on the lengths."""
    for lengths in ([7] * 10, [1, 50, 50, 50, 50, 50], list(range(1, 11))):
        plan = plan_buckets(lengths, 4, 1000, exact=True)
        assert len(plan) == 4 and sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert len(plan_buckets([3, 9], 4, 0, exact=True)) == 2
    # the best 4-way split of these lengths: 1 | 2 3 | 50 50 50 | 51 52 = 1 + 6 + 150 + 104 padded tokens
    assert [len(b) for b in plan_buckets([1, 2, 3, 50, 50, 50, 51, 52], 4, 0, exact=True)] == [1, 2, 3, 2]


def _batch(emb, texts, prompts):
    return tokenize(emb.tokenizer, texts, prompts, max_length=64, add_eos=True, exclude_prompt=True)


TEXTS = ["a", "short text", "a somewhat longer text about blood pressure in children",
         "what is the treatment", "one more text of middling length here",
         "the longest text of the batch by some margin, with many words so that it pads the others a lot"]


@pytest.mark.parametrize("arch,attn,side,bidir", [
    ("llama", "sdpa", "right", True), ("llama", "eager", "left", True), ("mistral", "sdpa", "left", True),
    ("qwen2", "sdpa", "right", True), ("llama", "sdpa", "right", False)])
def test_bucketed_forward_equals_padded_forward(arch, attn, side, bidir):
    """Same embeddings and same LoRA / pooling-head gradients, rows in the original order."""
    cfg = tiny_model_config(arch, attn_implementation=attn, padding_side=side, bidirectional=bidir)
    emb = build_embedder(cfg, seed=0)
    emb.tokenizer.padding_side = side
    emb.train()
    prompts = ["Instruct: find it\nQuery: " if i % 2 else "" for i in range(len(TEXTS))]
    feats = _batch(emb, TEXTS, prompts)
    weights = torch.randn(len(TEXTS), emb.hidden_size, generator=torch.Generator().manual_seed(1))
    results = []
    for buckets in (1, 3):
        emb.cfg.length_buckets, emb.cfg.length_bucket_overhead = buckets, 0
        emb.zero_grad(set_to_none=True)
        out = emb(**feats)
        (out * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in emb.named_parameters() if p.grad is not None}
        results.append((out.detach(), grads))
    (a, ga), (b, gb) = results
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    assert ga.keys() == gb.keys() and any("lora_" in n for n in ga)
    for n in ga:
        assert torch.allclose(ga[n], gb[n], atol=1e-5, rtol=1e-4), (n, (ga[n] - gb[n]).abs().max())
    assert padded_tokens(feats, 3) < padded_tokens(feats, 1) == feats["attention_mask"].numel()


def test_positions_count_real_tokens_with_left_padding():
    """The backbone gets positions 0..n-1 over each text's real tokens whatever its padding, so models with absolute
    positions give a text the same embedding in any batch (RoPE models would anyway: only offsets matter to them)."""
    cfg = tiny_model_config(padding_side="left", length_buckets=1)
    emb = build_embedder(cfg, seed=0).eval()
    emb.tokenizer.padding_side = "left"
    seen = []
    emb.backbone.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True)
    feats = _batch(emb, [TEXTS[1], TEXTS[-1]], ["", ""])
    with torch.no_grad():
        emb(**feats)
    (pos,) = seen
    mask = feats["attention_mask"].bool()
    assert not mask[0].all()  # the short text is left-padded here
    for row in range(2):
        assert pos[row][mask[row]].tolist() == list(range(int(mask[row].sum())))
    alone = emb.encode([TEXTS[1]])
    with_long = emb.encode([TEXTS[1], TEXTS[-1]], batch_size=2)
    assert abs(alone[0] - with_long[0]).max() < 1e-5
