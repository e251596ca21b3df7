"""Worker for tests/test_distributed.py, run as ``python tests/dist_worker.py MODE OUT`` (one process), under
``torchrun --nproc_per_node 2`` (DDP on gloo) or ``accelerate launch --config_file recipes/accelerate/zeroN.yaml``
(DeepSpeed on CPU). Writes ``OUT.rank<r>.json`` with its measurements; raises on a failed check.

Checks against a reference computed on every rank without any parallelism: the whole batch (every rank's share)
through the unwrapped model, plain autograd.
"""

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

WORDS = ("heart lung kidney fever cough pain blood sugar insulin virus cell gene protein brain nerve bone "
         "muscle skin liver drug dose trial risk child adult sleep diet water salt iron").split()


def examples(n):
    from nvembed.data.example import Example

    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        pick = lambda k: " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=g).tolist())  # noqa
        out.append(Example(query=pick(3 + i % 4), positive=pick(6 + i % 5), negatives=[pick(5 + i % 3)],
                           instruction="Retrieve a passage" if i % 2 else None, dataset="t"))
    return out


def make_cfg():
    from omegaconf import OmegaConf

    from nvembed.cli import finalize
    from nvembed.config import validate

    raw = OmegaConf.load(os.path.join(REPO, "recipes", "smoke.yaml"))
    raw.model.lora.dropout = 0.0
    raw.model.tokenizer = os.path.join(REPO, "recipes", "assets", "tiny-tokenizer")
    cfg = finalize(validate(raw))
    st = cfg.stage_defs["stage1"]
    st.max_grad_norm = 0.0
    return cfg


def reference(emb, batch, loss_fn):
    emb.zero_grad(set_to_none=True)
    out = loss_fn(emb(**batch.queries), emb(**batch.docs), batch.group, 0, batch.pos_keys, batch.doc_keys)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in emb.named_parameters() if p.requires_grad}
    emb.zero_grad(set_to_none=True)
    return out.loss.item(), grads


def rel_err(grads, ref):
    worst = 0.0
    for n, r in ref.items():
        g = grads[n]
        assert g is not None, f"no gradient for {n}: {[k for k in ref if grads[k] is None][:50]} of {len(ref)}"
        worst = max(worst, float((g.float() - r).abs().max() / (r.abs().max() + 1e-12)))
    return worst


def main(mode, out_path):
    from nvembed.losses import InfoNCELoss
    from nvembed.model import build_embedder
    from nvembed.training import deepspeed_utils as ds_utils
    from nvembed.training.backend import DeepSpeedBackend
    from nvembed.training.collate import Collator
    from nvembed.training.gradcache import grad_cache_backward
    from nvembed.training.objective import ContrastiveObjective
    from nvembed.training.trainer import make_accelerator, train_step

    cfg = make_cfg()
    st = cfg.stage_defs["stage1"]
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    per_rank = 4
    # built (and the reference computed) before the Accelerator exists: under ZeRO-3 accelerate makes transformers
    # build models already partitioned (zero.Init); DeepSpeed partitions this one when the engine is created
    emb = build_embedder(cfg.model, seed=cfg.seed)
    collate = Collator(emb.tokenizer, cfg.model.query_template, st.query_max_length, st.doc_max_length,
                       st.num_hard_negatives, cfg.model.add_eos, cfg.model.pooling.exclude_instruction)
    loss_fn = InfoNCELoss(cfg.loss.temperature, True, cfg.loss.mask_false_negatives)
    full = examples(per_rank * world)
    ref_loss, ref_grads = reference(emb, collate(full), loss_fn)
    acc = make_accelerator("fp32")
    assert (acc.num_processes, acc.process_index) == (world, rank)
    local = collate(full[rank * per_rank:(rank + 1) * per_rank])
    objective = ContrastiveObjective(cfg.loss, st, process_index=acc.process_index, num_processes=acc.num_processes)
    res = {"mode": mode, "world": world, "rank": rank, "ref_loss": ref_loss}

    def loss_mean(x):
        return float(acc.reduce(x.detach().reshape(1), reduction="mean").item()) if world > 1 else float(x)

    if mode == "ddp":
        model = acc.prepare_model(emb)
        grads = lambda: {n: p.grad for n, p in emb.named_parameters() if p.requires_grad}  # noqa: E731
        out = objective(model, local)
        acc.backward(out.loss)
        res["plain_loss"], res["plain_grad_err"] = loss_mean(out.loss), rel_err(grads(), ref_grads)
        emb.zero_grad(set_to_none=True)
        out = grad_cache_backward(objective, model, acc, local, 3, scale=1.0, sync=True)  # uneven chunks on purpose
        res["gc_loss"], res["gc_grad_err"] = loss_mean(out.loss), rel_err(grads(), ref_grads)
        emb.zero_grad(set_to_none=True)
    else:
        from deepspeed.utils import safe_get_full_grad

        assert ds_utils.is_deepspeed(acc), "not running under DeepSpeed"
        backend = DeepSpeedBackend(acc, emb)
        backend.prepare_model()
        optimizer, scheduler = backend.prepare_stage(st, total=10)
        engine = ds_utils.engine_of(acc)
        assert backend.model is engine
        res["zero_stage"] = ds_utils.zero_stage(acc)
        if res["zero_stage"] == 3:
            rows = ds_utils.parameter_partition(engine.module)
            res["full_numel"] = sum(r["full"] for r in rows)
            res["local_numel"] = sum(r["local"] for r in rows)
            res["n_partitioned"] = len(rows)
            res["empty_local_params"] = sum(1 for p in engine.module.parameters() if p.numel() == 0)
        real_step = engine.step
        steps = []
        engine.step = lambda *a, **k: steps.append(1)  # keep the reduced gradients for inspection

        def ds_grads():
            return {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}

        out = objective(engine, local)
        acc.backward(out.loss)
        res["plain_loss"], res["plain_grad_err"] = loss_mean(out.loss), rel_err(ds_grads(), ref_grads)
        ds_utils.discard_grads(acc)
        st.grad_cache_chunk_size = 3  # also for train_step below
        out = grad_cache_backward(objective, engine, acc, local, 3, scale=1.0, sync=True)
        gg = ds_grads()
        res["gc_loss"], res["gc_grad_err"] = loss_mean(out.loss), rel_err(gg, ref_grads)
        res["gc_engine_steps"] = len(steps) - 1
        ds_utils.discard_grads(acc)

        # a few real optimizer steps: GradCache + 2 accumulated micro-batches, one engine step per optimizer step
        calls = []

        def counted_step(*a, **k):
            calls.append(1)
            return real_step(*a, **k)

        engine.step = counted_step
        before = ds_utils.trainable_state_dict(acc, emb)
        st.gradient_accumulation_steps = 2

        class Data:
            def batch(self, i):
                return examples(per_rank * world * (i + 2))[-per_rank * world:][rank * per_rank:(rank + 1) * per_rank]

        engine.train()
        losses = []
        for step in range(3):
            stats = train_step(backend, objective, st, Data(), collate, optimizer, scheduler, step)
            assert stats is not None, "non-finite step"
            losses.append(stats["loss"])
        after = ds_utils.trainable_state_dict(acc, emb)
        res["train_losses"] = losses
        res["engine_steps_for_3_optimizer_steps"] = len(calls)
        res["weights_changed"] = any(not torch.equal(before[k], after[k]) for k in before)
        res["full_shapes"] = all(v.numel() > 0 for v in after.values())
        res["n_trainable_tensors"] = len(after)
    with open(f"{out_path}.rank{rank}.json", "w") as f:
        json.dump(res, f, indent=1)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
