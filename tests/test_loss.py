"""InfoNCE against a reference computed by hand with plain Python math on small tensors."""

import math

import torch
import torch.nn.functional as F

from nvembed.losses import InfoNCELoss, MatryoshkaLoss, distill_kl


def _unit(rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=1, keepdim=True)


Q = _unit([[1.0, 0.0], [0.0, 1.0]])
# groups of 2 (positive, one hard negative) for each of the 2 queries
D = _unit([[1.0, 0.2], [0.3, 1.0], [0.1, 1.0], [1.0, 1.0]])
TAU = 0.5


def _cos(a, b):
    return float(a @ b)


def _ce(scores, target):
    return -(scores[target] - math.log(sum(math.exp(s) for s in scores)))


def test_in_batch_and_hard_negatives_against_hand_computation():
    out = InfoNCELoss(TAU, in_batch_negatives=True, mask_false_negatives=False)(Q, D, group=2)
    expect = 0.0
    for i, target in ((0, 0), (1, 2)):
        scores = [_cos(Q[i], D[j]) / TAU for j in range(4)]
        expect += _ce(scores, target) / 2
    assert abs(out.loss.item() - expect) < 1e-9


def test_without_in_batch_negatives_uses_own_group_only():
    out = InfoNCELoss(TAU, in_batch_negatives=False)(Q, D, group=2)
    expect = 0.0
    for i in range(2):
        scores = [_cos(Q[i], D[2 * i + j]) / TAU for j in range(2)]
        expect += _ce(scores, 0) / 2
    assert abs(out.loss.item() - expect) < 1e-9
    # accuracy: query 0's positive (cos .98) beats its negative (cos .29); query 1's (cos .995) beats (.707)
    assert out.accuracy.item() == 1.0


def test_false_negative_masking():
    # query 1's positive text is also query 0's hard negative: for query 1 that in-batch candidate is masked
    pos_keys = torch.tensor([10, 20])
    doc_keys = torch.tensor([10, 20, 20, 30])
    out = InfoNCELoss(TAU, in_batch_negatives=True, mask_false_negatives=True)(Q, D, 2, 0, pos_keys, doc_keys)
    s0 = [_cos(Q[0], D[j]) / TAU for j in range(4)]
    s1 = [_cos(Q[1], D[j]) / TAU for j in (0, 2, 3)]  # candidate 1 (text 20 == own positive's text) dropped
    expect = (_ce(s0, 0) + _ce(s1, 1)) / 2
    assert abs(out.loss.item() - expect) < 1e-9


def test_offset_selects_this_process_groups():
    # as if another process held the first two groups: docs = [other0, other1, own0, own1]
    docs = torch.cat([D[2:], D[:2]])
    out = InfoNCELoss(TAU)(Q[:1], docs, group=2, offset=2)
    scores = [_cos(Q[0], docs[j]) / TAU for j in range(4)]
    assert abs(out.loss.item() - _ce(scores, 2)) < 1e-9


def test_matryoshka_averages_truncations():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(3, 8, dtype=torch.float64), dim=-1)
    d = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1)
    base = InfoNCELoss(0.1)
    full = base(q, d, 2).loss
    half = base(F.normalize(q[:, :4], dim=-1), F.normalize(d[:, :4], dim=-1), 2).loss
    got = MatryoshkaLoss(base, [4]).forward(q, d, 2).loss
    assert abs(got.item() - (full.item() + half.item()) / 2) < 1e-9


def test_distill_kl_zero_when_student_matches_teacher():
    q = _unit([[1.0, 0.0]])
    own = D[:2].unsqueeze(0)
    student = torch.tensor([[_cos(q[0], own[0, 0]), _cos(q[0], own[0, 1])]]) / 0.02
    assert distill_kl(q, own, student.clone(), temperature=0.02, teacher_temperature=1.0).item() < 1e-9
    assert distill_kl(q, own, torch.tensor([[0.0, 5.0]]), temperature=0.02).item() > 0.1
