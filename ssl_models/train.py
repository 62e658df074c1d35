"""The pretraining loop, readable top to bottom.

Per step: gather a uint8 batch already on the device -> draw the method's views with
per-image random augmentation -> loss and metrics under bf16 autocast (CUDA) -> backward ->
the method's gradient hook -> optimizer and schedule step -> the method's momentum/EMA
update. Nothing in a step waits for the GPU: the loss and the method's metrics are
accumulated on the device and read (and checked for NaN/inf) only every `log_every` steps,
before each checkpoint and at epoch end.

Checkpoints hold the method (networks, EMA copies, queues, centres), optimizer, schedule,
position in the epoch, metric accumulators and every RNG state, so a run killed at any
point and resumed ends with the same weights as an uninterrupted one (bitwise on CPU).
Metrics leave through callbacks. What it prints itself is progress, on stderr: a tqdm bar on an
interactive terminal and one line per epoch everywhere (`ssl_models/progress.py`), which a
Prefect task with `log_prints` forwards to the flow-run log.

Data parallel (under torchrun, see docs/multi-gpu.md): `pretrain.batch_size` is the global
batch, split evenly over the ranks; every rank draws the augmentation uniforms of the whole
global batch from the same generator and uses its own rows, so N ranks see exactly the views
one process would see, and the checkpoint (position, RNG, accumulators, unwrapped weights)
does not depend on N. Rank 0 alone runs callbacks, the progress bar, online kNN and writes
files; the other ranks only train.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm import tqdm

from sslflow.ssl_models import distributed
from sslflow.ssl_models.augment import BatchAugment
from sslflow.ssl_models.backbones import Backbone, build_backbone
from sslflow.ssl_models.checkpoint import (
    atomic_save,
    load_data,
    remove_stale_temporaries,
    rng_state,
    save_encoder,
    set_rng_state,
)
from sslflow.ssl_models.config import EngineSettings, engine_flat, resumable
from sslflow.ssl_models.errors import ConfigError, RunStateError, TrainingDiverged
from sslflow.ssl_models.evaluate import extract_features, knn_classify, map_test_labels
from sslflow.ssl_models.methods import METHODS, Batch, SSLMethod, TrainContext
from sslflow.ssl_models.optim import WarmupCosine, build_optimizer
from sslflow.ssl_models.progress import EpochLines
from sslflow.ssl_models.store import DeviceBatches, ImageStore

CHECKPOINT = "checkpoints/last.pt"
#: Besides the settings declared `resumable`: the number of DDP ranks, which only changes the
#: order of float summations.
RESUMABLE_RUN_KEYS = {"world_size"}

__all__ = ["CHECKPOINT", "Callback", "History", "PretrainResult", "Pretrainer", "TrainingDiverged",
           "build_method", "method_views", "resolve_device", "train_context"]


class Callback(Protocol):
    """Receives metrics; implement any subset (MLflow, Prefect, a JSON file...)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None: ...


@dataclass
class History:
    steps: list[dict[str, float]] = field(default_factory=list)
    epochs: list[dict[str, float]] = field(default_factory=list)


@dataclass
class PretrainResult:
    run_dir: Path
    method: SSLMethod
    metrics: dict[str, float]
    history: History


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda if available; under torchrun `cuda` is this rank's `cuda:LOCAL_RANK`."""
    if name == "auto":
        return distributed.local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {name!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available")
    return distributed.local_device(device)


class ShardedAugment(BatchAugment):
    """BatchAugment for one rank's slice of a global batch, with the single-process randomness.

    Why: per-rank generators would give rank r views that no single-process run ever draws,
    and their states would have to be checkpointed per rank (so resuming with another number
    of ranks could not continue the same stream). Instead every rank keeps the same generator,
    draws the uniforms of the *global* batch (V x B_global x NUM_UNIFORMS numbers, negligible
    next to the images) and augments only its own rows; the per-view pipeline is per-image,
    so rank r's views are the rows of the single-process views, and the generator state is
    the same on every rank and for any number of ranks. With one rank this is BatchAugment.
    """

    def __init__(self, *args: Any, rank: int = 0, world_size: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rank, self.world_size = rank, world_size

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        b = images.shape[0]
        u = self.draw(b * self.world_size, generator, images.device)
        return self.apply(images, u[:, self.rank * b:(self.rank + 1) * b])


def train_context(params: EngineSettings, image_size: int, steps_per_epoch: int = 1) -> TrainContext:
    """What a method is told about a run on `image_size` px images (see `TrainContext`)."""
    aug = params.augment
    return TrainContext(image_size=image_size, view_size=aug.global_size or image_size,
                        batch_size=params.pretrain.batch_size, epochs=params.pretrain.epochs,
                        steps_per_epoch=steps_per_epoch, mean=tuple(aug.mean), std=tuple(aug.std), augment=aug)


def method_views(params: EngineSettings, image_size: int) -> list:
    """The configured method's view recipes on `image_size` px images (no network is built)."""
    method = METHODS[params.pretrain.method]
    return method.view_specs(params.pretrain.method_config, train_context(params, image_size))


def check_view_memory(params: EngineSettings, image_size: int, device: torch.device, world_size: int = 1) -> None:
    """Refuse, before any data is loaded, view settings whose augmented batch alone (float32
    views of one rank's batch) would take more than half the device's memory: a `local_size`
    and `local_crops` that ask for terabytes are one line, not an allocator crash."""
    views = method_views(params, image_size) or []
    batch = params.pretrain.batch_size // world_size
    need = sum(batch * 3 * v.size * v.size * 4 for v in views)
    total = device_memory(device)
    if total and need > total // 2:
        sizes = ", ".join(f"{n} x {s}px" for s, n in sorted(Counter(v.size for v in views).items()))
        raise ConfigError(f"one batch of views ({sizes} views of {batch} images: pretrain.batch_size, "
                          f"augment.global_size / local_size / local_crops) needs {need / 2**30:.1f} GiB, more "
                          f"than half of the {total / 2**30:.0f} GiB of {device}; lower them")


def check_view_sizes(params: EngineSettings, image_size: int) -> None:
    """Refuse views larger than the stored images, before any data is loaded: the store size
    (`ingest.size`, what ingest kept) and the view sizes (`augment.global_size`,
    `augment.local_size`) are separate settings, and a view drawn bigger than its source only
    upsamples (blurred pixels, more compute, nothing learned)."""
    views = method_views(params, image_size) or []
    too_big = sorted({v.size for v in views if v.size > image_size})
    if too_big:
        global_size = params.augment.global_size or image_size
        keys = sorted({"augment.global_size" if s == global_size else "augment.local_size" for s in too_big})
        raise ConfigError(f"views of {', '.join(f'{s} px' for s in too_big)} ({' and '.join(keys)}) are larger "
                          f"than the stored {image_size} px images: lower them, or ingest the images at a larger "
                          "ingest.size into a new store")


def device_memory(device: torch.device) -> int:
    """Bytes of memory of `device` (physical RAM for the CPU); 0 when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


def build_method(params: EngineSettings, ctx: TrainContext, device: torch.device) -> SSLMethod:
    """Seeded construction, so the initial weights are a function of `params.seed` (on every rank).

    The backbone comes from the registry (`backbone.name`, built for the view size), the method
    from `pretrain.method` with its own section `pretrain.<method>`. With several ranks every
    BatchNorm becomes a synced one (same state_dict keys), so the statistics are the global
    batch's, as in the single-process run.
    """
    cfg = params.pretrain
    torch.manual_seed(params.seed)
    backbone = build_backbone(params.backbone, ctx.view_size)
    method = METHODS[cfg.method](backbone, cfg.method_config, ctx).to(device)
    if device.type == "cuda":
        method = method.to(memory_format=torch.channels_last)
    if distributed.world_size() > 1:
        distributed.convert_sync_batchnorm(method, device)
    return method


def _check_same_run(saved: dict[str, Any], now: dict[str, Any]) -> None:
    diff = sorted(k for k in set(saved) | set(now)
                  if saved.get(k) != now.get(k) and k not in RESUMABLE_RUN_KEYS and not resumable(k))
    if diff:
        changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:3])
        raise RunStateError(f"cannot resume: settings differ from the checkpoint ({changes}); resume with "
                            "the original settings or start a new run")


class Pretrainer:
    """One pretraining run in `run_dir`: build, optionally resume, `fit()`."""

    def __init__(self, store: ImageStore, params: EngineSettings, run_dir: Path, *, resume: bool = False,
                 callbacks: Sequence[Callback] = (), eval_stores: tuple[ImageStore, ImageStore] | None = None,
                 progress_bar: bool = True) -> None:
        if store.height != store.width:
            raise ConfigError(f"pretraining needs square images; the store holds {store.height}x{store.width}")
        self.params, self.cfg, self.run_dir = params, params.pretrain, Path(run_dir)
        checkpoint = self.run_dir / CHECKPOINT
        if checkpoint.is_file() and not resume:  # before any work: the data may be large
            raise RunStateError(f"{self.run_dir} already holds a run; pass --resume to continue it "
                                "or choose another output directory")
        self.device = resolve_device(params.device)
        distributed.init_from_env(self.device)  # no-op without torchrun
        self.world_size = distributed.world_size()
        self.rank = distributed.rank() if self.world_size > 1 else 0  # a lone process always reports
        self.is_main = self.rank == 0
        if self.cfg.batch_size % self.world_size:
            raise ConfigError(f"pretrain.batch_size ({self.cfg.batch_size}) is the global batch and must be "
                              f"divisible by the number of ranks ({self.world_size})")
        # rank 0 alone reports: the other ranks get no callbacks and no progress bar
        self.callbacks = list(callbacks) if self.is_main else []
        # the bar only on an interactive terminal; elsewhere the per-epoch lines are the progress
        self.progress_bar = progress_bar and self.is_main and sys.stderr.isatty()
        self.image_size = store.height
        check_view_sizes(params, self.image_size)  # before the data is loaded
        check_view_memory(params, self.image_size, self.device, self.world_size)  # before the data is loaded
        self.flat_params = engine_flat(params)
        self.data_fingerprint = {"images": len(store), "shards": [sh.id for sh in store.shards]}

        # resident on the device if it fits in pretrain.max_device_bytes, else streamed from disk:
        # the same batches either way, so the mode is no part of the checkpoint
        self.batches = DeviceBatches(store, self.cfg.batch_size, self.device, params.seed,
                                     max_resident_bytes=self.cfg.max_device_bytes or None,
                                     rank=self.rank, world_size=self.world_size)
        self.steps_per_epoch = len(self.batches)
        self.total_steps = self.cfg.epochs * self.steps_per_epoch
        aug = params.augment
        self.context = train_context(params, self.image_size, self.steps_per_epoch)
        self.method = build_method(params, self.context, self.device)
        views = self.method.views()
        self.augment = ShardedAugment(views, aug.mean, aug.std, compile=self.cfg.compile and self.device.type == "cuda",
                                      rank=self.rank, world_size=self.world_size) if views else None
        lr = self.cfg.lr * self.cfg.batch_size / 256  # the global batch, whatever the number of ranks
        self.optimizer = build_optimizer(self.method.param_groups(self.cfg.weight_decay), self.cfg.optimizer, lr,
                                         momentum=self.cfg.momentum, betas=self.cfg.betas)
        warmup = round(self.cfg.warmup_epochs * self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(warmup, self.total_steps))
        self.generator = torch.Generator(self.device).manual_seed(params.seed)  # the same on every rank
        self.eval_images = self._load_eval(eval_stores) if self.is_main else None

        # Position and accumulators: all of it goes into the checkpoint. `sums` (since the
        # last log) and `epoch_sums` hold the loss and the method's metrics, on the device.
        self.epoch, self.batch_in_epoch, self.step = 0, 0, 0
        self.sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=self.device)}
        self.epoch_sums: dict[str, torch.Tensor] = {"loss": torch.zeros((), device=self.device)}
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.history = History()
        self.train_seconds = 0.0

        if resume and checkpoint.is_file():
            self._restore(checkpoint)
        if not distributed.same_on_all_ranks(self.step, self.device):
            raise RunStateError(f"the ranks resume from different steps: is {self.run_dir} on a filesystem "
                                "every node shares?")
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "params.json").write_text(json.dumps(self.flat_params, indent=1))
        if self.cfg.compile and self.device.type == "cuda" and self.world_size == 1:
            # every backbone of the method (online, momentum/EMA/teacher copies); in place, so
            # state_dict keys stay the same. Not under DDP: torch.compile of SyncBatchNorm is
            # not reliably supported (pytorch/pytorch#107372), the backbones then run eagerly.
            for module in self.method.modules():
                if isinstance(module, Backbone):
                    module.compile()
        # What the loop calls: DDP around the method with several ranks (gradients averaged
        # in backward), the method itself otherwise. `self.method` stays the unwrapped module
        # for checkpoints, EMA updates and evaluation, so nothing saved depends on N.
        self.model = distributed.wrap_ddp(self.method, self.device)

    # ------------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.generator),
            "position": {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step},
            "accumulators": {"sums": dict(self.sums), "epoch_sums": dict(self.epoch_sums)},
            "history": asdict(self.history),
            "train_seconds": self.train_seconds,
            "params": self.flat_params,
            "device_type": self.device.type,
            "data": self.data_fingerprint,
            "world_size": self.world_size,
        }

    def save_checkpoint(self) -> None:
        """Refuse to overwrite the last good checkpoint with diverged weights; rank 0 writes.

        Every rank must call it (the divergence check averages the accumulators over ranks).
        Diverged means a non-finite loss since the last check, or a non-finite weight or buffer
        (BatchNorm statistics can overflow while the loss still looks finite).
        """
        self._raise_if_diverged()
        if self.is_main:
            tensors = [t for t in (*self.method.parameters(), *self.method.buffers()) if t.is_floating_point()]
            if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
                raise TrainingDiverged(
                    f"weights or BatchNorm statistics became NaN/inf at step {self.step} (epoch {self.epoch}); "
                    f"the last good checkpoint is kept in {self.run_dir / CHECKPOINT}. Lower pretrain.lr.")
            atomic_save(self._state(), self.run_dir / CHECKPOINT)

    def _restore(self, path: Path) -> None:
        if self.is_main:  # the only writer
            remove_stale_temporaries(path.parent)
        # on the CPU: RNG states must stay CPU tensors; load_state_dict copies weights to the device
        state = load_data(path, "checkpoint")
        if not isinstance(state, dict) or not {"params", "data", "method", "position"} <= set(state):
            raise RunStateError(f"{path} is not an sslflow checkpoint; start a new run in another directory")
        _check_same_run({**state["params"], "world_size": state.get("world_size", 1)},
                        {**self.flat_params, "world_size": self.world_size})
        if state["data"] != self.data_fingerprint:  # epoch orders and the schedule would differ
            raise RunStateError(f"cannot resume: the training data changed since the checkpoint "
                                f"({state['data']['images']} -> {self.data_fingerprint['images']} images); "
                                "start a new run")
        if state["device_type"] != self.device.type:  # the augmentation RNG streams differ
            raise RunStateError(f"cannot resume: the run was trained on {state['device_type']}, "
                                f"this device is {self.device.type}")
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], self.generator)
        pos = state["position"]
        self.epoch, self.batch_in_epoch, self.step = pos["epoch"], pos["batch_in_epoch"], pos["step"]
        acc = state["accumulators"]
        self.sums = {k: v.to(self.device) for k, v in acc["sums"].items()}
        self.epoch_sums = {k: v.to(self.device) for k, v in acc["epoch_sums"].items()}
        self.history = History(**state["history"])
        self.train_seconds = state["train_seconds"]

    def _sync_accumulators(self) -> None:
        """Average the loss and metric accumulators and OR the NaN flag over ranks (one collective).

        Called only where the host reads them anyway (logs, epoch end, checkpoints). Averaging
        in place at any time keeps the final mean right, makes every rank raise
        `TrainingDiverged` together (instead of one rank leaving the others in a collective),
        and makes the checkpointed accumulators those of the global batch.
        """
        if self.world_size == 1:
            return
        keys = sorted(self.sums)
        packed = torch.stack([*(self.sums[k] for k in keys), *(self.epoch_sums[k] for k in keys),
                              self.nonfinite.float()])
        packed = distributed.all_reduce_mean(packed)
        for i, k in enumerate(keys):
            self.sums[k].copy_(packed[i])
            self.epoch_sums[k].copy_(packed[len(keys) + i])
        self.nonfinite.copy_(packed[-1] > 0)

    def _raise_if_diverged(self) -> None:
        self._sync_accumulators()
        if bool(self.nonfinite):
            raise TrainingDiverged(
                f"loss became NaN/inf before step {self.step} (epoch {self.epoch}); "
                f"the last good checkpoint is kept in {self.run_dir / CHECKPOINT}. "
                "Lower pretrain.lr or check the data."
            )

    # ------------------------------------------------------------------------------ training
    def make_batch(self, images: torch.Tensor) -> Batch:
        """The method's views of this rank's uint8 images (no gradient, no host sync)."""
        with torch.no_grad():
            views = self.augment(images, self.generator) if self.augment is not None else []
        return Batch(views, images, self.context.mean, self.context.std)

    def forward_backward(self, images: torch.Tensor, progress: float) -> Any:
        """Views, loss and gradients of one batch (this rank's part); no optimizer step.

        Returns the method's `StepOutput`; under DDP the gradients are already averaged over ranks.
        """
        batch = self.make_batch(images)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                    else nullcontext())
        with autocast:
            out = self.model(batch, progress)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.method.after_backward(progress)
        return out

    def train_step(self, images: torch.Tensor) -> None:
        """One optimisation step on this rank's part of the next batch; no host sync."""
        progress = self.step / self.total_steps
        out = self.forward_backward(images, progress)
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_step(progress)

        loss = out.loss.detach().float()
        self.nonfinite |= ~torch.isfinite(loss)
        for key, value in {"loss": loss, **out.metrics}.items():
            if key not in self.sums:  # a metric's first step: both accumulators start at 0
                self.sums[key] = torch.zeros((), device=self.device)
                self.epoch_sums[key] = torch.zeros((), device=self.device)
            self.sums[key] += value.detach().float()
            self.epoch_sums[key] += value.detach().float()
        self.step += 1
        self.batch_in_epoch += 1

    def fit(self) -> PretrainResult:
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress_bar,
                   desc=f"{self.cfg.method} pretrain", unit="step", dynamic_ncols=True)
        lines = EpochLines(self.cfg.epochs, start_epoch=self.epoch) if self.is_main else None
        if self.step == 0 and self.eval_images is not None and self.cfg.eval_every:
            # epoch 0 of the kNN curve: what the randomly initialised encoder already gets
            self.history.epochs.append({"epoch": 0, **self.online_knn()})
            for cb in self.callbacks:
                cb.on_epoch_end(0, self.history.epochs[0])
            if lines:
                lines(0, self.history.epochs[0], pause=bar.external_write_mode())
        log_t0, log_step0 = time.perf_counter(), self.step
        while self.epoch < self.cfg.epochs:
            self.method.train()
            epoch_t0, epoch_step0 = time.perf_counter(), self.step
            for images in self.batches.epoch(self.epoch, self.batch_in_epoch):
                self.train_step(images)
                bar.update(1)

                if self.step % self.cfg.log_every == 0:
                    now = time.perf_counter()
                    self._log_steps(self.step - log_step0, now - log_t0, bar)
                    log_t0, log_step0 = now, self.step
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self.save_checkpoint()
            epoch_seconds = time.perf_counter() - epoch_t0
            self.train_seconds += epoch_seconds
            self._end_epoch()
            if lines:  # one line per epoch: the only progress a pipe or a Prefect log shows
                lines(self.epoch, self.history.epochs[-1], images=(self.step - epoch_step0) * self.cfg.batch_size,
                      train_seconds=epoch_seconds, pause=bar.external_write_mode())
            log_t0, log_step0 = time.perf_counter(), self.step
        bar.close()
        return self._finish()

    def _read_means(self, sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        """Means of the accumulated loss and metrics over `n` steps (one host read), then zero them."""
        keys = list(sums)
        values = torch.stack([sums[k] for k in keys]).tolist()
        for k in keys:
            sums[k].zero_()
        return {k: v / max(n, 1) for k, v in zip(keys, values, strict=True)}

    def _log_steps(self, steps: int, seconds: float, bar: tqdm) -> None:
        """The only host sync inside an epoch: every `log_every` steps."""
        self._raise_if_diverged()
        means = self._read_means(self.sums, steps)
        if not self.is_main:
            return
        metrics = {
            **means,
            "lr": self.optimizer.param_groups[0]["lr"],
            "images_per_s": steps * self.cfg.batch_size / max(seconds, 1e-9),
            "epoch": self.epoch + self.batch_in_epoch / self.steps_per_epoch,
        }
        if self.device.type == "cuda":
            metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.history.steps.append({"step": self.step, **metrics})
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
        for cb in self.callbacks:
            cb.on_step(self.step, metrics)

    def _end_epoch(self) -> None:
        self._raise_if_diverged()
        means = self._read_means(self.epoch_sums, self.batch_in_epoch)
        for v in self.sums.values():
            v.zero_()
        metrics = {"epoch": self.epoch + 1, **means, "lr": self.optimizer.param_groups[0]["lr"]}
        done = self.epoch + 1
        if self.eval_images is not None and self.cfg.eval_every and (
            done % self.cfg.eval_every == 0 or done == self.cfg.epochs
        ):
            metrics.update(self.online_knn())
        self.history.epochs.append(metrics)
        self.epoch, self.batch_in_epoch = done, 0
        self.save_checkpoint()
        for cb in self.callbacks:
            cb.on_epoch_end(done, metrics)

    # ------------------------------------------------------------------------------ evaluation
    def _load_eval(self, stores: tuple[ImageStore, ImageStore] | None) -> dict[str, torch.Tensor] | None:
        if stores is None:
            return None
        out: dict[str, torch.Tensor] = {}
        bank = stores[0]
        for name, store in zip(("train", "test"), stores, strict=True):
            labels = torch.from_numpy(store.labels() if store is bank
                                      else map_test_labels(bank, store, store.labels()))
            keep = labels >= 0
            if not bool(keep.any()):
                raise ConfigError(f"online kNN: {store.root} has no labeled images")
            out[f"{name}_images"] = torch.from_numpy(store.images())[keep].to(self.device)
            out[f"{name}_labels"] = labels[keep].to(self.device)
        return out

    def online_knn(self) -> dict[str, float]:
        """kNN top-1/top-5 of the current encoder (frozen features, no augmentation)."""
        assert self.eval_images is not None
        aug, ev = self.params.augment, self.params.eval
        encoder = self.method.encoder()
        feats = {name: extract_features(encoder, self.eval_images[f"{name}_images"], aug.mean, aug.std,
                                        ev.batch_size, self.device) for name in ("train", "test")}
        return knn_classify(feats["train"], self.eval_images["train_labels"], feats["test"],
                            self.eval_images["test_labels"], k=ev.knn_k, temperature=ev.knn_temperature)

    def _finish(self) -> PretrainResult:
        """Rank 0 writes the encoder and metrics; every rank returns once they are written."""
        last = self.history.epochs[-1] if self.history.epochs else {}
        images = self.total_steps * self.cfg.batch_size
        metrics = {
            "final_loss": last.get("loss", math.nan),
            "epochs": self.cfg.epochs,
            "steps": self.total_steps,
            "train_seconds": self.train_seconds,
            "images_per_s": images / max(self.train_seconds, 1e-9),
        }
        for key in ("knn_top1", "knn_top5"):
            if key in last:
                metrics[key] = last[key]
        if self.history.epochs and self.history.epochs[0]["epoch"] == 0:
            metrics["knn_top1_at_init"] = self.history.epochs[0]["knn_top1"]
        if self.is_main:
            save_encoder(self.method.encoder(), self.run_dir, self.params.augment.mean, self.params.augment.std,
                         export=self.cfg.export,
                         extra={"metrics.json": json.dumps(metrics, indent=1).encode(),
                                "history.json": json.dumps(asdict(self.history), indent=1).encode()})
            self._write_visuals()
        distributed.barrier()
        return PretrainResult(self.run_dir, self.method, metrics, self.history)

    @torch.no_grad()
    def _write_visuals(self, n: int = 16) -> None:
        """`visuals/<name>.png`: a grid of what the method's `visualize` returns (reconstructions,
        colorizations, ...) on the first `n` images of epoch 0's order; the tracking step logs them."""
        images = next(self.batches.epoch(0), None)
        if images is None:
            return
        was_training = self.method.training
        self.method.eval()
        try:
            pictures = self.method.visualize(self.make_batch(images[:n]))
        finally:
            self.method.train(was_training)
        if not pictures:
            return
        from torchvision.utils import save_image

        out = self.run_dir / "visuals"
        out.mkdir(exist_ok=True)
        for name, grid in pictures.items():
            save_image(grid.float().clamp(0, 1).cpu(), out / f"{name}.png", nrow=min(len(grid), 8))
