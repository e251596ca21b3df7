"""The training loop: stages in sequence on accelerate, with checkpoints, exact resume and metrics.

Deliberately not a fork of HF Trainer: one loop, readable top to bottom. What changes per concept lives elsewhere
(model: ``nvembed.model``; loss: ``nvembed.losses``; data: ``nvembed.data``; checkpoints: ``checkpoint.py``;
GradCache: ``gradcache.py``; metrics: ``tracking.py``).
"""

from __future__ import annotations

import functools
import math
import os
import time
import zlib
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf

from ..config import RunConfig, StageConfig, to_dict
from ..errors import UserError
from ..losses import InfoNCELoss, LossOutput, MatryoshkaLoss, distill_kl
from ..preflight import load_stage, load_stages
from . import checkpoint as ckpt
from . import deepspeed_utils as ds_utils
from .collate import Batch, Collator
from .distributed import all_gather_no_grad, all_gather_with_grad, on_main, sync_context
from .tracking import Tracker, plot_loss_curves, scrub


class TrainingError(UserError, RuntimeError):
    """Training cannot go on as configured (e.g. losses stay non-finite); the message says how to recover."""

    kind = "training"


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_fast() -> bool:
    """Measure, do not assume: bf16 matmul is ~3x faster than fp32 on CPUs with AVX512-BF16/AMX and many times
    slower on others (e.g. AVX2-only x86, where it is emulated). A ~0.1 s probe decides, once per process."""

    def speed(dtype):
        a, b = torch.randn(256, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        return time.perf_counter() - t0

    return speed(torch.bfloat16) < 0.8 * speed(torch.float32)


def resolve_precision(precision: str) -> str:
    """accelerate's mixed_precision value. ``auto``: bf16 on GPUs that have it, else fp16; on CPU bf16 only where
    the probe finds it faster than fp32."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16_is_fast() else "no"
    return {"fp32": "no"}.get(precision, precision)


def make_accelerator(precision: str):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers, cpu = [], False
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # without gloo, accelerate on CPU quietly runs each rank as its own single process
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        # and without cpu=True (set by `accelerate launch --cpu`, not by torchrun) it reports DistributedType.NO:
        # no DDP wrapping, so gradients would silently not be averaged across ranks
        cpu = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true"
    # step_scheduler_with_optimizer=False: the schedule counts optimizer steps; accelerate would otherwise step it
    # num_processes times per step (its convention for per-process dataloaders), ending it early under DDP
    return Accelerator(mixed_precision=resolve_precision(precision), kwargs_handlers=handlers, cpu=cpu,
                       step_scheduler_with_optimizer=False)


WEIGHT_BLOWUP = 1e3
"""Trainable weights whose norm grows this many times within a stage have exploded (divergence, not learning)."""


def _new_distill_counts() -> Dict[str, Any]:
    """Distillation bookkeeping of this process: micro-batches with / without a KL term, examples in / out of it."""
    return {"batches": 0, "skipped_batches": 0, "examples": 0, "unscored_examples": 0}


class Trainer:
    def __init__(self, cfg: RunConfig, specs_root: str = "data_specs"):
        self.cfg = cfg
        self.specs_root = specs_root
        self.out = cfg.output_dir
        self.accelerator = None
        self.embedder = None
        self.tracker: Optional[Tracker] = None
        self.global_step = 0
        self.distill_counts = _new_distill_counts()
        self._data: Dict[str, Any] = {}  # each stage's data, loaded and checked in setup before the model
        self._resume_from: Dict[str, Optional[str]] = {}  # stage -> verified folder it resumes from (resume=true)

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from ..model import build_embedder

        acc = self.accelerator = make_accelerator(self.cfg.precision)
        ds_utils.check_compile(acc, self.cfg.model.compile)  # before anything is written
        if acc.is_main_process:
            ckpt.guard_output_dir(self.out, self.cfg.resume)
        acc.wait_for_everyone()
        if self.cfg.resume:  # before anything is written: the saved config and checkpoints decide (every rank)
            ckpt.check_resume_config(self.out, scrub(to_dict(self.cfg)), list(self.cfg.resume_changes),
                                     self._log_line)
        resume_after = self._resume_points() if self.cfg.resume else None
        # every stage's data is read and checked before the model loads and before the run folder is marked: a bad
        # stage-2 spec fails in seconds, not after stage 1, and a retry with the same output_dir works
        done = [n for n, src in self._resume_from.items() if src == os.path.join(self.out, n, "final")]
        self._data = load_stages(self.cfg, self.specs_root, process_index=acc.process_index,
                                 num_processes=acc.num_processes, log=self._log_line, skip=done)
        set_seed(self.cfg.seed)
        with ds_utils.model_init_context(acc):
            self.embedder = build_embedder(self.cfg.model, seed=self.cfg.seed)
        if self.cfg.init_from:
            ds_utils.load_weights(acc, self.embedder, self.cfg.init_from)  # zero3_init_flag: already partitioned
        self.model = ds_utils.prepare_model(acc, self.embedder)  # DeepSpeed: engine built in the first stage
        if acc.is_main_process:
            os.makedirs(self.out, exist_ok=True)
            plain = scrub(to_dict(self.cfg))
            OmegaConf.save(OmegaConf.create(plain), os.path.join(self.out, "config.yaml"))
            if not os.path.isfile(os.path.join(self.out, ckpt.RUN_MARKER)):
                ckpt.write_json_atomic(os.path.join(self.out, ckpt.RUN_MARKER),
                                       {"nvembed": True, "stages": list(self.cfg.stages), "started": time.time()})
        self.tracker = Tracker(self.out, self.cfg.logging, scrub(to_dict(self.cfg)), enabled=acc.is_main_process,
                               resume_after=resume_after)

    def _resume_points(self) -> Dict[str, int]:
        """Step each stage resumes at, from verified folders (:func:`checkpoint.find_resume_point`: broken ones are
        named and skipped). Decided once on the main process and shared, so every rank loads the same checkpoint and
        an error stops every rank."""
        self._resume_from = on_main(
            self.accelerator, lambda: {name: ckpt.find_resume_point(os.path.join(self.out, name))
                                       for name in self.cfg.stages}, ckpt.RunDirError)
        return {name: (ckpt.read_state(src)["step"] if src else 0) for name, src in self._resume_from.items()}

    # ---- the run -------------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        self.setup()
        from .evaluation import maybe_evaluate, write_report  # local: evaluation pulls in sklearn/scipy

        maybe_evaluate(self, "untrained")
        for name in self.cfg.stages:
            self.run_stage(name)
            maybe_evaluate(self, f"after_{name}")
        result = {"output_dir": self.out}
        if self.accelerator.is_main_process:
            plot_loss_curves(self.out)
            result["table"] = write_report(self)
        if self.cfg.export_final:
            from ..export import export_model

            self.accelerator.wait_for_everyone()
            with ds_utils.export_context(self.accelerator, self.model):  # ZeRO-3: full weights for the export
                if self.accelerator.is_main_process:
                    export_model(self.accelerator.unwrap_model(self.model), os.path.join(self.out, "final"),
                                 self.cfg)
            result["final"] = os.path.join(self.out, "final")
        self.accelerator.wait_for_everyone()
        self.tracker.close()
        return result

    def _stage_data(self, st: StageConfig, name: str):
        """The stage's batches: loaded in setup (with every other stage's), else now (a stage setup skipped)."""
        if name in self._data:
            return self._data.pop(name)  # the trainer holds no reference once the stage is done
        acc = self.accelerator
        return load_stage(self.cfg, name, self.specs_root, process_index=acc.process_index,
                          num_processes=acc.num_processes, log=self._log_line)

    def _log_line(self, msg: str) -> None:
        if self.accelerator is None or self.accelerator.is_main_process:
            print(f"[nvembed] {msg}", flush=True)

    def run_stage(self, name: str) -> None:
        from accelerate.utils import set_seed
        from transformers import get_scheduler

        st = self.cfg.stage_defs[name]
        acc = self.accelerator
        stage_dir = os.path.join(self.out, name)
        final_dir = os.path.join(stage_dir, "final")
        source = self._resume_from.get(name) if self.cfg.resume else None
        if source == final_dir:
            # finished earlier: its weights are the starting point of the next stage
            ds_utils.load_weights(acc, self.embedder, final_dir)
            self.global_step = ckpt.read_state(final_dir)["global_step"]
            self._log_line(f"{name}: already complete, skipped")
            return
        data = self._stage_data(st, name)
        total = st.max_steps or max(1, math.ceil(st.epochs * data.steps_per_epoch / st.gradient_accumulation_steps))
        if ds_utils.is_deepspeed(acc):  # engine (first stage) or fresh optimizer state on it (later stages)
            optimizer, scheduler = ds_utils.prepare_stage(self, st, total)
        else:
            params = [p for p in self.model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=st.learning_rate, weight_decay=st.weight_decay)
            scheduler = get_scheduler(st.lr_scheduler, optimizer, num_warmup_steps=st.warmup_steps,
                                      num_training_steps=total)
            optimizer, scheduler = acc.prepare(optimizer, scheduler)
        # per-stage seed (after the DeepSpeed engine is built, which draws random numbers): dropout is then the same
        # under any launcher and for a stage run alone; a resume below restores the saved RNG states instead
        set_seed((self.cfg.seed + zlib.crc32(name.encode())) % 2**32)
        start = 0
        if acc.is_main_process:
            ckpt.clean_temporaries(stage_dir)
        if source is not None:
            if ds_utils.is_deepspeed(acc):
                state = ds_utils.load(self, source)
            else:
                state = ckpt.load_checkpoint(source, embedder=self.embedder, optimizer=optimizer.optimizer,
                                             scheduler=scheduler.scheduler, rank=acc.process_index)
            start, self.global_step = state["step"], state["global_step"]
            self._log_line(f"{name}: resumed from {source} at step {start}/{total}")
            sched = scheduler.scheduler  # the LambdaLR (plain or DeepSpeed), built on the optimizer it steps
            if ckpt.rebase_schedule(sched.optimizer, sched, st.learning_rate, st.weight_decay):
                self._log_line(f"{name}: learning rate {st.learning_rate:g} (weight decay {st.weight_decay:g}) from "
                               f"the config in force from step {start + 1} (resume_changes); lr now "
                               f"{sched.get_last_lr()[0]:.3g}")
        collator = Collator(self.embedder.tokenizer, self.cfg.model.query_template, st.query_max_length,
                            st.doc_max_length, st.num_hard_negatives, self.cfg.model.add_eos,
                            self.cfg.model.pooling.exclude_instruction)
        loss_fn = InfoNCELoss(self.cfg.loss.temperature, st.in_batch_negatives, self.cfg.loss.mask_false_negatives)
        if self.cfg.loss.matryoshka_dims:
            loss_fn = MatryoshkaLoss(loss_fn, self.cfg.loss.matryoshka_dims)
        self._log_line(f"{name}: {total} steps x {st.batch_size} queries x {acc.num_processes} processes "
                       f"x {st.gradient_accumulation_steps} accumulation, {st.num_hard_negatives} hard negatives, "
                       f"in-batch negatives {'on' if st.in_batch_negatives else 'off'}; data: {data.stats}")
        bar = None
        if acc.is_main_process and self.cfg.logging.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
        self.model.train()
        self.distill_counts = _new_distill_counts()
        bad, skipped, stage_t0, losses = 0, 0, time.time(), []
        unproven = None  # newest checkpoint whose weights have not yet given a finite loss: never prune for it
        start_norm = self._weight_norm()  # weights that outgrow it WEIGHT_BLOWUP-fold have exploded: never saved
        for step in range(start, total):
            t0 = time.time()
            stats = self.train_step(st, data, collator, loss_fn, optimizer, scheduler, step)
            if stats is None:
                bad, skipped = bad + 1, skipped + 1
                self._log_line(f"{name} step {step + 1}: non-finite loss, step skipped ({bad} in a row)")
                if bad >= self.cfg.max_bad_steps:
                    raise self._diverged(name, st, f"{bad} non-finite losses in a row up to step {step + 1} "
                                         f"(max_bad_steps={self.cfg.max_bad_steps}), no checkpoint saved during "
                                         f"them", unproven)
            else:
                bad = 0
                if unproven is not None and acc.is_main_process:  # its weights gave a finite loss: now prune
                    ckpt.prune(stage_dir, self.cfg.keep_last, upto=unproven)
                unproven = None
            self.global_step += 1
            dt = max(time.time() - t0, 1e-9)
            if stats is not None:
                losses.append(stats["loss"])
                row = {"event": "step", "stage": name, "step": step + 1, "global_step": self.global_step,
                       "lr": scheduler.get_last_lr()[0], "seq_per_s": stats["sequences"] * acc.num_processes / dt,
                       "tok_per_s": stats["tokens"] * acc.num_processes / dt, **stats}
                if (step + 1) % self.cfg.logging.log_every == 0 or step + 1 == total:
                    self.tracker.log(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.2f}")
            if bar is not None:
                bar.update(1)
            state = {"stage": name, "step": step + 1, "global_step": self.global_step, "total_steps": total}
            if st.save_every and (step + 1) % st.save_every == 0 and step + 1 < total:
                if bad:  # the weights are those that just gave non-finite losses: a checkpoint of them is no use
                    self._log_line(f"{name} step {step + 1}: checkpoint not saved (non-finite losses in a row)")
                else:
                    self._check_weights(name, st, step + 1, start_norm)
                    unproven = os.path.join(stage_dir, f"checkpoint-{step + 1}")
                    self.save(unproven, optimizer, scheduler, state)
        if bar is not None:
            bar.close()
        if bad:
            self._log_line(f"{name}: WARNING the last {bad} steps had non-finite losses; final weights are those "
                           f"of step {total - bad}")
        self._check_weights(name, st, total, start_norm)
        self.save(final_dir, None, None, {"stage": name, "step": total, "global_step": self.global_step,
                                          "total_steps": total, "complete": True})
        elapsed = time.time() - stage_t0
        summary = {"event": "stage_summary", "stage": name, "steps": total - start, "skipped_steps": skipped,
                   "seconds": round(elapsed, 2), "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None, "data": data.stats}
        if self.cfg.loss.distill_weight > 0:
            summary["distill"] = dict(self.distill_counts)
            dc = self.distill_counts
            self._log_line(f"{name}: distillation on {dc['batches']} micro-batches ({dc['examples']} examples); "
                           f"skipped {dc['skipped_batches']} micro-batches without teacher scores, "
                           f"{dc['unscored_examples']} unscored examples left out (this process)")
            if dc["batches"] == 0:
                self._log_line(f"{name}: WARNING loss.distill_weight={self.cfg.loss.distill_weight} but no example "
                               f"carried teacher scores (set fields.positive_scores/negative_scores in the specs)")
        self.tracker.log(summary)
        self._log_line(f"{name} done: {summary['steps']} steps in {elapsed:.1f}s, loss "
                       f"{summary['first_loss'] if losses else float('nan'):.4f} -> "
                       f"{summary['last_loss'] if losses else float('nan'):.4f}, skipped {skipped}")

    def _weight_norm(self) -> float:
        """Norm of the trainable weights as the processes hold them (ZeRO-3: partitions; else copies), summed over
        processes: only ever compared with itself within one stage and launch."""
        acc = self.accelerator
        sq = torch.zeros(1, device=acc.device)
        for p in self.model.parameters():
            if p.requires_grad:
                t = getattr(p, "ds_tensor", None)
                sq += (p.data if t is None else t).detach().float().pow(2).sum()
        return float(acc.reduce(sq, reduction="sum").sqrt())

    def _check_weights(self, name: str, st: StageConfig, step: int, start_norm: float) -> None:
        """Before a save: weights that are non-finite or exploded (a too-high learning rate gives one more finite,
        meaningless loss before the NaNs) stop the run instead of being saved over good checkpoints."""
        norm = self._weight_norm()
        if not math.isfinite(norm) or norm > WEIGHT_BLOWUP * max(start_norm, 1.0):
            raise self._diverged(name, st, f"the trainable weights exploded at step {step} (norm {norm:.3g}, "
                                 f"{start_norm:.3g} at the start of the stage), not saved", None)

    def _diverged(self, name: str, st: StageConfig, what: str, unproven: Optional[str]) -> TrainingError:
        """The divergence error: names the last good checkpoint and the resume line that continues from it with a
        lower learning rate. ``unproven``: a checkpoint saved since the last finite loss; its weights are the ones
        that gave the streak, so the way back starts from the one before it."""
        stage_dir = os.path.join(self.out, name)
        good = [c for c in ckpt.checkpoints(stage_dir) if c != unproven and ckpt.verify(c) is None]
        key = f"stage_defs.{name}.learning_rate"
        fix = f"resume=true {key}={st.learning_rate / 10:g} resume_changes=[{key}]"
        if unproven is not None:
            move = f"mv {unproven} {unproven}.nonfinite && "
            first = (f"{unproven} was saved just before, with the weights that gave these losses; " +
                     (f"the last good checkpoint is {good[-1]}. " if good else "the stage restarts from its beginning. "))
        else:
            move, first = "", (f"The last good checkpoint is {good[-1]}. " if good else
                               f"{name} has no good checkpoint: it restarts from its beginning. ")
        return TrainingError(f"{name}: {what}; stopped. {first}"
                             f"Continue with a lower learning rate: {move}{fix} (the learning rate is now "
                             f"{st.learning_rate:g}; or check the data).")

    def save(self, folder: str, optimizer, scheduler, state: Dict[str, Any]) -> None:
        """Save a checkpoint (``optimizer`` None: a stage's final weights). No pruning here: ``run_stage`` prunes
        once a later step proves the new checkpoint's weights good."""
        from accelerate.utils import gather_object

        acc = self.accelerator
        if ds_utils.is_deepspeed(acc):
            return ds_utils.save(self, folder, optimizer, state)
        acc.wait_for_everyone()
        weights = self.embedder.trainable_state_dict()
        rngs = gather_object([ckpt.rng_state()]) if acc.num_processes > 1 else None  # every rank's (a collective)
        # a full disk stops every rank, not only the one that writes
        on_main(acc, lambda: ckpt.save_checkpoint(
            folder, embedder=self.embedder, optimizer=optimizer.optimizer if optimizer is not None else None,
            scheduler=scheduler.scheduler if scheduler is not None else None, state=state, weights=weights,
            rng_states=rngs), ckpt.DiskFullError)

    # ---- one optimizer step --------------------------------------------------------------------------------------
    def train_step(self, st: StageConfig, data, collator: Collator, loss_fn, optimizer, scheduler,
                   step: int) -> Optional[Dict[str, float]]:
        acc = self.accelerator
        ga = st.gradient_accumulation_steps
        totals = {"loss": 0.0, "accuracy": 0.0, "tokens": 0, "sequences": 0}
        distilled = self.distill_counts["examples"]
        finite = True
        for micro in range(ga):
            batch = collator(data.batch(step * ga + micro)).to(acc.device)
            totals["tokens"] += batch.num_tokens
            totals["sequences"] += batch.num_sequences
            sync = micro == ga - 1  # DDP: no_sync before the last micro-batch; DeepSpeed: one engine step
            if st.grad_cache_chunk_size > 0:
                from .gradcache import grad_cache_backward

                out = grad_cache_backward(self, batch, st, loss_fn, scale=1.0 / ga, sync=sync)
                if not torch.isfinite(out.loss.detach()):  # GradCache already agreed on this across ranks
                    finite = False
                    break
            else:
                with sync_context(acc, self.model, sync):
                    with acc.autocast():
                        out = self.compute_loss(batch, st, loss_fn)
                    ok = acc.reduce(torch.isfinite(out.loss.detach()).float().reshape(1), reduction="sum")
                    if ok.item() < acc.num_processes:
                        finite = False
                        break
                    acc.backward(out.loss / ga)
            totals["loss"] += out.loss.item() / ga
            totals["accuracy"] += out.accuracy.item() / ga
        if not finite:
            optimizer.zero_grad(set_to_none=True)
            ds_utils.discard_grads(acc)
            return None
        params = [p for p in self.model.parameters() if p.requires_grad]
        if ds_utils.is_deepspeed(acc):  # the engine already clipped and stepped in the last backward
            grad_norm = ds_utils.grad_norm(acc)
        elif st.max_grad_norm > 0:
            grad_norm = acc.clip_grad_norm_(params, st.max_grad_norm)
        else:
            grad_norm = torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        if self.cfg.loss.distill_weight > 0:
            totals["distill_examples"] = self.distill_counts["examples"] - distilled
        return totals

    def embed_batch(self, batch: Batch):
        return self.model(**batch.queries), self.model(**batch.docs)

    def compute_loss(self, batch: Batch, st: StageConfig, loss_fn, q=None, d=None) -> LossOutput:
        """Loss from a batch (or from precomputed embeddings ``q``/``d``, as GradCache does)."""
        if q is None:
            q, d = self.embed_batch(batch)
        offset, docs, doc_keys = 0, d, batch.doc_keys
        if st.in_batch_negatives and self.cfg.loss.cross_device_negatives and self.accelerator.num_processes > 1:
            docs = all_gather_with_grad(d)
            doc_keys = all_gather_no_grad(batch.doc_keys)
            offset = self.accelerator.process_index * d.shape[0]
        out = loss_fn(q, docs, batch.group, offset, batch.pos_keys, doc_keys)
        if self.cfg.loss.distill_weight > 0:
            kl = self._distill(q, d, batch)
            if kl is not None:
                out = LossOutput(loss=out.loss + self.cfg.loss.distill_weight * kl, accuracy=out.accuracy,
                                 logits=out.logits)
        return out

    def _distill(self, q, d, batch: Batch) -> Optional[torch.Tensor]:
        """KL towards the teacher over the examples that carry scores (NaN rows do not); None, counted as a skipped
        micro-batch, when none does. Each process uses its own groups: no gather is needed."""
        c, ts = self.distill_counts, batch.teacher_scores
        rows = torch.isfinite(ts).all(dim=1) if ts is not None else None
        n = int(rows.sum()) if rows is not None else 0
        c["examples"] += n
        c["unscored_examples"] += q.shape[0] - n
        if n == 0:
            c["skipped_batches"] += 1
            return None
        c["batches"] += 1
        own = d.view(q.shape[0], batch.group, -1)
        return distill_kl(q[rows], own[rows], ts[rows], self.cfg.loss.temperature, self.cfg.loss.distill_temperature)
