"""The training loop: stages in sequence on accelerate, with checkpoints, exact resume and metrics.

Deliberately not a fork of HF Trainer: one loop, readable top to bottom. What changes per concept lives elsewhere
(model: ``nvembed.model``; the loss of a batch: ``objective.py``; plain vs DeepSpeed preparing, stepping, saving and
loading: ``backend.py``; evaluation: ``evaluation.py``; the run folder: ``nvembed.rundir``; checkpoints:
``checkpoint.py``; GradCache: ``gradcache.py``; metrics: ``tracking.py``). Only this file knows the Trainer.
"""

from __future__ import annotations

import functools
import math
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from ..config import RunConfig, StageConfig, to_dict
from ..errors import UserError
from ..preflight import load_stage, load_stages
from ..rundir import RunDir
from . import checkpoint as ckpt
from . import deepspeed_utils as ds_utils
from .backend import make_backend
from .collate import Collator
from .distributed import on_main, sync_context
from .objective import ContrastiveObjective
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


@dataclass
class _StageProgress:
    """What the step loop of one stage keeps between steps."""

    start_norm: float
    """Trainable weights' norm at the start: weights that outgrow it WEIGHT_BLOWUP-fold have exploded."""
    bad: int = 0
    """Non-finite steps in a row up to now."""
    skipped: int = 0
    """Non-finite (skipped) steps in this launch."""
    unproven: Optional[str] = None
    """Newest checkpoint whose weights have not yet given a finite loss: never prune for it."""
    losses: List[float] = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: RunConfig, specs_root: str = "data_specs"):
        self.cfg = cfg
        self.specs_root = specs_root
        self.out = cfg.output_dir
        self.run_dir = RunDir(cfg.output_dir)
        self.accelerator = None
        self.embedder = None
        self.backend = None  # PlainBackend / DeepSpeedBackend, chosen once in setup
        self.evaluation = None
        self.tracker: Optional[Tracker] = None
        self.global_step = 0
        self._data: Dict[str, Any] = {}  # each stage's data, loaded and checked in setup before the model
        self._resume_from: Dict[str, Optional[str]] = {}  # stage -> verified folder it resumes from (resume=true)

    # ---- setup ---------------------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate.utils import set_seed

        from ..model import build_embedder
        from .evaluation import Evaluation  # local: evaluation pulls in sklearn/scipy

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
        done = [n for n, src in self._resume_from.items() if src == self.run_dir.stage_final(n)]
        self._data = load_stages(self.cfg, self.specs_root, process_index=acc.process_index,
                                 num_processes=acc.num_processes, log=self._log_line, skip=done)
        set_seed(self.cfg.seed)
        with ds_utils.model_init_context(acc):
            self.embedder = build_embedder(self.cfg.model, seed=self.cfg.seed)
        self.backend = make_backend(acc, self.embedder)
        if self.cfg.init_from:
            self.backend.load_weights(self.cfg.init_from)  # zero3_init_flag: already partitioned
        self.backend.prepare_model()  # DeepSpeed: engine built in the first stage
        if acc.is_main_process:
            os.makedirs(self.out, exist_ok=True)
            plain = scrub(to_dict(self.cfg))
            OmegaConf.save(OmegaConf.create(plain), self.run_dir.config)
            if not self.run_dir.is_run():
                ckpt.write_json_atomic(self.run_dir.marker,
                                       {"nvembed": True, "stages": list(self.cfg.stages), "started": time.time()})
        self.tracker = Tracker(self.out, self.cfg.logging, scrub(to_dict(self.cfg)), enabled=acc.is_main_process,
                               resume_after=resume_after)
        self.evaluation = Evaluation(self.cfg, self.run_dir, accelerator=acc, model=self.embedder,
                                     sharded=self.backend.sharded, tracker=self.tracker, log=self._log_line)

    def _resume_points(self) -> Dict[str, int]:
        """Step each stage resumes at, from verified folders (:func:`checkpoint.find_resume_point`: broken ones are
        named and skipped). Decided once on the main process and shared, so every rank loads the same checkpoint and
        an error stops every rank."""
        self._resume_from = on_main(
            self.accelerator, lambda: {name: ckpt.find_resume_point(self.run_dir.stage(name))
                                       for name in self.cfg.stages}, ckpt.RunDirError)
        return {name: (ckpt.read_state(src)["step"] if src else 0) for name, src in self._resume_from.items()}

    # ---- the run -------------------------------------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        self.setup()
        acc = self.accelerator
        self.evaluation.evaluate("untrained", self.global_step)
        for name in self.cfg.stages:
            self.run_stage(name)
            self.evaluation.evaluate(f"after_{name}", self.global_step)
        result = {"output_dir": self.out}
        if acc.is_main_process:
            plot_loss_curves(self.out)
            result["table"] = self.evaluation.report()
        if self.cfg.export_final:
            from ..export import export_model

            acc.wait_for_everyone()
            with self.backend.full_weights() as model:  # ZeRO-3: full weights for the export
                if acc.is_main_process:
                    export_model(model, self.run_dir.final, self.cfg)
            result["final"] = self.run_dir.final
        acc.wait_for_everyone()
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

        st, acc, final_dir = self.cfg.stage_defs[name], self.accelerator, self.run_dir.stage_final(name)
        source = self._resume_from.get(name) if self.cfg.resume else None
        if source == final_dir:
            # finished earlier: its weights are the starting point of the next stage
            self.backend.load_weights(final_dir)
            self.global_step = ckpt.read_state(final_dir)["global_step"]
            self._log_line(f"{name}: already complete, skipped")
            return
        data = self._stage_data(st, name)
        total = st.max_steps or max(1, math.ceil(st.epochs * data.steps_per_epoch / st.gradient_accumulation_steps))
        # DeepSpeed: engine (first stage) or fresh optimizer state on it (later stages)
        optimizer, scheduler = self.backend.prepare_stage(st, total)
        # per-stage seed (after the DeepSpeed engine is built, which draws random numbers): dropout is then the same
        # under any launcher and for a stage run alone; a resume below restores the saved RNG states instead
        set_seed((self.cfg.seed + zlib.crc32(name.encode())) % 2**32)
        if acc.is_main_process:
            ckpt.clean_temporaries(self.run_dir.stage(name))
        start = 0 if source is None else self._resume(name, st, source, optimizer, scheduler, total)
        collator = Collator(self.embedder.tokenizer, self.cfg.model.query_template, st.query_max_length,
                            st.doc_max_length, st.num_hard_negatives, self.cfg.model.add_eos,
                            self.cfg.model.pooling.exclude_instruction)
        objective = ContrastiveObjective(self.cfg.loss, st, process_index=acc.process_index,
                                         num_processes=acc.num_processes)
        self._log_line(f"{name}: {total} steps x {st.batch_size} queries x {acc.num_processes} processes "
                       f"x {st.gradient_accumulation_steps} accumulation, {st.num_hard_negatives} hard negatives, "
                       f"in-batch negatives {'on' if st.in_batch_negatives else 'off'}; data: {data.stats}")
        stage_t0 = time.time()
        progress = self._train_steps(name, st, data, collator, objective, optimizer, scheduler, start, total)
        if progress.bad:
            self._log_line(f"{name}: WARNING the last {progress.bad} steps had non-finite losses; final weights are "
                           f"those of step {total - progress.bad}")
        self._check_weights(name, st, total, progress.start_norm)
        self.backend.save(final_dir, None, None, {"stage": name, "step": total, "global_step": self.global_step,
                                                  "total_steps": total, "complete": True})
        self._summarize(name, data, objective, progress, total - start, time.time() - stage_t0)

    def _resume(self, name: str, st: StageConfig, source: str, optimizer, scheduler, total: int) -> int:
        """Load a verified checkpoint of the stage; returns the step it continues from."""
        state = self.backend.load(source, optimizer, scheduler)
        start, self.global_step = state["step"], state["global_step"]
        self._log_line(f"{name}: resumed from {source} at step {start}/{total}")
        sched = scheduler.scheduler  # the LambdaLR (plain or DeepSpeed), built on the optimizer it steps
        if ckpt.rebase_schedule(sched.optimizer, sched, st.learning_rate, st.weight_decay):
            self._log_line(f"{name}: learning rate {st.learning_rate:g} (weight decay {st.weight_decay:g}) from "
                           f"the config in force from step {start + 1} (resume_changes); lr now "
                           f"{sched.get_last_lr()[0]:.3g}")
        return start

    def _train_steps(self, name: str, st: StageConfig, data, collator: Collator, objective, optimizer, scheduler,
                     start: int, total: int) -> _StageProgress:
        """The stage's optimizer steps from ``start``: logging, checkpoints, non-finite steps skipped (and the
        stage stopped after ``max_bad_steps`` in a row)."""
        acc = self.accelerator
        bar = None
        if acc.is_main_process and self.cfg.logging.progress_bar:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
        self.backend.model.train()
        p = _StageProgress(start_norm=self._weight_norm())
        for step in range(start, total):
            t0 = time.time()
            stats = train_step(self.backend, objective, st, data, collator, optimizer, scheduler, step)
            if stats is None:
                p.bad, p.skipped = p.bad + 1, p.skipped + 1
                self._log_line(f"{name} step {step + 1}: non-finite loss, step skipped ({p.bad} in a row)")
                if p.bad >= self.cfg.max_bad_steps:
                    raise self._diverged(name, st, f"{p.bad} non-finite losses in a row up to step {step + 1} "
                                         f"(max_bad_steps={self.cfg.max_bad_steps}), no checkpoint saved during "
                                         f"them", p.unproven)
            else:
                p.bad = 0
                if p.unproven is not None and acc.is_main_process:  # its weights gave a finite loss: now prune
                    ckpt.prune(self.run_dir.stage(name), self.cfg.keep_last, upto=p.unproven)
                p.unproven = None
            self.global_step += 1
            dt = max(time.time() - t0, 1e-9)
            if stats is not None:
                p.losses.append(stats["loss"])
                row = {"event": "step", "stage": name, "step": step + 1, "global_step": self.global_step,
                       "lr": scheduler.get_last_lr()[0], "seq_per_s": stats["sequences"] * acc.num_processes / dt,
                       "tok_per_s": stats["tokens"] * acc.num_processes / dt, **stats}
                if (step + 1) % self.cfg.logging.log_every == 0 or step + 1 == total:
                    self.tracker.log(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{stats['loss']:.4f}", acc=f"{stats['accuracy']:.2f}")
            if bar is not None:
                bar.update(1)
            if st.save_every and (step + 1) % st.save_every == 0 and step + 1 < total:
                if p.bad:  # the weights are those that just gave non-finite losses: a checkpoint of them is no use
                    self._log_line(f"{name} step {step + 1}: checkpoint not saved (non-finite losses in a row)")
                else:
                    self._check_weights(name, st, step + 1, p.start_norm)
                    p.unproven = self.run_dir.checkpoint(name, step + 1)
                    self.backend.save(p.unproven, optimizer, scheduler, {
                        "stage": name, "step": step + 1, "global_step": self.global_step, "total_steps": total})
        if bar is not None:
            bar.close()
        return p

    def _summarize(self, name: str, data, objective: ContrastiveObjective, p: _StageProgress, steps: int,
                   elapsed: float) -> None:
        losses = p.losses
        summary = {"event": "stage_summary", "stage": name, "steps": steps, "skipped_steps": p.skipped,
                   "seconds": round(elapsed, 2), "first_loss": losses[0] if losses else None,
                   "last_loss": losses[-1] if losses else None, "data": data.stats}
        if objective.distills:
            dc = objective.counts
            summary["distill"] = dc.as_dict()
            self._log_line(f"{name}: distillation on {dc.batches} micro-batches ({dc.examples} examples); "
                           f"skipped {dc.skipped_batches} micro-batches without teacher scores, "
                           f"{dc.unscored_examples} unscored examples left out (this process)")
            if dc.batches == 0:
                self._log_line(f"{name}: WARNING loss.distill_weight={self.cfg.loss.distill_weight} but no example "
                               f"carried teacher scores (set fields.positive_scores/negative_scores in the specs)")
        self.tracker.log(summary)
        self._log_line(f"{name} done: {summary['steps']} steps in {elapsed:.1f}s, loss "
                       f"{summary['first_loss'] if losses else float('nan'):.4f} -> "
                       f"{summary['last_loss'] if losses else float('nan'):.4f}, skipped {p.skipped}")

    def _weight_norm(self) -> float:
        """Norm of the trainable weights as the processes hold them (ZeRO-3: partitions; else copies), summed over
        processes: only ever compared with itself within one stage and launch."""
        acc = self.accelerator
        sq = torch.zeros(1, device=acc.device)
        for p in self.backend.model.parameters():
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
        good = [c for c in self.run_dir.checkpoints(name) if c != unproven and ckpt.verify(c) is None]
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


# ---- one optimizer step ----------------------------------------------------------------------------------------------
def train_step(backend, objective: ContrastiveObjective, st: StageConfig, data, collator: Collator, optimizer,
               scheduler, step: int) -> Optional[Dict[str, float]]:
    """One optimizer step over ``st.gradient_accumulation_steps`` micro-batches (GradCache chunks if the stage asks):
    its stats, or None when a loss was non-finite on any process (gradients discarded, nothing stepped)."""
    acc, model = backend.acc, backend.model
    ga = st.gradient_accumulation_steps
    totals = {"loss": 0.0, "accuracy": 0.0, "tokens": 0, "sequences": 0}
    distilled = objective.counts.examples
    finite = True
    for micro in range(ga):
        batch = collator(data.batch(step * ga + micro)).to(acc.device)
        totals["tokens"] += batch.num_tokens
        totals["sequences"] += batch.num_sequences
        sync = micro == ga - 1  # DDP: no_sync before the last micro-batch; DeepSpeed: one engine step
        if st.grad_cache_chunk_size > 0:
            from .gradcache import grad_cache_backward

            out = grad_cache_backward(objective, model, acc, batch, st.grad_cache_chunk_size, scale=1.0 / ga,
                                      sync=sync)
            if not torch.isfinite(out.loss.detach()):  # GradCache already agreed on this across ranks
                finite = False
                break
        else:
            with sync_context(acc, model, sync):
                with acc.autocast():
                    out = objective(model, batch)
                ok = acc.reduce(torch.isfinite(out.loss.detach()).float().reshape(1), reduction="sum")
                if ok.item() < acc.num_processes:
                    finite = False
                    break
                acc.backward(out.loss / ga)
        totals["loss"] += out.loss.item() / ga
        totals["accuracy"] += out.accuracy.item() / ga
    if not finite:
        backend.discard(optimizer)
        return None
    grad_norm = backend.step(optimizer, scheduler, st.max_grad_norm)
    totals["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
    if objective.distills:
        totals["distill_examples"] = objective.counts.examples - distilled
    return totals
