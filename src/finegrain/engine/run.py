"""``finegrain train``: LightningCLI ``fit`` with the run folder of DESIGN.md.

``runs/<date>-<recipe>/`` holds ``config.yaml`` (resolved: ``finegrain train --config
RUN/config.yaml`` reproduces the run), ``metrics.csv``, ``metrics.json``, ``progress.json``
(step, ETA), ``last.ckpt`` (atomic, every ``--checkpoint-every`` steps and at each epoch end),
``best.ckpt``, ``weights.safetensors`` + ``model.json`` and ``curves.png``. ``--resume RUN``
reads ``RUN/config.yaml`` first and continues exactly from ``RUN/last.ckpt`` (optimizer,
scheduler, scaler; RNG and sampler position through
:class:`~finegrain.engine.resume.ExactResume`), warning with every config key that changed;
``metrics.csv``, ``metrics.json`` and the TensorBoard events keep every row logged before the
interruption, each step once. ``--init-weights FILE`` only loads weights.
"""

from __future__ import annotations

import argparse
import ast
import csv
import datetime as _dt
import json
import logging
import os
import re
import sys
import time
import warnings
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.nn as nn
import yaml
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ..atomic import atomic_path, save_safetensors, write_json, write_text
from ..choices import nearest, refusal
from ..errors import InputError, Interrupted, MissingFileError
from .datamodule import FinegrainDataModule
from .folder import RunClaim, is_global_zero_process
from .module import DEFAULT_OPTIMIZER, FinegrainModule, planned_steps
from .resume import NOT_RESUMABLE_WARNING, ExactResume

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "RunCSVLogger", "resume_step",
           "InterruptNote", "interrupted", "ProgressFile", "RunFolder", "flatten_config",
           "RUN_KEYS", "changed_keys", "read_run_config", "parse_error", "FinegrainCLI",
           "recipe_card_text", "check_resumable", "follow_weights", "run_dir_for", "train",
           "parse_config", "build_recipe", "quiet_lightning"]

log = logging.getLogger("finegrain")
_CLAIMS: list[RunClaim] = []  # run folders claimed by the trainings of this process


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer with :mod:`finegrain.atomic`'s guarantee for
    ``last.ckpt`` and ``best.ckpt``: a temporary file in the run folder itself, synced, then
    renamed (Lightning's own writes a temporary file elsewhere, ``/tmp``, and copies it, so a
    kill during the copy to another disk left a torn ``best.ckpt``); a full disk is one
    paragraph and the previous checkpoint stays."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        from ..atomic import save_torch
        save_torch(checkpoint, os.fspath(path))


class LastCheckpoint(Callback):
    """Write ``last.ckpt`` (atomically: :class:`AtomicCheckpointIO`) every ``every_n_steps``
    steps and at each epoch end, so a run killed at any moment resumes from a complete
    file."""

    def __init__(self, run_dir: str, every_n_steps: int = 50):
        self.path = os.path.join(run_dir, "last.ckpt")
        self.every_n_steps = every_n_steps

    def _save(self, trainer: pl.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._save(trainer)


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer, which starts ``metrics.csv`` afresh, except that a resumed run
    first writes back the rows it logged before ``keep_before`` (the resumed step): the
    replayed steps come again from the resumed run, so no row is lost or duplicated."""

    def __init__(self, log_dir: str, keep_before: int | None):
        self.keep_before = keep_before
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = self.metrics_file_path
        if self.keep_before is None or not os.path.isfile(path):
            return super()._check_log_dir_exists()
        with open(path, newline="") as f:
            rows = [{k: v for k, v in r.items() if v not in ("", None)}
                    for r in csv.DictReader(f)]
        rows = [r for r in rows if int(float(r.get("step", 0))) < self.keep_before]
        self.metrics_keys = sorted(set().union(*rows)) if rows else []
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class RunCSVLogger(CSVLogger):
    """``metrics.csv`` of the run folder, written at every logged row (a killed run loses
    none); ``keep_before``: resuming at that step, keep the earlier rows."""

    def __init__(self, run_dir: str, keep_before: int | None = None):
        super().__init__(run_dir, name="", version="", flush_logs_every_n_steps=1)
        self.keep_before = keep_before

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.keep_before)
        return self._experiment


def resume_step(path: str) -> int:
    """The global step of the checkpoint ``path`` (memory-mapped: nothing is copied);
    :class:`~finegrain.errors.InputError` naming the file when it is truncated or corrupt."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ck["global_step"])
    except Exception as e:  # PytorchStreamReader (truncated zip), UnpicklingError, KeyError
        reason = " ".join(str(e).split()).split(". ")[0] or type(e).__name__
        raise InputError(f"--resume: {path} is truncated or corrupt ({reason}), so the run "
                         f"cannot continue from it: restore the file from a copy, or start a "
                         f"new run from the run's best weights with --init-weights "
                         f"{os.path.join(os.path.dirname(path), 'best.ckpt')}") from None


class InterruptNote(Callback):
    """Notes a Ctrl-C (Lightning then shuts down and exits 1), so ``finegrain train`` can say
    which step ``last.ckpt`` holds, print the command that continues, and exit 130."""

    interrupted_run: str | None = None

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, KeyboardInterrupt):
            InterruptNote.interrupted_run = self.run_dir


def interrupted(run_dir: str) -> Interrupted:
    """The one paragraph of a training stopped by Ctrl-C in ``run_dir``."""
    last = os.path.join(run_dir, "last.ckpt")
    if not os.path.isfile(last):
        return Interrupted(f"{run_dir}: stopped before its first checkpoint; nothing to "
                           f"continue from (start it again)")
    return Interrupted(f"{run_dir}: stopped by Ctrl-C; {last} holds step {resume_step(last)} "
                       f"(complete: it is written atomically). Continue exactly with: "
                       f"finegrain train --resume {run_dir}")


class ProgressFile(Callback):
    """``progress.json`` in the run folder, rewritten at most every ``interval`` seconds and at
    each epoch end: step, total steps, epoch, elapsed seconds and ETA. Lets another process
    (``finegrain demo``, a cluster dashboard) show how far a run is without parsing logs."""

    def __init__(self, run_dir: str, interval: float = 2.0):
        self.path = os.path.join(run_dir, "progress.json")
        self.interval = interval
        self._t0 = self._last = None
        self._step0 = 0
        self._total: int | None = None

    def on_train_start(self, trainer, pl_module):
        self._t0 = self._last = time.time()
        self._step0 = trainer.global_step  # a resumed run: rate from the steps done here
        self._total = planned_steps(trainer)[1]  # optimizer steps, as global_step counts

    def _write(self, trainer, force: bool = False) -> None:
        now = time.time()
        if not trainer.is_global_zero or self._t0 is None or \
                (not force and now - self._last < self.interval):
            return
        self._last = now
        step, total = trainer.global_step, self._total
        done, elapsed = step - self._step0, now - self._t0
        eta = (total - step) * elapsed / done if total and done > 0 else None
        write_json(self.path, {"step": step, "total": total, "epoch": trainer.current_epoch,
                               "elapsed_s": elapsed, "eta_s": eta}, indent=None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._write(trainer)

    def on_train_epoch_end(self, trainer, pl_module):
        self._write(trainer, force=True)


class RunFolder(Callback):
    """``metrics.json`` after every evaluation and one line per evaluation on the console
    (``epoch 3/24  step 120  val (%): mAP 64.40 ...  | best mAP 65.00 @ epoch 2``);
    ``weights.safetensors`` + ``model.json``, ``curves.png`` and a summary (best metric and
    its epoch, the run folder, the next commands) when fitting ends (rank 0 only).
    ``recipe``: the recipe file the run came from (recorded in ``metrics.json``)."""

    def __init__(self, run_dir: str, recipe: str | None = None):
        self.run_dir = run_dir
        self.recipe = os.path.abspath(recipe) if recipe else None
        self.history: list[dict] = []
        self.test: dict | None = None  # the test protocol's metrics of the chosen checkpoint

    def on_validation_end(self, trainer, pl_module):
        metrics = pl_module.last_metrics
        if trainer.sanity_checking or metrics is None or not trainer.is_global_zero or \
                trainer.state.fn != "fit":  # the test evaluation after fit is not history
            return
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        row.update({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in metrics.items()})
        self.history.append(row)
        best = self._write_json(pl_module)
        from .module import primary_metric
        from .report import format_eval_line
        _say(trainer, format_eval_line(row, primary_metric(pl_module.task), best,
                                       trainer.max_epochs))

    def _write_json(self, pl_module) -> dict | None:
        from .module import primary_metric
        key = primary_metric(pl_module.task)
        best = max(self.history, key=lambda r: r.get(key, float("-inf")), default=None)
        record = {"task": pl_module.task, "primary": key, "recipe": self.recipe,
                  "selected_on": pl_module.meta.selected_on,
                  "best": best, "final": self.history[-1] if self.history else None,
                  "history": self.history}
        if self.test is not None:
            record["test"] = self.test
        write_json(os.path.join(self.run_dir, "metrics.json"), record)
        return best

    def record_test(self, pl_module, checkpoint: str, metrics: dict) -> None:
        """Add the test protocol's metrics of ``checkpoint`` to ``metrics.json``."""
        self.test = {"checkpoint": os.path.basename(checkpoint),
                     **{k: (v.tolist() if hasattr(v, "tolist") else v)
                        for k, v in metrics.items()}}
        self._write_json(pl_module)

    def state_dict(self) -> dict:
        return {"history": json.dumps(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = json.loads(state.get("history", "[]"))

    def on_fit_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        from .module import primary_metric
        best = os.path.join(self.run_dir, "best.ckpt")
        if os.path.isfile(best):
            sd = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
        else:
            sd = pl_module.model.state_dict()
        # weights first, their record last: a model.json names complete weights
        save_safetensors({k: v.contiguous() for k, v in sd.items()},
                         os.path.join(self.run_dir, "weights.safetensors"))
        write_json(os.path.join(self.run_dir, "model.json"), pl_module.meta.to_dict())
        key = primary_metric(pl_module.task)
        try:
            from ..visualize import plot_curves
            plot_curves(os.path.join(self.run_dir, "metrics.csv"),
                        os.path.join(self.run_dir, "curves.png"), primary=key)
        except Exception as e:  # a picture must never fail a finished run
            log.warning("could not draw curves.png: %s", e)
        from .report import format_summary
        top = max(self.history, key=lambda r: r.get(key, float("-inf")), default=None)
        dm = getattr(trainer, "datamodule", None)
        root = getattr(getattr(dm, "hparams", None), "root", None)
        # plain print: the progress bars are closed by now
        learned = getattr(pl_module.model, "learned_scalars", dict)()
        print(format_summary(self.run_dir, key, top, self.history[-1] if self.history else None,
                             pl_module.task, root, hasattr(pl_module.model, "explain"),
                             learned), flush=True)


def _say(trainer, text: str) -> None:
    """Print ``text`` on stdout, above the running progress bar when there is one."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is not None and getattr(bar, "is_enabled", False) and hasattr(bar, "print"):
        bar.print(text)
    else:
        print(text, flush=True)


def flatten_config(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{dotted key: value}``."""
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(flatten_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


RUN_KEYS = ("ckpt_path", "config", "resume", "init_weights", "run_dir", "runs_root",
            "checkpoint_every", "overwrite", "trainer.logger", "trainer.callbacks",
            "trainer.default_root_dir")
"""Keys of the resolved config that locate or manage a run, not what it computes."""


def changed_keys(old: dict, new: dict, ignore: tuple[str, ...] = RUN_KEYS) -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    a, b = flatten_config(old), flatten_config(new)
    keys = sorted(set(a) | set(b))
    return [k for k in keys if not k.startswith(ignore) and a.get(k) != b.get(k)]


def read_run_config(run_dir: str) -> str:
    """The resolved ``config.yaml`` of a run folder as YAML text, ready to parse again: the
    keys that located that run (``ckpt_path``, ``resume``, ``run_dir`` ...) are cleared, and
    so are the placeholders older versions wrote for logger / callback instances
    (``- Unable to serialize instance <...>``)."""
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise MissingFileError(f"--resume {run_dir}: {path} not found; pass the run folder of "
                               f"an earlier `finegrain train` (it holds config.yaml and last.ckpt)")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: not a finegrain train config (a YAML mapping); restore it "
                         f"from a copy or pass the recipe with --config")
    return yaml.safe_dump(_clean_config(cfg), sort_keys=False)


def _unserializable(v: Any) -> bool:
    if isinstance(v, list):
        return any(_unserializable(x) for x in v)
    return isinstance(v, str) and v.startswith("Unable to serialize instance")


def _clean_config(cfg: dict) -> dict:
    """``cfg`` without run locations (``ckpt_path``, ``resume``, ``init_weights``, ``run_dir``,
    ``config``) and without placeholders of instances."""
    cfg = dict(cfg)
    for k in ("ckpt_path", "resume", "init_weights", "run_dir", "config", "overwrite",
              "__path__"):
        cfg.pop(k, None)
    trainer = dict(cfg.get("trainer") or {})
    for k in ("logger", "callbacks", "default_root_dir"):
        if k in trainer and (_unserializable(trainer[k]) or k == "default_root_dir"):
            trainer[k] = None
    if "trainer" in cfg:
        cfg["trainer"] = trainer
    return cfg


def _literal_values(text: str) -> list | None:
    """The values of the first ``typing.Literal[...]`` in a jsonargparse message."""
    m = re.search(r"Literal\[(.*?)\]", text)
    if not m:
        return None
    try:
        return list(ast.literal_eval(f"({m.group(1)},)"))
    except (ValueError, SyntaxError):
        return None


def _arguments(class_path: str) -> list[str]:
    """The constructor arguments of the class ``class_path`` names (none if it cannot be
    imported)."""
    import importlib
    import inspect
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        return list(inspect.signature(cls).parameters)
    except (ImportError, AttributeError, ValueError, TypeError):
        return []


def parse_error(message: str, options: list[str] = ()) -> str:
    """A jsonargparse parse error of ``finegrain train`` as one paragraph: a closed-set option
    with its accepted values and the nearest one; an unknown option with the nearest of
    ``options`` (the parser's option strings); anything else as it is, on one line."""
    m = re.search(r"class_path '([\w.]+)'.*Option '(\w+)' is not accepted", message, re.S)
    if m:
        class_path, name = m.groups()
        near = nearest(name, _arguments(class_path))
        return (f"finegrain train: {class_path} has no argument {name!r}"
                + (f" (did you mean {near!r}?)" if near else "")
                + f"; `finegrain train --model.model.help {class_path}` lists them")
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if keys:
        option = "--" + ".".join(keys)
        accepted = _literal_values(message)
        got = re.search(r"(?:Got value|Given value): (.*)", message)
        if accepted is not None and got:
            value = got.group(1).strip()
            if "Optional" in message or "NoneType" in message:
                accepted = [*accepted, "null"]  # YAML's None
            return f"finegrain train: {refusal(option, value, accepted)}"
    m = re.search(r"unrecognized arguments: (.*)", message)
    if m:
        unknown = [t for t in m.group(1).split() if t.startswith("-")] or m.group(1).split()
        hints = [f"{t} (did you mean {n}?)" if (n := nearest(t.split("=")[0], options))
                 else t for t in unknown]
        return (f"finegrain train: unknown option {', '.join(hints)}; `finegrain train "
                f"--help` lists the options (`--model.model.help CLASS` a model's)")
    return "finegrain train: " + " ".join(message.split())


class FinegrainCLI(LightningCLI):
    """LightningCLI ``fit`` with the run folder: ``num_classes`` and ``img_size`` linked from
    the data, the run options of ``finegrain train`` (``--resume``, ``--init-weights``,
    ``--checkpoint-every``, ``--run-dir``, ``--runs-root``) in its parser and ``--help``, and
    the run's loggers and callbacks added when the trainer is built (so that the resolved
    ``config.yaml`` holds only values: fed back with ``--config`` it reproduces the run).

    ``recipe``: the last ``--config`` file (names the run folder); ``callbacks``: added to the
    run's own (tests, notebooks)."""

    def __init__(self, *args, recipe: str | None = None,
                 callbacks: list[Callback] | None = None, **kwargs):
        self.recipe, self.extra_callbacks = recipe, list(callbacks or [])
        self.run_dir: str | None = None
        self.inputs_note: str | None = None
        self.resuming = False
        self.keep_before: int | None = None
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any):
        # a parse error is raised, for parse_arguments to say in one paragraph (not printed
        # under jsonargparse's usage of every option)
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        try:
            super().parse_arguments(parser, args)
        except argparse.ArgumentError as e:
            options = [o for p in (parser, *_subparsers(parser)) for a in p._actions
                       for o in a.option_strings if o.startswith("--")]
            raise InputError(parse_error(str(e), options)) from None

    def add_arguments_to_parser(self, parser):
        from ..models.registry import list_models
        list_models()  # imports the model files: their classes are --model.model's choices
        parser.link_arguments("data.num_classes", "model.model.init_args.num_classes",
                              apply_on="instantiate")
        # models without an ``img_size`` argument (TASN) are skipped
        parser.link_arguments("data.img_size", "model.model.init_args.img_size")
        parser.set_defaults({"model.optimizer": DEFAULT_OPTIMIZER})
        parser.link_arguments("seed_everything", "data.seed")
        parser.add_argument("--resume", type=Optional[str], default=None, metavar="RUN",
                            help="continue the run folder RUN exactly (weights, optimizer, "
                                 "scheduler, RNG, sampler position) from RUN/last.ckpt, with "
                                 "RUN/config.yaml as the first config: `--resume RUN` alone "
                                 "continues it; later options change it (a warning names "
                                 "every changed key)")
        parser.add_argument("--init-weights", type=Optional[str], default=None, metavar="FILE",
                            help="start from these weights only (a finegrain .ckpt / "
                                 "weights.safetensors, or a timm / DeiT / torchvision file): "
                                 "sets model.pretrained; nothing else of that run is kept")
        parser.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                            help="write last.ckpt (atomically) every N optimizer steps and at "
                                 "each epoch end (0: epoch ends only)")
        parser.add_argument("--run-dir", type=Optional[str], default=None, metavar="DIR",
                            help="the run folder (default: RUNS_ROOT/<date>-<recipe>)")
        parser.add_argument("--runs-root", type=str, default="runs", metavar="RUNS_ROOT",
                            help="where new run folders are made")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="replace the run in --run-dir (its run files are removed); "
                                 "without it a folder that holds a run is refused")

    def before_instantiate_classes(self):
        cfg = self.config[self.subcommand]
        self.resuming = bool(cfg.resume)
        if self.resuming:
            self.run_dir = cfg.resume
            last = os.path.join(self.run_dir, "last.ckpt")
            self.keep_before = resume_step(last)
            cfg.ckpt_path = last
        else:
            self.run_dir = cfg.run_dir or run_dir_for(self.recipe, cfg.runs_root)
        if cfg.init_weights:
            cfg.model.pretrained = cfg.init_weights
        self.inputs_note = follow_weights(cfg)
        if is_global_zero_process():  # the other ranks write into the folder it claimed
            _CLAIMS.append(RunClaim(self.run_dir, self.resuming, cfg.overwrite))
        else:
            os.makedirs(self.run_dir, exist_ok=True)

    def instantiate_trainer(self, **kwargs: Any) -> pl.Trainer:
        """The trainer of the config, plus the run folder's loggers and callbacks."""
        cfg = self.config_init[self.subcommand]
        trainer, run_dir = cfg.get("trainer") or {}, self.run_dir
        if trainer.get("logger") in (None, True):
            kwargs["logger"] = [
                RunCSVLogger(run_dir, self.keep_before),
                # resumed: TensorBoard hides the events of the steps replayed from here
                TensorBoardLogger(run_dir, name="tensorboard", version="",
                                  **({} if self.keep_before is None else
                                     {"purge_step": self.keep_before}))]
        if trainer.get("default_root_dir") is None:
            kwargs["default_root_dir"] = run_dir
        plugins = trainer.get("plugins") or []
        kwargs["plugins"] = [*(plugins if isinstance(plugins, list) else [plugins]),
                             AtomicCheckpointIO()]
        user = trainer.get("callbacks") or []
        kwargs["callbacks"] = [
            ModelCheckpoint(dirpath=run_dir, filename="best", monitor="val/score", mode="max",
                            save_top_k=1, enable_version_counter=False,
                            auto_insert_metric_name=False, save_last=False),
            ExactResume(),  # before LastCheckpoint: it counts the batch about to be saved
            LastCheckpoint(run_dir, cfg.checkpoint_every),
            InterruptNote(run_dir),
            RunFolder(run_dir, self.recipe),
            ProgressFile(run_dir),
            *(user if isinstance(user, list) else [user]), *self.extra_callbacks]
        return super().instantiate_trainer(**kwargs)

    def after_fit(self):
        """The test protocol on the chosen checkpoint, when validation did not run on it:
        ``metrics.json`` gets ``test`` and the console one line saying what chose it."""
        dm, module, trainer = self.datamodule, self.model, self.trainer
        if trainer.interrupted or dm.val_mode in ("test", "none"):
            return
        ds = dm.test_set()
        if ds is None:
            return
        best = os.path.join(self.run_dir, "best.ckpt")
        ckpt = best if os.path.isfile(best) else os.path.join(self.run_dir, "last.ckpt")
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
        module.log_evaluation = False  # no val/ rows: this pass chooses nothing
        try:
            trainer.validate(module, dataloaders=dm.eval_dataloader(ds), verbose=False)
        except (InputError, ValueError) as e:  # a test set the metrics cannot score
            log.warning("the test evaluation of %s failed (%s); the run itself is complete: "
                        "evaluate it with `finegrain eval %s`", ckpt, e, ckpt)
            return
        if not trainer.is_global_zero or module.last_metrics is None:
            return
        from .module import primary_metric
        from .report import percent
        folder = next(c for c in trainer.callbacks if isinstance(c, RunFolder))
        folder.record_test(module, ckpt, module.last_metrics)
        key = primary_metric(module.task)
        print(f"test {key} {percent(module.last_metrics[key])}% of {os.path.basename(ckpt)} "
              f"(chosen on {dm.selected_on}; metrics.json 'test')", flush=True)

    def resolved_config(self) -> str:
        """The resolved ``fit`` config as YAML, without run locations (see
        :func:`read_run_config`): ``finegrain train --config`` of it reproduces the run."""
        full = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        return yaml.safe_dump(_clean_config(full[self.subcommand]), sort_keys=False)

    def model_config(self) -> dict:
        """``model.model`` of the config as built: ``class_path`` / ``init_args`` with the
        ``num_classes`` of the data (linked when instantiating, so not in the parsed
        config)."""
        import inspect
        node = self.config[self.subcommand].model.model
        init = dict(vars(node.init_args)) if node.get("init_args") is not None else {}
        if "num_classes" in inspect.signature(type(self.model.model)).parameters:
            init["num_classes"] = self.datamodule.num_classes
        return {"class_path": node.class_path, "init_args": init}

    def before_fit(self):
        config = self.model_config()
        if self.resuming:
            check_resumable(self.run_dir, self.model, config)
        self.model.set_model_config(config)
        self.model.set_data_meta(self.datamodule.meta())
        path = os.path.join(self.run_dir, "config.yaml")
        resolved = self.resolved_config()
        if self.resuming and os.path.isfile(path):
            with open(path) as f:
                old = _clean_config(yaml.safe_load(f) or {})
            diff = changed_keys(old, yaml.safe_load(resolved) or {})
            if diff:
                warnings.warn(f"resuming {self.run_dir} with a changed config: "
                              f"{', '.join(diff)}; the weights and the optimizer and scheduler "
                              f"states (learning rates included) come from last.ckpt",
                              stacklevel=1)
        if self.trainer.is_global_zero:  # the resolved config, whatever the loggers
            write_text(path, resolved)
            print(f"{'resuming' if self.resuming else 'run folder'}: {self.run_dir}",
                  flush=True)
            if self.inputs_note:
                print(self.inputs_note, flush=True)
            card = recipe_card_text(yaml.safe_load(resolved) or {}, self.recipe)
            if card:
                print(card, flush=True)
            print(f"checkpoint choice: best.ckpt is chosen on "
                  f"{self.datamodule.selected_on}", flush=True)
            hp = self.model.hparams
            if not hp.get("pretrained") and not self.resuming:
                from .report import random_init_warning
                log.warning(random_init_warning(
                    self.model.model_name, self.recipe,
                    getattr(self.model.model, "pretrained_note", None)))


def recipe_card_text(config: dict, recipe: str | None) -> str | None:
    """The recipe card of a run (its method's protocol, with this run's values), as printed at
    the start of ``finegrain train``; None when no card applies."""
    from ..cards import card_for, card_rows, format_card, recipe_labels
    flat = flatten_config(config)
    found = card_for(flat, recipe)
    if found is None:
        return None
    labels = recipe_labels(recipe) if recipe and os.path.isfile(recipe) else {}
    return format_card(*found, card_rows(*found, flat, labels))


def check_resumable(run_dir: str, module: FinegrainModule, config: dict) -> None:
    """Refuse, in one paragraph, a resume whose config builds another model than the one in
    ``RUN/last.ckpt`` (``config.yaml`` edited to another width or depth): the tensors that
    differ and the model arguments that changed, instead of a ``size mismatch`` traceback."""
    from ..meta import read_meta
    path = os.path.join(run_dir, "last.ckpt")
    ck = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    saved, own = ck.get("state_dict", {}), module.state_dict()
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k} {list(saved[k].shape)} in the checkpoint, {list(v.shape)} now"
              for k, v in own.items() if k in saved and saved[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"{len(shapes)} of another shape (first: {shapes[0]})" if shapes else "",
             f"{len(missing)} missing from the checkpoint (first: {', '.join(missing[:3])})"
             if missing else "",
             f"{len(unexpected)} not in the model (first: {', '.join(unexpected[:3])})"
             if unexpected else ""]
    why = ""
    stored = ck.get("finegrain_meta")
    if stored:
        old = yaml.safe_load(read_meta(stored, path, require_model=False).model_config or "{}")
        diff = changed_keys((old or {}).get("init_args") or {}, config.get("init_args") or {},
                            ignore=("num_classes",))
        if diff:
            why = f"; the model arguments that changed: {', '.join(diff)}"
    raise InputError(f"--resume {run_dir}: its config.yaml builds a model that does not match "
                     f"{path} ({'; '.join(p for p in parts if p)}){why}. The checkpoint is "
                     f"unchanged: restore config.yaml (or drop the option that changed the "
                     f"model), or start a new run from these weights with --init-weights "
                     f"{path}")


_INPUT_KEYS = ("mean", "std", "interpolation", "crop_pct")


def follow_weights(cfg) -> str | None:
    """Set ``data.mean``, ``std``, ``interpolation`` and ``crop_pct`` that the config leaves
    unset from the weights ``model.pretrained`` expect (timm's pretrained cfg of a Hub tag, a
    finegrain file's record; a foreign local file: the backbone's default weights in timm), so
    inputs are prepared as the weights were trained. A value the config sets that contradicts
    weights whose inputs are known is refused, naming both. Returns the line that says what
    was followed (None without weights)."""
    from ..models.weights import pretrained_input_config
    init = cfg.model.model.get("init_args") if cfg.model.get("model") is not None else None
    backbone = init.get("backbone") if init is not None else None
    ic = pretrained_input_config(cfg.model.get("pretrained"), backbone)
    if ic is None:
        return None
    data, set_here = cfg.data, []
    for key in _INPUT_KEYS:
        want = getattr(ic, key)
        have = data.get(key)
        if key == "crop_pct" and data.get("resize_size") is not None:
            continue  # the recipe's own resize decides the crop
        if have is None:
            data[key] = list(want) if isinstance(want, tuple) else want
            set_here.append(key)
            continue
        same = (tuple(float(v) for v in have) == want) if isinstance(want, tuple) \
            else (have == want if key != "crop_pct" else abs(float(have) - want) < 1e-9)
        if not same and ic.known and key in ("mean", "std"):
            raise InputError(
                f"data.{key} {list(have) if isinstance(have, (list, tuple)) else have} "
                f"contradicts the weights model.pretrained {cfg.model.pretrained}, which expect "
                f"{key} {list(want)} ({ic.source}): the network would see inputs it was not "
                f"trained on. Remove data.{key} from the recipe (it follows the weights), or "
                f"pass weights trained with that {key}")
    if not set_here:
        return None
    shown = ", ".join(f"{k} {data.get(k)}" for k in set_here)
    return f"inputs follow the weights: {shown} (from {ic.source})"


def _subparsers(parser) -> list:
    """The sub-command parsers of a jsonargparse parser (``fit``'s)."""
    action = getattr(parser, "_subcommands_action", None)
    return list(action._name_parser_map.values()) if action is not None else []


def run_dir_for(config: str | None, runs_root: str = "runs") -> str:
    """``runs/<date>-<recipe>`` (a ``-2``, ``-3`` ... suffix when it exists). A run folder's
    own ``config.yaml`` names the new run after that folder's recipe."""
    recipe = os.path.splitext(os.path.basename(config))[0] if config else "run"
    if config and os.path.basename(config) == "config.yaml" and \
            os.path.isfile(os.path.join(os.path.dirname(config), "metrics.json")):
        with open(os.path.join(os.path.dirname(config), "metrics.json")) as f:
            origin = json.load(f).get("recipe")
        if origin:
            recipe = os.path.splitext(os.path.basename(origin))[0]
    base = os.path.join(runs_root, f"{_dt.date.today().isoformat()}-{recipe}")
    path, i = base, 1
    while os.path.exists(path):
        i += 1
        path = f"{base}-{i}"
    return path


def train(argv: list[str] | None = None, callbacks: list[Callback] | None = None) -> FinegrainCLI:
    """Run ``finegrain train`` in-process; returns the CLI (``.trainer``, ``.model``,
    ``.run_dir``). ``callbacks`` are added to the run's own (tests, notebooks).

    ``--resume RUN`` puts ``RUN/config.yaml`` before everything else on the command line, so
    ``--resume RUN`` alone continues the run and later options change it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", "-c", action="append", default=[])
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    recipe = known.config[-1] if known.config else None
    if known.resume:
        last = os.path.join(known.resume, "last.ckpt")
        if not os.path.isfile(last):
            raise MissingFileError(f"--resume {known.resume}: {last} not found; pass the run "
                                   f"folder of an earlier `finegrain train`")
        resume_step(last)  # a truncated file is named before anything starts
        argv = ["--config", read_run_config(known.resume), *argv]
        recipe = recipe or _run_recipe(known.resume)
    # we pass `finegrain train`'s own argv as args: LightningCLI's "args and sys.argv" warning
    # is for a different mistake
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    quiet_lightning()
    claimed = len(_CLAIMS)
    failed = True
    try:
        with warnings.catch_warnings():
            # ExactResume restores the sampler position that this warning says is lost
            warnings.filterwarnings("ignore", message=NOT_RESUMABLE_WARNING)
            if not known.resume:  # a claimed folder holds only this run's own files
                warnings.filterwarnings("ignore",
                                        message=r".*directory .* exists and is not empty")
            cli = FinegrainCLI(FinegrainModule, FinegrainDataModule, args=["fit", *argv],
                               recipe=recipe, callbacks=callbacks,
                               seed_everything_default=0,
                               trainer_defaults={"use_distributed_sampler": False},
                               save_config_callback=None,
                               auto_configure_optimizers=False)
        failed = False
        return cli
    except SystemExit:
        run = InterruptNote.interrupted_run
        if run is None:
            raise
        InterruptNote.interrupted_run = None
        raise interrupted(run) from None
    finally:
        while len(_CLAIMS) > claimed:  # this call's claims: the lock, an empty failed folder
            _CLAIMS.pop().release(failed)


class _Parsed(Exception):
    """Carries the parsed config out of :class:`_ParseOnly`."""


class _ParseOnly(FinegrainCLI):
    def before_instantiate_classes(self):
        raise _Parsed(self.config[self.subcommand])


def parse_config(argv: list[str]) -> dict:
    """The configuration ``finegrain train ARGV`` resolves (every default filled), as a
    dict; nothing is built, claimed or written."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    try:
        _ParseOnly(FinegrainModule, FinegrainDataModule, args=["fit", *argv],
                   seed_everything_default=0, save_config_callback=None,
                   trainer_defaults={"use_distributed_sampler": False},
                   auto_configure_optimizers=False)
    except _Parsed as e:
        return e.args[0].as_dict()
    raise RuntimeError("parse_config: the parser did not stop before instantiation")


def build_recipe(path: str, num_classes: int | None = None) -> tuple[nn.Module, Any, dict]:
    """(model, optimizer, resolved config) of a recipe at its own image size, from random
    weights and without data: ``num_classes`` (default: the published split's) sizes the head.
    For sizing a recipe (tests, benchmarks), not for training."""
    from lightning.pytorch.cli import instantiate_class

    from ..data.registry import PUBLISHED_CLASSES
    from .module import param_groups
    cfg = parse_config(["--config", path, "--model.pretrained", "null"])
    data, spec = cfg["data"], cfg["model"]["model"]
    init = dict(spec.get("init_args") or {})
    init["num_classes"] = num_classes or PUBLISHED_CLASSES[data["dataset"]]
    if "img_size" in init:
        init["img_size"] = data["img_size"]
    init.pop("attention_pretrained", None)  # sizes, not weights
    model = instantiate_class((), {"class_path": spec["class_path"], "init_args": init})
    opt = cfg["model"]["optimizer"]
    lr, wd = float(opt["init_args"]["lr"]), float(opt["init_args"].get("weight_decay", 0.0))
    groups = param_groups(model, lr, wd, float(cfg["model"].get("head_lr_mult", 1.0)))
    return model, instantiate_class((groups,), opt), cfg


def _run_recipe(run_dir: str) -> str | None:
    """The recipe a run folder came from (``metrics.json``), if recorded."""
    path = os.path.join(run_dir, "metrics.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f).get("recipe")
    return None


class _NoAdvert(logging.Filter):
    """Drops Lightning's logging-service advertisement (the litlogger tip)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_lightning() -> None:
    """Each Lightning INFO line once (Lightning's own handler, not also the root logger's)
    and without the logging-service advertisement or a deprecation inside Lightning that
    users cannot act on; other warnings stay."""
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    lg = logging.getLogger("lightning")
    if lg.handlers:
        lg.propagate = False
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        target = logging.getLogger(name)
        if not any(isinstance(f, _NoAdvert) for f in target.filters):
            target.addFilter(_NoAdvert())
