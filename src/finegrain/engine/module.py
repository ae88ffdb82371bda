"""The one LightningModule: any finegrain model, trained through its output dict.

The model and the optimizer are injected (LightningCLI's ``class_path`` / ``init_args``:
``model.model``, ``model.optimizer``). The module sums ``out["losses"]`` (the model has already
weighted them), logs them and ``out["logs"]``, evaluates with ``finegrain.evaluation`` on the
task the data declares, and stores in every checkpoint what a checkpoint needs to describe
itself (``finegrain_meta``: a :class:`finegrain.meta.ModelMeta` record, schema-versioned: the
model's resolved config as YAML text, its registered name and arguments, class names, input
size, normalisation, task, dataset). Exact resume (sampler
position, RNG) is :class:`finegrain.engine.resume.ExactResume`'s.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn as nn
from lightning.pytorch.cli import OptimizerCallable

from ..choices import check_choice
from ..errors import InputError, NonFiniteError
from ..meta import ModelMeta, read_meta
from ..models.registry import FinegrainModel

__all__ = ["DEFAULT_OPTIMIZER", "default_optimizer", "Scheduler", "NonFinite",
           "NonFiniteLossError", "param_groups", "global_batch", "planned_steps",
           "FinegrainModule", "DML_KS", "primary_metric", "compute_metrics"]

DEFAULT_OPTIMIZER = {"class_path": "torch.optim.AdamW",
                     "init_args": {"lr": 5e-4, "weight_decay": 0.05}}
"""``model.optimizer`` when a recipe names none."""


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW, lr 5e-4, weight decay 0.05 (:data:`DEFAULT_OPTIMIZER`)."""
    return torch.optim.AdamW(params, **DEFAULT_OPTIMIZER["init_args"])


Scheduler = Literal["cosine", "step", "constant"]
"""``model.scheduler``: the learning-rate schedules."""

NonFinite = Literal["raise", "skip"]
"""``model.nonfinite``: what a NaN / inf loss does."""


class NonFiniteLossError(NonFiniteError):
    """A loss became NaN / inf; the message names the term and the step."""


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 head_lr_mult: float = 1.0) -> list[dict]:
    """Optimizer parameter groups: backbone vs. new parts, decay vs. none.

    A parameter is a *backbone* parameter when its name starts with ``backbone.``; the others
    (heads, attention modules, proxies) get ``lr * head_lr_mult``. 1-d parameters and those in
    ``model.no_weight_decay()`` get no weight decay. A model may refine this with
    ``model.optim_overrides() -> {name prefix: {...}}`` (longest prefix wins), each value
    holding any of ``"group": "backbone" | "head"`` (a copy of a backbone block belongs with
    the backbone), ``"lr"`` (absolute learning rate), ``"lr_mult"`` (factor on ``lr``) and
    ``"weight_decay"``. The schedule scales every group alike.
    """
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    overrides = dict(getattr(model, "optim_overrides", lambda: {})())
    buckets: dict[tuple, list] = {}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = max((k for k in overrides if n.startswith(k)), key=len, default="")
        o = overrides.get(prefix, {})
        unknown = set(o) - {"group", "lr", "lr_mult", "weight_decay"}
        if unknown:
            raise InputError(f"optim_overrides[{prefix!r}]: unknown keys {sorted(unknown)}")
        head = o.get("group", "backbone" if n.startswith("backbone.") else "head") == "head"
        group_lr = o.get("lr", lr * o.get("lr_mult", head_lr_mult if head else 1.0))
        no_wd = p.ndim <= 1 or n in skip
        wd = 0.0 if no_wd else o.get("weight_decay", weight_decay)
        buckets.setdefault((float(group_lr), float(wd), head, prefix), []).append(p)
    # backbone groups first: param_groups[0]["lr"] is the logged "lr"
    order = sorted(buckets, key=lambda k: (k[2], k[3], -k[1], k[0]))
    return [{"params": buckets[k], "lr": k[0], "weight_decay": k[1]} for k in order]


def global_batch(trainer: pl.Trainer) -> tuple[int, str]:
    """The images of one optimizer step over all processes (devices x nodes x per-process
    batch x gradient accumulation), and that product in words."""
    dm = getattr(trainer, "datamodule", None)
    per = getattr(dm, "batch_size", None) or getattr(getattr(dm, "hparams", None),
                                                     "batch_size", None)
    if per is None:
        raise InputError("model.lr_batch needs the data module's batch_size to compute the "
                         "global batch; set data.batch_size or drop lr_batch")
    world, acc = int(trainer.world_size), int(trainer.accumulate_grad_batches)
    return world * int(per) * acc, f"{world} process(es) x {int(per)} x {acc} accumulation"


def planned_steps(trainer: pl.Trainer) -> tuple[int, int]:
    """(optimizer steps per epoch, total optimizer steps) of a fit: the schedule's length and
    the progress file's total. ``max_steps`` caps the epochs; with ``max_steps`` alone
    (Lightning then sets ``max_epochs = -1``) the total is ``max_steps``.

    The batches per epoch come from the data module's ``steps_per_epoch()``
    (:class:`~finegrain.engine.datamodule.FinegrainDataModule`), read from its batch sampler
    without building a DataLoader."""
    epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
    batches = trainer.datamodule.steps_per_epoch()
    per_epoch = max(1, batches // max(1, trainer.accumulate_grad_batches))
    total = per_epoch * epochs if epochs else None
    if trainer.max_steps and trainer.max_steps > 0:
        total = min(total, trainer.max_steps) if total else trainer.max_steps
    return per_epoch, total or per_epoch


class FinegrainModule(pl.LightningModule):
    """Train / evaluate a finegrain model.

    Args:
        model: the model, a class of ``finegrain.models`` with its typed arguments
            (recipes: ``class_path: finegrain.models.dcal.DCAL`` + ``init_args``;
            ``--model.model.help finegrain.models.dcal.DCAL`` lists them). ``num_classes``
            and ``img_size`` come from the data (linked). From Python:
            ``FinegrainModule(finegrain.create_model(name, ...))``.
        optimizer: the optimizer (``class_path`` / ``init_args``, default AdamW, lr 5e-4,
            weight decay 0.05), called with the parameter groups: backbone vs. new parts,
            decay vs. none (its ``lr`` and ``weight_decay`` are the backbone's; see
            ``head_lr_mult``).
        pretrained: weights file to start from (timm / DeiT / torchvision / finegrain); every
            missing or unexpected key is reported.
        pretrained_strict: stop when fewer than half of the model's backbone tensors load
            from ``pretrained`` (another architecture's file); False goes on anyway.
        scheduler: ``cosine`` (per step, to ``min_lr``), ``step`` (x ``gamma`` at
            ``milestones`` epochs) or ``constant``. The schedule stays a module argument (not
            an ``LRSchedulerCallable``): its warm-up and cosine need the planned step count,
            which only the trainer knows.
        warmup_epochs: linear warm-up length in epochs (may be fractional).
        min_lr: final learning rate of the cosine schedule.
        milestones: epochs of the step schedule.
        gamma: factor of the step schedule.
        max_grad_norm: clip the gradient norm (None: off).
        head_lr_mult: learning-rate factor of every parameter outside ``model.backbone``
            (new heads, attention modules, proxies; DML practice trains them faster).
        nonfinite: ``raise`` stops with the step and term that went NaN / inf (the last
            checkpoint stays intact); ``skip`` skips that step and counts it, leaving every
            parameter and buffer (BatchNorm statistics) as it was.
        lr_batch: the optimizer's lr is the rate for this many images per step: the rate used
            is ``lr x global batch / lr_batch``, the global batch counted over every process
            and accumulation (DCAL's "5e-4 / 512 x batch size": ``lr 5e-4, lr_batch 512``).
            Absolute group rates (``w_lr``) are not scaled. None: ``lr`` as given.
    """

    def __init__(self, model: FinegrainModel, optimizer: OptimizerCallable | None = None,
                 pretrained: str | None = None, pretrained_strict: bool = True,
                 scheduler: Scheduler = "cosine", warmup_epochs: float = 0.0, min_lr: float = 0.0,
                 milestones: list[int] | None = None, gamma: float = 0.1,
                 max_grad_norm: float | None = None, head_lr_mult: float = 1.0,
                 nonfinite: NonFinite = "raise", lr_batch: int | None = None):
        super().__init__()
        if lr_batch is not None and lr_batch <= 0:
            raise InputError(f"model.lr_batch must be a positive number of images, got "
                             f"{lr_batch}")
        check_choice("model.scheduler", scheduler, Scheduler)
        check_choice("model.nonfinite", nonfinite, NonFinite)
        # the model and the optimizer are objects: checkpoints keep their configs as text
        # (meta.model_config), so they load with torch.load(weights_only=True)
        self.save_hyperparameters(ignore=["model", "optimizer"])
        self.model = model
        self.optimizer = optimizer
        if pretrained is not None:
            # the recipe decides the model's arguments, also when it starts from a finegrain file
            from ..models.weights import load_pretrained
            load_pretrained(model, pretrained, strict=pretrained_strict)
        # what a checkpoint needs to describe itself (a ModelMeta), stored beside (not in)
        # the hparams; the fields set so far on this module
        self._meta: dict[str, Any] = {}
        config = getattr(model, "finegrain_config", None)
        if config is not None:  # built by the registry (or rebuilt from a checkpoint)
            self.set_model_config(config)
        self._val_outputs: list[dict] = []
        self._buffers_before: dict[str, torch.Tensor] = {}
        self.last_metrics: dict[str, Any] | None = None  # of the last evaluation pass
        self.skipped_steps = 0
        self.nonfinite_outputs = 0  # evaluated images with NaN / inf logits or embedding
        self.log_evaluation = True  # evaluations log val/* (False: the test pass after fit)

    # ---- self-description -------------------------------------------------------------
    def set_model_config(self, config: dict) -> None:
        """Record the model's resolved config (``class_path`` / ``init_args``, the real
        ``num_classes`` included): ``model_config`` (YAML text) and the registered
        ``model_name`` / ``model_kwargs`` that build the same model."""
        from ..models.registry import config_meta
        self._set_meta(config_meta(config))

    def set_data_meta(self, meta: dict | ModelMeta) -> None:
        """Record the data side (classes, input size, normalisation, task, dataset): the
        fields of a mapping (``FinegrainDataModule.meta()``) or of a whole record."""
        self._set_meta(meta.to_dict() if isinstance(meta, ModelMeta) else meta)

    def _set_meta(self, fields: dict) -> None:
        fields = {k: v for k, v in fields.items() if k != "schema"}
        read_meta({**self._meta, **fields}, "FinegrainModule", require_model=False)  # validate
        self._meta = {**self._meta, **fields}

    @property
    def meta(self) -> ModelMeta:
        """The record a checkpoint of this module stores (:class:`finegrain.meta.ModelMeta`)."""
        return read_meta(self._meta, "FinegrainModule", require_model=False)

    @property
    def model_name(self) -> str:
        return self.meta.model_name or type(self.model).__name__

    @property
    def task(self) -> str:
        return self.meta.task

    def forward(self, images: torch.Tensor) -> dict:
        return self.model(images)

    # ---- training ---------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int):
        skip = self.hparams.nonfinite == "skip"
        # a skipped step must not keep what its forward changed (BatchNorm statistics)
        buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()} if skip else {}
        self._buffers_before = buffers
        out = self.model(batch["image"], targets=batch["label"])
        losses = out["losses"]
        loss = sum(v.float() for v in losses.values())
        if not torch.isfinite(loss):
            bad = [k for k, v in losses.items() if not torch.isfinite(v)]
            msg = (f"non-finite loss at epoch {self.current_epoch} step {self.global_step}: "
                   f"{', '.join(bad)}; lower model.optimizer.init_args.lr, set "
                   f"model.max_grad_norm, or use trainer.precision=bf16-mixed instead of "
                   f"16-mixed. last.ckpt holds the last good state (resume with --resume)")
            if skip:
                self._skip_step()
                return None
            raise NonFiniteLossError(msg)
        bs = batch["image"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        for k, v in out.get("logs", {}).items():
            self.log(f"train/{k}", v.float(), batch_size=bs)
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=bs)
        return loss

    def _skip_step(self) -> None:
        """Leave every parameter and buffer as before this step, and count it."""
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(self._buffers_before[n])
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_before_optimizer_step(self, optimizer) -> None:
        """A finite loss can still give non-finite gradients (an overflow in backward); they
        would make every weight NaN. ``raise`` stops naming them; ``skip`` drops the step
        (no parameter moves). Under 16-mixed the gradient scaler skips such steps itself."""
        if str(self.trainer.precision).startswith("16"):
            return
        named = [(n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None]
        if not named:
            return
        norms = torch.stack(torch._foreach_norm([g for _, g in named]))
        if bool(torch.isfinite(norms).all()):
            return
        bad = [n for (n, _), v in zip(named, norms.tolist()) if not math.isfinite(v)]
        if self.hparams.nonfinite == "skip":
            for p in self.model.parameters():
                p.grad = None  # optimizers leave parameters without a gradient alone
            self._skip_step()
            return
        raise NonFiniteLossError(
            f"non-finite gradients at epoch {self.current_epoch} step {self.global_step} in "
            f"{len(bad)} parameter(s) (first: {', '.join(bad[:3])}) although the loss is "
            f"finite; lower model.optimizer.init_args.lr or set model.max_grad_norm, or "
            f"--model.nonfinite skip to skip such steps. last.ckpt holds the last good state "
            f"(resume with --resume)")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        if self.hparams.max_grad_norm:
            self.clip_gradients(optimizer, gradient_clip_val=self.hparams.max_grad_norm,
                                gradient_clip_algorithm="norm")

    def configure_optimizers(self):
        hp = self.hparams
        make = self.optimizer or default_optimizer
        # the optimizer's own lr / weight_decay are the backbone's: read them off a probe
        probe = make([nn.Parameter(torch.zeros(1))]).defaults
        lr, wd = float(probe["lr"]), float(probe.get("weight_decay", 0.0))
        if hp.lr_batch is not None:  # the optimizer's lr is per lr_batch images (linear rule)
            batch, how = global_batch(self.trainer)
            if self.trainer.is_global_zero:
                print(f"lr {lr:g} x {batch} / {hp.lr_batch} = {lr * batch / hp.lr_batch:g} "
                      f"(model.lr_batch: the global batch {batch} = {how})", flush=True)
            lr = lr * batch / hp.lr_batch
        opt = make(param_groups(self.model, lr, wd, hp.head_lr_mult))
        per_epoch, total = planned_steps(self.trainer)
        warm = int(hp.warmup_epochs * per_epoch)
        ratio = hp.min_lr / lr if lr else 0.0

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            if hp.scheduler == "cosine":
                t = (step - warm) / max(1, total - warm)
                return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
            if hp.scheduler == "step":
                return hp.gamma ** sum(step >= m * per_epoch for m in (hp.milestones or []))
            return 1.0

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- checkpoint: self-description -------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["finegrain_meta"] = self.meta.to_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """The stored record, under the fields this module has set (a resumed run's own)."""
        stored = checkpoint.get("finegrain_meta")
        if stored:
            fields = read_meta(stored, "checkpoint", require_model=False).to_dict()
            fields.pop("schema")
            self._meta = {**fields, **self._meta}

    # ---- evaluation -------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        out = self.model(batch["image"])
        keep = {k: batch[k] for k in ("index", "label", "camid")}
        keep["query"] = batch["query"].to(torch.uint8)  # gathered across ranks as bytes
        for k in ("logits", "embedding"):
            if k in out:
                keep[k] = out[k].float()
        self._val_outputs.append({k: v.detach() for k, v in keep.items()})

    def _gather(self) -> dict[str, np.ndarray]:
        """All ranks' outputs, in dataset order, each sample exactly once (no padding)."""
        if not self._val_outputs:
            return {}
        local = {k: torch.cat([o[k] for o in self._val_outputs]) for k in self._val_outputs[0]}
        if self.trainer.world_size > 1:
            n = torch.tensor([len(local["index"])], device=self.device)
            sizes = self.all_gather(n).flatten().tolist()
            top = int(max(sizes))
            gathered = {}
            for k, v in local.items():
                pad = torch.zeros((top - len(v), *v.shape[1:]), dtype=v.dtype, device=v.device)
                allv = self.all_gather(torch.cat([v, pad]))  # (world, top, ...)
                gathered[k] = torch.cat([allv[r, :int(s)] for r, s in enumerate(sizes)])
            local = gathered
        order = torch.argsort(local["index"])
        res = {k: v[order].cpu().numpy() for k, v in local.items()}
        res["query"] = res["query"].astype(bool)
        return res

    def on_validation_epoch_end(self) -> None:
        res = self._gather()
        self._val_outputs = []
        if not res or self.trainer.sanity_checking:
            return
        bad = np.zeros(len(res["index"]), dtype=bool)
        for k in ("logits", "embedding"):
            if k in res:
                bad |= ~np.isfinite(res[k].reshape(len(bad), -1)).all(1)
        self.nonfinite_outputs = int(bad.sum())
        if self.nonfinite_outputs and self.trainer.state.fn == "validate":
            return  # `finegrain eval` reports them, naming the checkpoint
        if self.nonfinite_outputs:
            raise NonFiniteError(
                f"evaluation at epoch {self.current_epoch} (step {self.global_step}): "
                f"{self.nonfinite_outputs} of {len(bad)} outputs are NaN / inf, so the weights "
                f"went non-finite during training; last.ckpt holds the last good state: resume "
                f"with --resume and a lower model.optimizer.init_args.lr or model.max_grad_norm")
        metrics = compute_metrics(self.task, res, self.meta)
        self.last_metrics = metrics
        if self.trainer.state.fn == "validate":  # `finegrain eval`: re-ranking, pictures
            self.last_outputs = res
        if not self.log_evaluation:  # the test pass after fit chooses nothing: not logged
            return
        primary = primary_metric(self.task)
        for k, v in metrics.items():
            if np.isscalar(v):  # the metric that picks best.ckpt also in the progress bar
                self.log(f"val/{k}", float(v), sync_dist=False, prog_bar=k == primary)
        self.log("val/score", float(metrics[primary]), sync_dist=False)


# Recall@K of each DML benchmark's protocol (protocols.md); others use CUB / Cars' 1, 2, 4, 8
DML_KS = {"sop": (1, 10, 100, 1000), "inshop": (1, 10, 20, 30, 40, 50)}


def primary_metric(task: str) -> str:
    """The metric that picks ``best.ckpt``."""
    return {"classification": "top1", "reid": "mAP", "dml": "R@1"}.get(task, "top1")


def compute_metrics(task: str, res: dict[str, np.ndarray], meta: ModelMeta | None = None
                    ) -> dict:
    """Metrics of one evaluation pass (arrays in dataset order) with ``finegrain.evaluation``.

    Re-ID (and DML with a query split, In-Shop): the samples whose ``query`` flag is set are
    the queries, the others the gallery. ``meta`` (the checkpoint's record) names the dataset
    (DML's Recall@K list).
    """
    if task == "classification":
        from ..evaluation.classification import accuracy
        return accuracy(res["logits"], res["label"], topk=(1, 5))
    is_query = np.asarray(res.get("query", np.zeros(len(res["label"]), bool)), dtype=bool)
    if task == "reid":
        from ..evaluation.reid import evaluate_features
        if not is_query.any():
            raise InputError("Re-ID evaluation needs a query split (no sample is a query): "
                             "evaluate the query and gallery splits (data.val_split unset)")
        e, y, c = res["embedding"], res["label"], res["camid"]
        q, g = is_query, ~is_query
        out = evaluate_features(e[q], e[g], y[q], y[g], c[q], c[g], metric="cosine")
        cmc = out.pop("cmc")
        out.update({f"R{k}": float(cmc[k - 1]) for k in (1, 5, 10) if k <= len(cmc)})
        return out
    if task == "dml":
        from ..evaluation.dml import evaluate
        ks = DML_KS.get(meta.dataset if meta is not None else None, (1, 2, 4, 8))
        e, y = res["embedding"], res["label"]
        if is_query.any():  # In-Shop: queries search a separate gallery
            q, g = is_query, ~is_query
            return evaluate(e[g], y[g], ks=ks, query=e[q], query_labels=y[q])
        return evaluate(e, y, ks=ks)
    raise InputError(f"no training-time evaluation for task {task!r}; retrieval models are "
                     f"evaluated by `finegrain retrieval eval`")
