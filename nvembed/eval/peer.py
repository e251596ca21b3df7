"""Quality per compute against the sentence-transformers peer (issue #16): a recipe's nvembed run and a plain
sentence-transformers run trained for the same wall-clock seconds, both evaluated on the same suite, over seeds.

The peer is what a sentence-transformers user gets for this job with its defaults: the recipe's backbone and layers
with causal attention (a decoder's own), mean pooling (over every token, the instruction's too, no EOS appended),
``MultipleNegativesRankingLoss`` (in-batch negatives plus the hard negatives; its default scale 20, i.e. temperature
0.05 as in the demo recipe), the recipe's LoRA (``nvembed.model.apply_lora``: r, alpha, dropout, target modules), and
the very batches of the recipe's first stage (nvembed's own batcher at the run's seed: same examples, same hard
negatives, same instructions, same order), at that stage's batch size and learning rate. It trains until the nvembed
run's training seconds (its ``stage_summary`` events, checkpoint saves included) are spent; its learning rate decays
linearly in wall-clock time to zero at the budget (sentence-transformers' default linear schedule, with time for
steps: the step count is not known beforehand).

Layout::

    OUT/nvembed/seed=S/                 the nvembed run (train/train.py), its export final/
    OUT/nvembed/seed=S/peer_eval.json   suite result of final/
    OUT/peer/seed=S/model/              the peer (LoRA merged): a plain sentence-transformers folder
    OUT/peer/seed=S/train.json          budget, seconds, steps, losses; written last, it marks the peer finished
    OUT/peer/seed=S/eval.json           suite result of model/
    OUT/peer.json, OUT/peer.md          per seed, then mean ± sample std over seeds and of the difference

Re-running continues: finished runs and evaluations are kept (an unfinished nvembed run is resumed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from transformers import TrainerCallback

from .experiment import (TYPES, ExperimentError, cell, check_extra, check_seeds, evaluate_export, load_recipe,
                         mean_std, read_json, resolve_suite, sweep_command, write_json)

NVEMBED, PEER = "nvembed", "peer"
EVAL_FILE = "peer_eval.json"
BUDGET_SLACK_S = 0.5
"""A finished peer is kept when its budget differs from the nvembed run's seconds by at most this much."""


# ---- the nvembed side --------------------------------------------------------------------------------------------
def training_time(run_dir: str) -> Optional[Tuple[float, int]]:
    """(training seconds, optimizer steps) of a finished run: the sum over its stages of the last ``stage_summary``
    event of each. None while a stage has none or no export exists. A stage resumed after a kill logs only the part
    it ran after the resume: its steps are then fewer than the stage's, and the table shows it."""
    from ..rundir import RunDir
    from ..training.tracking import read_metrics

    rd = RunDir(run_dir)
    if not os.path.isfile(rd.config) or not os.path.isfile(os.path.join(rd.final, "config.json")):
        return None
    stages = list(rd.load_config().stages)
    last = {r["stage"]: r for r in read_metrics(run_dir) if r.get("event") == "stage_summary"}
    if any(s not in last for s in stages):
        return None
    return sum(float(last[s]["seconds"]) for s in stages), sum(int(last[s]["steps"]) for s in stages)


def train_nvembed(recipe: str, sweep_dir: str, seeds: Sequence[int], extra: Sequence[str],
                  log: Callable[[str], None]) -> List[int]:
    """Train (or resume) the recipe for the seeds whose run in ``SWEEP_DIR/seed=S`` has not finished; returns the
    seeds still unfinished afterwards (their messages are above)."""
    from ..rundir import RunDir

    todo = [s for s in seeds if training_time(os.path.join(sweep_dir, f"seed={s}")) is None]
    if todo:
        started = any(RunDir(os.path.join(sweep_dir, f"seed={s}")).is_run() for s in todo)
        cmd = sweep_command(recipe, sweep_dir, todo, list(extra), resume=started)
        log("[peer] " + " ".join(cmd))
        code = subprocess.run(cmd).returncode
        if code != 0:
            log(f"[peer] nvembed training exited with {code}")
    return [s for s in todo if training_time(os.path.join(sweep_dir, f"seed={s}")) is None]


# ---- the sentence-transformers side ------------------------------------------------------------------------------
Rows = Callable[[], Iterator[Dict[str, str]]]


def peer_rows(cfg, stage: str, log: Callable[[str], None]) -> Tuple[Rows, List[str]]:
    """The stage's batches as nvembed's trainer draws them (:func:`nvembed.preflight.load_stage`, the run's seed),
    flattened into sentence-transformers rows in order: ``anchor`` (instruction prompt + query), ``positive`` and one
    ``negative_i`` column per hard negative. Returns (a function giving the endless rows from step 0, column
    names)."""
    from ..model import build_prompt
    from ..paths import specs_root
    from ..preflight import load_stage

    st = cfg.stage_defs[stage]
    data = load_stage(cfg, stage, specs_root(), log=log)
    template = cfg.model.query_template
    negs = [f"negative_{i + 1}" for i in range(st.num_hard_negatives)]

    def rows() -> Iterator[Dict[str, str]]:
        step = 0
        while True:
            for ex in data.batch(step):
                prompt = build_prompt(ex.instruction, template)
                doc = prompt if ex.symmetric else ""  # symmetric tasks (STS) put the instruction on both sides
                row = {"anchor": prompt + ex.query, "positive": doc + ex.positive}
                row.update({c: doc + t for c, t in zip(negs, ex.negatives)})
                yield row
            step += 1

    return rows, ["anchor", "positive"] + negs


def build_peer(cfg, folder: str):
    """The recipe's backbone and layers, causal, saved to ``folder`` as a plain transformers folder, loaded as a
    sentence-transformers model (Transformer + mean Pooling) with the recipe's LoRA on the transformer."""
    import dataclasses

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from ..model import apply_lora, load_backbone, load_tokenizer

    m = dataclasses.replace(cfg.model, bidirectional=False, compile=False)
    torch.manual_seed(cfg.seed)  # as build_embedder: a random-init backbone is the nvembed run's own
    tok = load_tokenizer(m)
    backbone = load_backbone(m, vocab_size=len(tok))
    backbone.save_pretrained(folder)
    # sentence-transformers >= 6 wraps every text in the folder's chat template (SmolLM2's adds a ~30-token system
    # prompt, docs/benchmarks.md): the peer embeds the texts themselves, as nvembed does
    tok.chat_template = None
    tok.save_pretrained(folder)
    if os.path.exists(os.path.join(folder, "chat_template.jinja")):
        os.remove(os.path.join(folder, "chat_template.jinja"))
    st = cfg.stage_defs[cfg.stages[0]]  # one length for queries and documents: sentence-transformers has one
    tr = Transformer(folder, max_seq_length=max(st.query_max_length, st.doc_max_length))
    model = SentenceTransformer(modules=[tr, Pooling(tr.get_embedding_dimension(), "mean")], device="cpu")
    tr.model = apply_lora(tr.model, m)
    return model


class TimeBudget(TrainerCallback):
    """Stops training when the next step would end past ``seconds`` (on average), so the peer trains the budget
    to within half a step; gives the learning-rate factor of a linear decay in wall-clock time."""

    def __init__(self, seconds: float, warmup_steps: int, log: Callable[[str], None] = print, log_every: int = 10):
        self.budget, self.warmup, self.log, self.log_every = float(seconds), int(warmup_steps), log, log_every
        self.t0: Optional[float] = None
        self.elapsed, self.steps, self.last_step, self.losses = 0.0, 0, 0.0, []

    def lr_factor(self, step: int) -> float:
        warm = min(1.0, step / self.warmup) if self.warmup else 1.0
        spent = 0.0 if self.t0 is None else time.perf_counter() - self.t0
        return warm * max(0.0, 1.0 - spent / self.budget)

    def on_train_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter() - self.t0
        self.elapsed, self.steps, self.last_step = now, state.global_step, now - self.elapsed
        if self.elapsed + 0.5 * self.elapsed / max(1, self.steps) >= self.budget:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if state.global_step % self.log_every == 0:
                self.log(f"[peer] step {state.global_step}: {self.elapsed:.1f}s of {self.budget:.1f}s, "
                         f"loss {self.losses[-1]:.4f}")


def train_peer(cfg, budget_s: float, out_dir: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """Train the peer for ``budget_s`` wall-clock seconds on the first stage's batches; save it to
    ``out_dir/model`` and return (and write, last) ``out_dir/train.json``."""
    import torch
    from datasets import DatasetInfo, Features, IterableDataset, Value
    from datasets.iterable_dataset import ExamplesIterable
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import PrinterCallback

    from ..training.trainer import resolve_precision

    stage = cfg.stages[0]
    st = cfg.stage_defs[stage]
    os.makedirs(out_dir, exist_ok=True)
    work = os.path.join(out_dir, "work")
    shutil.rmtree(work, ignore_errors=True)
    rows, columns = peer_rows(cfg, stage, log)  # data read before the clock starts, as nvembed's setup does
    model = build_peer(cfg, os.path.join(work, "backbone"))
    clock = TimeBudget(budget_s, st.warmup_steps, log)

    class _Trainer(SentenceTransformerTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = LambdaLR(optimizer or self.optimizer, clock.lr_factor)
            return self.lr_scheduler

    precision = resolve_precision(cfg.precision)  # the nvembed run's mixed precision on this machine
    args = SentenceTransformerTrainingArguments(
        output_dir=os.path.join(work, "trainer"), per_device_train_batch_size=st.batch_size,
        learning_rate=st.learning_rate, weight_decay=st.weight_decay, max_grad_norm=st.max_grad_norm,
        max_steps=10**9,  # the clock stops it
        save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=cfg.seed,
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        dataloader_drop_last=True)
    # built directly, not with from_generator: that one hashes the generator (and the memory-mapped data it holds)
    data = IterableDataset(ExamplesIterable(lambda: enumerate(rows()), {}),
                           info=DatasetInfo(features=Features({c: Value("string") for c in columns})))
    trainer = _Trainer(model=model, args=args, train_dataset=data, loss=MultipleNegativesRankingLoss(model),
                       callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # one dict per step on stdout; the clock logs every 10 steps
    log(f"[peer] training sentence-transformers for {budget_s:.1f}s: batch {st.batch_size}, lr {st.learning_rate:g}, "
        f"{len(columns) - 2} hard negatives, {precision} precision")
    trainer.train()
    tr = model[0]
    tr.model = tr.model.merge_and_unload()  # a plain transformers model again: the folder loads without peft
    final, tmp = os.path.join(out_dir, "model"), os.path.join(out_dir, "model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp, create_model_card=False)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)
    info = {"budget_seconds": budget_s, "seconds": round(clock.elapsed, 2), "steps": clock.steps,
            "seconds_per_step": round(clock.elapsed / max(1, clock.steps), 3),
            "last_step_seconds": round(clock.last_step, 3),
            "first_loss": clock.losses[0] if clock.losses else None,
            "last_loss": clock.losses[-1] if clock.losses else None, "stage": stage, "batch_size": st.batch_size,
            "learning_rate": st.learning_rate, "precision": precision}
    write_json(os.path.join(out_dir, "train.json"), info)
    log(f"[peer] trained {clock.steps} steps in {clock.elapsed:.1f}s (budget {budget_s:.1f}s)")
    return info


def ensure_peer(cfg, budget_s: float, out_dir: str, log: Callable[[str], None]) -> Dict[str, Any]:
    """The peer of a run: kept when it finished with the same budget, else (re)trained."""
    info = read_json(os.path.join(out_dir, "train.json"))
    same = info is not None and abs(info["budget_seconds"] - budget_s) <= BUDGET_SLACK_S
    if same and os.path.isdir(os.path.join(out_dir, "model")):
        log(f"[peer] {out_dir}: finished earlier, kept")
        return info
    for stale in ("train.json", "eval.json"):
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    return train_peer(cfg, budget_s, out_dir, log)


# ---- evaluation and the table ------------------------------------------------------------------------------------
def scores(result: Dict[str, Any]) -> Dict[str, float]:
    """Suite average and per-type averages, x100."""
    return {k: 100 * v for k, v in result["average"].items()}


def summarize(seeds: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Tuple[Optional[float], Optional[float]]]]:
    """Per score key (``all`` and each task type): mean ± std over seeds of nvembed, of the peer and of the per-seed
    difference nvembed - peer."""
    out: Dict[str, Dict[str, Tuple[Optional[float], Optional[float]]]] = {NVEMBED: {}, PEER: {}, "difference": {}}
    for key in ("all",) + TYPES:
        both = [s for s in seeds if key in s[NVEMBED]["scores"] and key in s[PEER]["scores"]]
        out[NVEMBED][key] = mean_std([s[NVEMBED]["scores"][key] for s in both])
        out[PEER][key] = mean_std([s[PEER]["scores"][key] for s in both])
        out["difference"][key] = mean_std([s[NVEMBED]["scores"][key] - s[PEER]["scores"][key] for s in both])
    return out


def format_table(seeds: Sequence[Dict[str, Any]], summary: Dict[str, Any]) -> str:
    """Markdown: one row per seed and model (scores x100, training seconds and steps), then mean ± sample std over
    seeds for both models and for the per-seed difference."""
    keys = ("all",) + TYPES
    head = ["seed", "model", "train s", "steps"] + ["avg" if k == "all" else k for k in keys]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for s in seeds:
        for who in (NVEMBED, PEER):
            r = s[who]
            cells = [str(s["seed"]), who, f"{r['seconds']:.1f}", str(r["steps"])]
            cells += [f"{r['scores'][k]:.2f}" if k in r["scores"] else "-" for k in keys]
            out.append("| " + " | ".join(cells) + " |")
    n = len(seeds)
    for who, label, sign in ((NVEMBED, f"nvembed (mean ± std, {n} seeds)", False),
                             (PEER, f"peer (mean ± std, {n} seeds)", False),
                             ("difference", "nvembed - peer", True)):
        cells = ["all", label, "", ""] + [cell(summary[who][k], sign) for k in keys]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def run(recipe: str, out_dir: str, *, seeds: Sequence[int], suite: Optional[str] = None, extra: Sequence[str] = (),
        log: Callable[[str], None] = print) -> Dict[str, str]:
    """Train (or continue) both sides for every seed, evaluate, write ``OUT/peer.{json,md}``; returns their paths."""
    from ..rundir import RunDir
    from .suite import load_suite

    check_seeds(seeds)
    check_extra(extra)
    composed = load_recipe(recipe, extra)
    suite = resolve_suite(composed, suite)
    load_suite(suite)  # a bad suite fails before any training
    sweep_dir = os.path.join(out_dir, NVEMBED)
    failed = train_nvembed(recipe, sweep_dir, seeds, extra, log)
    rows: List[Dict[str, Any]] = []
    for seed in (s for s in seeds if s not in failed):
        run_dir = os.path.join(sweep_dir, f"seed={seed}")
        peer_dir = os.path.join(out_dir, PEER, f"seed={seed}")
        seconds, steps = training_time(run_dir)  # type: ignore[misc]
        cfg = RunDir(run_dir).load_config()
        peer = ensure_peer(cfg, seconds, peer_dir, log)
        max_len = cfg.eval.max_length
        nv_res = evaluate_export(RunDir(run_dir).final, suite, os.path.join(run_dir, EVAL_FILE), max_len, log)
        peer_res = evaluate_export(os.path.join(peer_dir, "model"), suite, os.path.join(peer_dir, "eval.json"), max_len, log)
        rows.append({"seed": seed,
                     NVEMBED: {"run": run_dir, "seconds": seconds, "steps": steps, "scores": scores(nv_res),
                               "tasks": {t: 100 * r["main_score"] for t, r in nv_res["tasks"].items()}},
                     PEER: {"model": os.path.join(peer_dir, "model"), "seconds": peer["seconds"],
                            "steps": peer["steps"], "budget_seconds": peer["budget_seconds"],
                            "last_step_seconds": peer["last_step_seconds"], "scores": scores(peer_res),
                            "tasks": {t: 100 * r["main_score"] for t, r in peer_res["tasks"].items()}}})
    summary = summarize(rows)
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "peer.json"), "md": os.path.join(out_dir, "peer.md")}
    write_json(paths["json"], {"recipe": recipe, "extra": list(extra), "suite": suite, "seeds": list(seeds),
                                "runs": rows, "summary": summary})
    caption = (f"Recipe `{recipe}`{' with ' + ' '.join(extra) if extra else ''}, suite `{suite}`. Scores x100 (each "
               f"task's main score, averaged per type). train s: nvembed's stage_summary seconds (every stage, "
               f"checkpoint saves included); the peer's wall-clock training, stopped at that budget.\n\n")
    with open(paths["md"], "w") as f:
        f.write(caption + format_table(rows, summary) + "\n")
    if failed:  # after the table: what finished is not lost
        raise ExperimentError(f"nvembed training failed for seeds {failed} (messages above; runs in {sweep_dir}); "
                        f"{paths['md']} holds the other seeds; re-run the same command to continue")
    return paths
