"""DeepSpeed (ZeRO-1/2/3, offload) glue behind ``backend.DeepSpeedBackend``, used only under DeepSpeed.

Launch: ``accelerate launch --config_file recipes/accelerate/zero3.yaml train/train.py ...`` (see
``recipes/accelerate/README.md``). Every function here is a no-op / plain fallback without DeepSpeed.

Design
    * The engine is built once, in the first stage (``accelerate.prepare(model, optimizer)``): DeepSpeed needs model
      and optimizer together. Each later stage gets a *fresh* optimizer by resetting the engine's optimizer state in
      place (moments and step zeroed, lr / weight decay / clipping of the new stage). Every stage's LR schedule is
      attached to the engine (stepped once per engine step, saved in its checkpoints). Re-initialising an engine on
      an already partitioned module would stack a second set of ZeRO hooks on it.
    * Gradient accumulation is the trainer's own loop: DeepSpeed's ``gradient_accumulation_steps`` is forced to 1
      and every backward but the last of an optimizer step runs with accelerate's ``sync_gradients`` False
      (``distributed.sync_context``), which accelerate passes to the engine as the accumulation boundary. So the
      engine steps exactly once per optimizer step, whatever mixes micro-batches and GradCache chunks.
    * Checkpoints: ``accelerator.save_state`` (sharded model + optimizer + scheduler + per-rank RNG) into the
      trainer's temporary folder, then the trainable weights (gathered) as safetensors, ``state.json``, the manifest
      last (``checkpoint.write_manifest``), then the rename. Resume: ``accelerator.load_state`` with DeepSpeed's
      shard reader swapped for :class:`SafeCheckpointEngine` (``torch.load(weights_only=True)``, DeepSpeed's own
      bookkeeping types allow-listed): a checkpoint folder cannot run code when it is loaded.
    * ZeRO-3: parameters are gathered (``deepspeed.zero.GatheredParameters``) for the trainable weights of a
      checkpoint and for the final export, so ``DIR/final`` holds full weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from typing import Any, Dict, Iterable, List, Optional

import torch

DS_DIR = "deepspeed"


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc is not None and acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int:
    if not is_deepspeed(acc):
        return -1
    return int(acc.state.deepspeed_plugin.zero_stage or 0)


def check_compile(acc, enabled: bool) -> None:
    """``model.compile`` is refused under ZeRO-3: its weight-gathering hooks run inside every layer call, dynamo
    recompiles on each one until it hits its limit and falls back to eager (seen here: 6 smoke steps in 207 s)."""
    if enabled and zero_stage(acc) == 3:
        from ..config import ConfigError

        raise ConfigError("'model.compile=true' does not work with DeepSpeed ZeRO-3 (its parameter-gathering hooks "
                          "cannot be compiled); use ZeRO-2 or DDP, or set model.compile=false")


def engine_of(acc):
    wrapped = getattr(acc, "deepspeed_engine_wrapped", None)
    return wrapped.engine if wrapped is not None else None


# ---- model / optimizer --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def model_init_context(acc):
    """Build the model under DeepSpeed's ``zero.Init`` only where the accelerate config asks for it
    (``zero3_init_flag``). accelerate registers its ZeRO-3 config with transformers whatever the flag, so the backbone
    would be built partitioned anyway, and a ``random_init`` one drawn differently from DDP / one process."""
    plugin = acc.state.deepspeed_plugin if is_deepspeed(acc) else None
    if plugin is None or zero_stage(acc) != 3 or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _fill_config(acc, embedder, st) -> None:
    cfg = acc.state.deepspeed_plugin.deepspeed_config
    cfg["train_micro_batch_size_per_gpu"] = int(st.batch_size)
    cfg["gradient_accumulation_steps"] = 1  # the trainer accumulates (sync_context): one engine step per step
    cfg.pop("train_batch_size", None)
    cfg["gradient_clipping"] = float(st.max_grad_norm)
    acc.gradient_accumulation_steps = 1
    h = embedder.hidden_size
    zero = cfg.setdefault("zero_optimization", {})
    for key, value in (("reduce_bucket_size", h * h), ("stage3_prefetch_bucket_size", int(0.9 * h * h)),
                       ("stage3_param_persistence_threshold", 10 * h)):
        if zero.get(key) == "auto":
            zero[key] = value


def _same_module_calls_on_every_rank(acc, embedder) -> None:
    """ZeRO-3 gathers a module's weights (a collective) at each call of it: length bucketing must then split every
    batch into the same number of backbone calls on every rank, whatever the lengths."""
    if zero_stage(acc) == 3 and acc.num_processes > 1:
        embedder.fixed_bucket_count = True


def prepare_stage(acc, embedder, st, total: int, optimizer=None):
    """(model, optimizer, scheduler) for a stage under DeepSpeed. ``optimizer``: the one an earlier stage returned
    (None in the first): the engine is built on first use, else its optimizer state is reset in place."""
    from accelerate.utils import DeepSpeedSchedulerWrapper
    from transformers import get_scheduler

    engine = engine_of(acc)
    if engine is None:
        _fill_config(acc, embedder, st)
        _same_module_calls_on_every_rank(acc, embedder)
        params = [p for p in embedder.parameters() if p.requires_grad]
        _, optimizer = acc.prepare(embedder, torch.optim.AdamW(params, lr=st.learning_rate,
                                                               weight_decay=st.weight_decay))
        engine = engine_of(acc)
    zero_opt = engine.optimizer
    inner = getattr(zero_opt, "optimizer", zero_opt)
    for s in inner.state.values():  # a later stage: fresh optimizer state on the same engine
        for k, v in s.items():
            if torch.is_tensor(v):
                v.zero_()
            elif k == "step":
                s[k] = 0
    for g in inner.param_groups:
        g["lr"] = g["initial_lr"] = st.learning_rate
        g["weight_decay"] = st.weight_decay
    if hasattr(zero_opt, "clip_grad"):
        zero_opt.clip_grad = float(st.max_grad_norm)
    engine._config.gradient_clipping = float(st.max_grad_norm)
    # every stage's schedule is the engine's: stepped once per engine step, saved in its checkpoints (a LambdaLR
    # passed to accelerate.prepare would not be: accelerate would step it num_processes times per step)
    sched = get_scheduler(st.lr_scheduler, inner, num_warmup_steps=st.warmup_steps, num_training_steps=total)
    engine.lr_scheduler = sched
    scheduler = DeepSpeedSchedulerWrapper(sched, optimizer)
    acc._schedulers = [s for s in acc._schedulers if not isinstance(s, DeepSpeedSchedulerWrapper)] + [scheduler]
    return engine, optimizer, scheduler


def discard_grads(acc) -> None:
    """Drop gradients accumulated by engine micro-steps of a skipped (non-finite) step."""
    engine = engine_of(acc)
    if engine is not None:
        engine.zero_grad()  # module .grad only
        opt = engine.optimizer
        if hasattr(opt, "zero_grad"):
            opt.zero_grad(set_to_none=True)  # ZeRO-3: micro_step_id = 0 and the "epilogue ran" flag cleared
        if hasattr(opt, "micro_step_id"):  # so the next backward overwrites (copies) the partitioned gradients
            opt.micro_step_id = 0
        if hasattr(opt, "_epilogue_ran_this_backward"):
            opt._epilogue_ran_this_backward = False


def grad_norm(acc) -> Optional[float]:
    engine = engine_of(acc)
    if engine is None:
        return None
    n = engine.get_global_grad_norm()
    return float(n) if n is not None else None


# ---- ZeRO-3 gathering ---------------------------------------------------------------------------------------------
def sharded(acc, model) -> bool:
    """True when the model's weights are ZeRO-3 partitions across several processes (after the engine is built,
    or from the start with ``zero3_init_flag``): then every forward is a collective all ranks must join."""
    return acc.num_processes > 1 and any(hasattr(p, "ds_id") for p in model.parameters())


@contextlib.contextmanager
def gathered(acc, params: Iterable[torch.nn.Parameter]):
    """Full (gathered) parameters inside the block under ZeRO-3 on every rank (a collective); else a no-op.
    Changes made inside are discarded (read-only)."""
    if zero_stage(acc) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in params if hasattr(p, "ds_id")], modifier_rank=None):
        yield


def trainable_state_dict(acc, embedder) -> Dict[str, torch.Tensor]:
    """``Embedder.trainable_state_dict`` with full tensors under ZeRO-3 (call on every rank)."""
    trainable = [p for p in embedder.parameters() if p.requires_grad]
    with gathered(acc, trainable):
        return {k: v.clone() for k, v in embedder.trainable_state_dict().items()}


def load_weights(acc, embedder, folder: str) -> None:
    """``Embedder.load_weights`` that also works on ZeRO-3 partitioned parameters (call on every rank)."""
    params = [p for p in embedder.parameters() if hasattr(p, "ds_id")]
    if zero_stage(acc) != 3 or not params:  # not partitioned (yet): every rank loads its own full copy
        embedder.load_weights(folder)
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        if acc.is_main_process:
            embedder.load_weights(folder)


# ---- checkpoints --------------------------------------------------------------------------------------------------
def _estimate_bytes(acc, embedder, weights) -> int:
    """A DeepSpeed checkpoint: the module's full state (every rank's shards together), fp32 master weights and two
    Adam moments per trainable weight, plus our safetensors copy of the trainable weights."""
    from . import checkpoint as ckpt

    module = sum(int(getattr(p, "ds_numel", p.numel())) * p.element_size() for p in embedder.parameters())
    trainable = sum(int(getattr(p, "ds_numel", p.numel())) for p in embedder.parameters() if p.requires_grad)
    return ckpt.estimate_bytes(weights, None, extra=module + 12 * trainable)


def save(acc, embedder, folder: str, optimizer, state: Dict[str, Any]) -> None:
    """Atomic checkpoint under DeepSpeed (every rank calls it): the trainer's protocol with the sharded state. No
    pruning: the trainer prunes once the checkpoint has proved good."""
    from . import checkpoint as ckpt
    from .distributed import on_main

    parent = os.path.dirname(folder.rstrip("/"))
    tmp = os.path.join(parent, f".tmp-{os.path.basename(folder)}-ds")
    weights = trainable_state_dict(acc, embedder)  # a collective under ZeRO-3
    need = _estimate_bytes(acc, embedder, weights)

    def prepare():
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        ckpt.check_free_space(parent, folder, need)
        os.makedirs(tmp)

    on_main(acc, prepare, ckpt.DiskFullError)  # every rank stops, none waits for the others in a collective
    with ckpt.discard_on_error(tmp, folder, need):  # a full disk mid-save: this rank's error names the folder
        if optimizer is not None:  # optimizer/scheduler/model shards + per-rank RNG (a collective)
            acc.save_state(os.path.join(tmp, DS_DIR))
        acc.wait_for_everyone()  # every rank's shards are on disk before the manifest lists them
        if acc.is_main_process:
            embedder.save_weights(tmp, weights)
            ckpt.write_json_atomic(os.path.join(tmp, ckpt.STATE), dict(state, saved_at=time.time(), deepspeed=True))
            ckpt.write_manifest(tmp)
            ckpt.publish(tmp, folder)
    acc.wait_for_everyone()


class SafeCheckpointEngine:
    """DeepSpeed's checkpoint engine with a safe reader: its ``TorchCheckpointEngine.load`` unpickles with
    ``weights_only=False`` (arbitrary code). Tensors, containers and the few DeepSpeed types its files hold are all
    that is allowed here; writing is delegated unchanged."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        return getattr(self._inner, name)

    @staticmethod
    def safe_types() -> List[Any]:
        import deepspeed.runtime.fp16.loss_scaler as loss_scaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        return [ZeroStageEnum, fragment_address, loss_scaler.LossScaler, loss_scaler.DynamicLossScaler]

    def load(self, path: str, map_location=None):
        from .checkpoint import RunDirError

        try:
            with torch.serialization.safe_globals(self.safe_types()):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # pickle.UnpicklingError names the global that is not allowed
            raise RunDirError(f"cannot load DeepSpeed checkpoint file {path} safely: {type(e).__name__}: {e}") from e


def load(acc, embedder, folder: str) -> Dict[str, Any]:
    """Resume from a checkpoint written by :func:`save` (every rank calls it; verified by the caller)."""
    from . import checkpoint as ckpt

    state = ckpt.read_state(folder)
    if state is None:
        raise ckpt.RunDirError(f"{folder} is not a complete checkpoint (no {ckpt.STATE})")
    ds_dir = os.path.join(folder, DS_DIR)
    if os.path.isdir(ds_dir):
        engine = engine_of(acc)
        inner = engine.checkpoint_engine
        engine.checkpoint_engine = SafeCheckpointEngine(inner)
        try:
            acc.load_state(ds_dir)
        finally:
            engine.checkpoint_engine = inner
    else:  # a checkpoint written without DeepSpeed: weights only, fresh optimizer
        load_weights(acc, embedder, folder)
    return state


def parameter_partition(model) -> List[Dict[str, Any]]:
    """Per-parameter ZeRO-3 bookkeeping (name, full numel, local partition numel): for tests and diagnostics."""
    rows = []
    for name, p in model.named_parameters():
        if hasattr(p, "ds_numel"):
            rows.append({"name": name, "full": int(p.ds_numel), "local": int(p.ds_tensor.numel()),
                         "persist": bool(getattr(p, "ds_persist", False))})
    return rows
