"""Evaluation protocols for a pretrained encoder: kNN, linear probe, full fine-tune.

All three run on one `device` (CUDA or CPU, same code), batched, and never read a value
back to the host inside a loop: correct-prediction counts accumulate on the device and are
read once per protocol. Results are percentages (83.2, not 0.832).

Conventions shared by every protocol (and documented here once):

* **Top-5 with few classes.** Top-5 accuracy is "the true class is among the min(5, C)
  highest-scored classes". For the linear probe and fine-tuning (every class has a score)
  it is therefore always 100.0 with C <= 5; the key is still returned so tracked metric names
  do not depend on the data set (solo-learn does the same).
* **kNN top-5 ranks only voted classes.** A class none of the k neighbours belongs to has no
  score, not a score of 0: it is never counted as a top-5 hit (otherwise with k=1 the other
  classes tie at 0 and top-5 is tie-breaking: 75 % reported where 58 % of the test points had
  their class among the votes). Hence kNN top-5 = top-1 for k=1, and with C <= 5 it is the
  share of test points whose class received a vote.
* **Determinism.** Shuffling and augmentation draw from local `torch.Generator`s seeded from
  `seed`; classifier heads are zero-initialised, so no protocol reads or advances the global
  RNG, and on CPU the same seed gives identical numbers.
* **Class lists** (`evaluate`): test labels are mapped onto the train store's class list *by
  name*, so identical lists, prefix lists and reordered subsets all work; a labeled test image
  whose class name is absent from the train list is an error (it could never be predicted).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sslflow.ssl_models.augment import BatchAugment, eval_view
from sslflow.ssl_models.config import AugmentConfig, EvalConfig
from sslflow.ssl_models.errors import EngineError
from sslflow.ssl_models.store import ImageStore
from sslflow.ssl_models.views import ViewSpec

PROTOCOLS = ("knn", "linear", "finetune")

#: RandomResizedCrop area range of the fine-tune augmentation. Narrower than the (0.08, 1)
#: of SSL pretraining: fine-tuning needs the label-bearing object in the crop, and the data
#: sets here are small images (32-96 px) where a 8% crop is a handful of pixels.
FINETUNE_CROP_SCALE = (0.25, 1.0)
FINETUNE_FLIP_PROB = 0.5

#: kNN similarity chunks hold at most this many elements (128 MiB in fp32).
KNN_CHUNK_ELEMENTS = 1 << 25


class EvaluationError(EngineError, ValueError):
    """The inputs of an evaluation are unusable; the message names the problem in one line."""


@dataclass
class EvalReport:
    """What `evaluate` measured, and how (so a number is never read without its protocol)."""

    metrics: dict[str, float]  # knn_top1, knn_top5, linear_top1, ... (those requested)
    protocols: dict[str, str]  # protocol name -> one-sentence description
    confusion: Tensor | None  # linear-probe confusion (C, C) int64 counts, rows = true class
    num_train: int  # labeled images used (after dropping unlabeled ones)
    num_test: int
    dropped_unlabeled: int  # unlabeled (-1) images dropped from train and test together
    classes: list[str] = dataclasses.field(default_factory=list)  # names of the confusion rows/columns

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict: the metric keys at the top level (what `dvc metrics` and MLflow
        read), then how they were measured. The confusion matrix is `confusion_json()`."""
        return {
            **{k: float(v) for k, v in self.metrics.items()},
            "protocols": dict(self.protocols),
            "num_train": int(self.num_train),
            "num_test": int(self.num_test),
            "dropped_unlabeled": int(self.dropped_unlabeled),
        }

    def confusion_json(self) -> dict[str, Any] | None:
        """The linear-probe confusion matrix with its class names (None if linear did not run)."""
        if self.confusion is None:
            return None
        return {"classes": list(self.classes), "matrix": self.confusion.cpu().tolist()}


# ------------------------------------------------------------------------------------ helpers
def _as_device(device: torch.device | str) -> torch.device:
    """A torch.device with an explicit index for accelerators ("cuda" -> "cuda:<current>"),
    so it compares equal to the device of a tensor or parameter that lives there."""
    device = device if isinstance(device, torch.device) else torch.device(device)
    if device.index is None and device.type != "cpu":
        index = torch.cuda.current_device() if device.type == "cuda" else 0
        device = torch.device(device.type, index)
    return device


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA (tensor cores, no loss scaling needed); a no-op elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _cosine(base_lr: float, step: int, total: int) -> float:
    """Cosine decay from `base_lr` to 0 over `total` steps (no warm-up: both protocols start
    from a trained encoder and a zero head, so there is no early instability to tame)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total, 1)))


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A local generator on `device`: permutations are drawn where they are used (no host
    round trip per epoch) and the global RNG is left untouched."""
    return torch.Generator(device=device).manual_seed(int(seed))


def _labels_tensor(labels: Tensor | np.ndarray | Sequence[int], device: torch.device) -> Tensor:
    t = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    return t.to(device=device, dtype=torch.long)


def _images_tensor(images: Tensor | np.ndarray) -> Tensor:
    t = images if isinstance(images, Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise EvaluationError(f"expected uint8 images of shape (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
    return t


def _num_classes(num_classes: int | None, train_labels: Tensor, test_labels: Tensor | None = None) -> int:
    """Validated class count: `num_classes`, or max label + 1 over both sets.

    Costs one host read per protocol call (not per batch). Worth it: an out-of-range label
    would otherwise be a silent miscount or, in `scatter_add_`/`cross_entropy` on CUDA, a
    device-side assert that kills the process.
    """
    parts = [y for y in (train_labels, test_labels) if y is not None and y.numel()]
    lo, hi = torch.stack([torch.stack([y.min(), y.max()]) for y in parts]).T.tolist()
    lo, hi = int(min(lo)), int(max(hi))
    c = hi + 1 if num_classes is None else int(num_classes)
    if lo < 0 or hi >= c:
        raise EvaluationError(f"labels must be class indices in [0, {c}); got values in [{lo}, {hi}] "
                              "(drop unlabeled -1 rows first)")
    return c


def _topk_hits(scores: Tensor, labels: Tensor, ranked: Tensor | None = None) -> Tensor:
    """(2,) counts on the device: [top-1 hits, top-min(5, C) hits] of one chunk.

    `ranked` (chunk, C) bool: the classes that may be ranked at all (kNN: those that received a
    vote); a class outside it is never a hit, whatever its position among the ties. None = all.
    """
    k = min(5, scores.shape[1])
    if ranked is not None:
        scores = scores.masked_fill(~ranked, float("-inf"))
    top = scores.topk(k, dim=1)
    hit = top.indices == labels[:, None]
    if ranked is not None:
        hit &= ranked.gather(1, top.indices)
    return torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])


def _percent(hits: Tensor, total: int, prefix: str) -> dict[str, float]:
    """The single host read of a protocol: counts -> percentages."""
    top1, top5 = hits.tolist()
    return {f"{prefix}_top1": 100.0 * top1 / total, f"{prefix}_top5": 100.0 * top5 / total}


# ------------------------------------------------------------------------------------ features
@torch.no_grad()
def extract_features(encoder: nn.Module, images: Tensor | np.ndarray, mean: Sequence[float],
                     std: Sequence[float], batch_size: int, device: torch.device | str) -> Tensor:
    """Frozen-encoder features: uint8 (N, H, W, 3) -> float32 (N, D) on `device`.

    The encoder must already live on `device` (moving it would mutate the caller's model);
    it runs in eval mode (BatchNorm uses running statistics, so a feature does not depend on
    its batch) and every submodule's own train/eval flag is restored afterwards. On CUDA the
    input is channels_last under bf16 autocast (the encoder's weights are not converted, again
    to leave the caller's model as it was); on CPU plain fp32. Host images are copied one
    batch at a time through pinned memory, so the whole set never has to fit on the device.
    """
    device = _as_device(device)
    x_all = _images_tensor(images)
    n = len(x_all)
    if n == 0:
        raise EvaluationError("no images to extract features from")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, got {batch_size}")
    param = next(encoder.parameters(), None)
    if param is not None and param.device != device:
        raise EvaluationError(f"the encoder is on {param.device}, but features are extracted on {device}")

    cuda = device.type == "cuda"
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        out: Tensor | None = None
        for start in range(0, n, batch_size):
            batch = x_all[start:start + batch_size]
            if batch.device != device:
                if cuda and batch.device.type == "cpu":
                    batch = batch.pin_memory()
                batch = batch.to(device, non_blocking=cuda)
            x = eval_view(batch, mean, std)  # float32, channels_last on CUDA (free from NHWC uint8)
            with _autocast(device):
                f = encoder(x)
            f = f.flatten(1).float()
            if out is None:
                out = torch.empty(n, f.shape[1], device=device, dtype=torch.float32)
            out[start:start + len(f)] = f
    finally:
        for m, training in modes:
            m.training = training
    assert out is not None
    return out


# ------------------------------------------------------------------------------------ kNN
def _knn_vote_chunks(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int,
                     temperature: float, num_classes: int, chunk_size: int | None
                     ) -> Iterator[tuple[int, Tensor, Tensor]]:
    """(start, votes (chunk, C), voted (chunk, C) bool) over the test set; see `knn_classify`.

    `voted` marks the classes at least one neighbour belongs to (counted, not read off the
    votes: with a tiny T a far neighbour's weight underflows to 0 but it still voted)."""
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.to(train.device).float(), dim=1)
    labels = train_labels.to(train.device).long()
    k = min(k, len(train))
    chunk = chunk_size or max(1, KNN_CHUNK_ELEMENTS // max(len(train), 1))
    for start in range(0, len(test), chunk):
        sim = test[start:start + chunk] @ train.T  # (c, N) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # sorted: column 0 is the nearest neighbour
        # exp((s - s_max) / T), i.e. exp(s / T) rescaled per test point: the same ranking of
        # classes, but no overflow to inf for small T (exp(1 / 0.01) > float32 max).
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()
        votes = torch.zeros(len(top_sim), num_classes, device=train.device, dtype=torch.float32)
        votes.scatter_add_(1, labels[top_idx], weights)
        voted = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, labels[top_idx], True)
        yield start, votes, voted


def _check_knn_inputs(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int,
                      temperature: float) -> None:
    if len(train_feats) == 0 or len(test_feats) == 0:
        raise EvaluationError(f"kNN needs train and test features, got {len(train_feats)} "
                              f"and {len(test_feats)}")
    if train_feats.shape[1:] != test_feats.shape[1:]:
        raise EvaluationError(f"train features {tuple(train_feats.shape)} and test features "
                              f"{tuple(test_feats.shape)} differ in dimension")
    if len(train_labels) != len(train_feats):
        raise EvaluationError(f"{len(train_feats)} train features but {len(train_labels)} labels")
    if k < 1 or temperature <= 0:
        raise EvaluationError(f"kNN needs k >= 1 and temperature > 0, got k={k}, T={temperature}")


def knn_votes(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, k: int = 200,
              temperature: float = 0.07, num_classes: int | None = None,
              chunk_size: int | None = None) -> Tensor:
    """Per-class weighted votes (M, C) of every test point; `knn_classify` without the scoring.

    Row i is sum over the k nearest neighbours j of exp((s_ij - max_j s_ij) / T): the classic
    exp(s / T) votes times a per-row constant, so the nearest neighbour weighs exactly 1.
    Exposed for inspection (per-image predictions, tests); holds the whole (M, C) matrix.
    """
    train_labels = _labels_tensor(train_labels, train_feats.device)
    _check_knn_inputs(train_feats, train_labels, test_feats, k, temperature)
    c = _num_classes(num_classes, train_labels)
    parts = [v for _, v, _ in _knn_vote_chunks(train_feats, train_labels, test_feats, k, temperature, c,
                                            chunk_size)]
    return torch.cat(parts)


def knn_classify(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 k: int = 200, temperature: float = 0.07, num_classes: int | None = None,
                 chunk_size: int | None = None) -> dict[str, float]:
    """Weighted kNN accuracy on frozen features (the InstDisc / solo-learn protocol).

    Features are L2-normalised, so similarity is cosine. Each test point takes its k most
    similar train points; neighbour j votes exp(s_j / T) for its class; the prediction is the
    class with the largest summed vote (computed as exp((s_j - s_max) / T), which ranks the
    classes identically and cannot overflow). The exponential weighting lets a few very close
    neighbours outvote many distant ones, which is what makes k=200 work on CIFAR/ImageNet.

    `k` larger than the train set is clamped to its size (every train point votes) rather
    than failing, so tiny smoke-test sets still evaluate. The test set is processed in chunks
    of `chunk_size` rows (default: as many as keep one chunk's (chunk, N) similarity matrix
    under 2^25 elements), which bounds memory for any test set size. `num_classes` defaults
    to max label + 1 over train and test. Top-5 ranks only the classes that received a vote
    (see the module docstring): with k=1 it equals top-1. Keys: "knn_top1", "knn_top5" (percent).
    """
    device = train_feats.device
    train_labels = _labels_tensor(train_labels, device)
    test_labels = _labels_tensor(test_labels, device)
    _check_knn_inputs(train_feats, train_labels, test_feats, k, temperature)
    if len(test_labels) != len(test_feats):
        raise EvaluationError(f"{len(test_feats)} test features but {len(test_labels)} labels")
    c = _num_classes(num_classes, train_labels, test_labels)
    hits = torch.zeros(2, dtype=torch.long, device=device)
    for start, votes, voted in _knn_vote_chunks(train_feats, train_labels, test_feats, k, temperature, c,
                                                chunk_size):
        hits += _topk_hits(votes, test_labels[start:start + len(votes)], voted)
    return _percent(hits, len(test_feats), "knn")


# ------------------------------------------------------------------------------------ linear
def _linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                  cfg: EvalConfig, seed: int, num_classes: int | None = None
                  ) -> tuple[dict[str, float], Tensor]:
    """`linear_probe` plus the (C, C) confusion matrix (int64, CPU, rows = true class)."""
    device = train_feats.device
    y_train = _labels_tensor(train_labels, device)
    y_test = _labels_tensor(test_labels, device)
    x_train = train_feats.float()
    x_test = test_feats.to(device).float()
    n, d = x_train.shape
    if n == 0 or len(x_test) == 0:
        raise EvaluationError(f"linear probe needs train and test features, got {n} and {len(x_test)}")
    if len(y_train) != n or len(y_test) != len(x_test) or x_test.shape[1] != d:
        raise EvaluationError(f"linear probe: features/labels disagree: train {tuple(x_train.shape)} with "
                              f"{len(y_train)} labels, test {tuple(x_test.shape)} with {len(y_test)} labels")
    c = _num_classes(num_classes, y_train, y_test)

    # Standardise with train statistics: SGD on raw SSL features (scales differ by method and
    # by orders of magnitude between dimensions) would need a per-encoder learning rate.
    mu = x_train.mean(dim=0)
    sigma = x_train.std(dim=0, unbiased=False).clamp_min(1e-6)
    x_train = (x_train - mu) / sigma
    x_test = (x_test - mu) / sigma

    # Zero init: the problem is convex (softmax regression), so it loses nothing and needs
    # no random draw (no global-RNG use, bitwise reproducible).
    weight = torch.zeros(c, d, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)
    batch = max(1, min(cfg.linear_batch_size, n))
    base_lr = cfg.linear_lr * batch / 256
    # Weight decay on the weight only: decaying the bias just biases the class priors.
    opt = torch.optim.SGD([{"params": [weight], "weight_decay": cfg.linear_weight_decay},
                           {"params": [bias], "weight_decay": 0.0}], lr=base_lr, momentum=0.9)
    steps_per_epoch = -(-n // batch)
    total = cfg.linear_epochs * steps_per_epoch
    g = _generator(device, seed)
    step = 0
    for _ in range(cfg.linear_epochs):
        perm = torch.randperm(n, generator=g, device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            for group in opt.param_groups:
                group["lr"] = _cosine(base_lr, step, total)
            loss = F.cross_entropy(F.linear(x_train[idx], weight, bias), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1

    with torch.no_grad():
        hits = torch.zeros(2, dtype=torch.long, device=device)
        confusion = torch.zeros(c * c, dtype=torch.long, device=device)
        chunk = max(1, KNN_CHUNK_ELEMENTS // max(c, d))
        for start in range(0, len(x_test), chunk):
            logits = F.linear(x_test[start:start + chunk], weight, bias)
            y = y_test[start:start + chunk]
            hits += _topk_hits(logits, y)
            confusion += torch.bincount(y * c + logits.argmax(dim=1), minlength=c * c)
    return _percent(hits, len(x_test), "linear"), confusion.view(c, c).cpu()


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor, test_labels: Tensor,
                 cfg: EvalConfig, seed: int, num_classes: int | None = None) -> dict[str, float]:
    """Linear-probe accuracy: a softmax classifier on frozen features extracted once.

    Features are standardised with the train set's per-dimension mean/std; the classifier is
    zero-initialised and trained with SGD (momentum 0.9) for `cfg.linear_epochs`, lr
    `cfg.linear_lr * batch / 256` decayed by a per-step cosine to 0, weight decay
    `cfg.linear_weight_decay` on the weight matrix only, cross-entropy, mini-batches of
    `cfg.linear_batch_size` (the last one of an epoch may be smaller) drawn on the device from
    a generator seeded with `seed`. No augmentation: features are computed once, which is
    what makes 100 epochs cheap. Keys: "linear_top1", "linear_top5" (percent).
    """
    return _linear_probe(train_feats, train_labels, test_feats, test_labels, cfg, seed, num_classes)[0]


# ------------------------------------------------------------------------------------ fine-tune
def _feature_dim(encoder: nn.Module, image_hw: tuple[int, int], device: torch.device) -> int:
    dim = getattr(encoder, "feature_dim", None)
    if isinstance(dim, int):
        return dim
    modes = [(m, m.training) for m in encoder.modules()]
    encoder.eval()
    try:
        with torch.no_grad():
            return int(encoder(torch.zeros(1, 3, *image_hw, device=device)).flatten(1).shape[1])
    finally:
        for m, training in modes:
            m.training = training


def finetune(encoder: nn.Module, train_images: Tensor | np.ndarray, train_labels: Tensor | np.ndarray,
             test_images: Tensor | np.ndarray, test_labels: Tensor | np.ndarray, num_classes: int,
             aug: AugmentConfig, cfg: EvalConfig, device: torch.device | str, seed: int) -> dict[str, float]:
    """Full fine-tune accuracy: a copy of the encoder plus a linear head, all layers trained.

    The passed encoder is deep-copied and never modified. Head lr = `cfg.finetune_lr`,
    backbone lr = `cfg.finetune_lr * cfg.finetune_backbone_lr_scale` (a smaller backbone rate
    keeps the pretrained features from being wiped out while the head is still untrained),
    both scaled by batch / 256 and decayed by a per-step cosine to 0; SGD momentum 0.9; weight
    decay `cfg.finetune_weight_decay` on conv/linear weights only (not on biases or BatchNorm,
    the usual convention); zero-initialised head. BatchNorm runs in train mode (batch
    statistics, running averages updated) as in supervised training; the last incomplete
    batch of an epoch is dropped so a batch of 1 never reaches BatchNorm.

    Training augmentation is RandomResizedCrop (area `FINETUNE_CROP_SCALE`, aspect ratio
    `aug.crop_ratio`) back to the image size plus a horizontal flip with probability 0.5 -
    `BatchAugment` with colour jitter, grayscale, blur and solarize all switched off - drawn
    from a generator seeded with `seed`. The test set is scored without augmentation. The
    training images are copied to the device once (uint8), so they must fit there.
    bf16 autocast and channels_last on CUDA. Keys: "finetune_top1", "finetune_top5" (percent).
    """
    device = _as_device(device)
    x_train = _images_tensor(train_images).to(device)
    x_test = _images_tensor(test_images)
    y_train = _labels_tensor(train_labels, device)
    y_test = _labels_tensor(test_labels, device)
    n, h, w, _ = x_train.shape
    if n == 0 or len(x_test) == 0:
        raise EvaluationError(f"fine-tune needs train and test images, got {n} and {len(x_test)}")
    if len(y_train) != n or len(y_test) != len(x_test):
        raise EvaluationError(f"fine-tune: {n} train images with {len(y_train)} labels, "
                              f"{len(x_test)} test images with {len(y_test)} labels")
    if h != w:
        raise EvaluationError(f"fine-tune needs square images (the crop's output is square), got {h}x{w}")
    _num_classes(num_classes, y_train, y_test)
    cuda = device.type == "cuda"

    model = copy.deepcopy(encoder).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    dim = _feature_dim(model, (h, w), device)
    # skip_init: nn.Linear's constructor would draw its init from the global RNG.
    head = nn.utils.skip_init(nn.Linear, dim, num_classes, device=device)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()

    batch = max(1, min(cfg.finetune_batch_size, n))
    scale = batch / 256
    head_lr = cfg.finetune_lr * scale
    backbone_lr = cfg.finetune_lr * cfg.finetune_backbone_lr_scale * scale
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    wd = cfg.finetune_weight_decay
    groups = [
        {"params": decay, "lr": backbone_lr, "base_lr": backbone_lr, "weight_decay": wd},
        {"params": no_decay, "lr": backbone_lr, "base_lr": backbone_lr, "weight_decay": 0.0},
        {"params": [head.weight], "lr": head_lr, "base_lr": head_lr, "weight_decay": wd},
        {"params": [head.bias], "lr": head_lr, "base_lr": head_lr, "weight_decay": 0.0},
    ]
    opt = torch.optim.SGD([gr for gr in groups if gr["params"]], lr=head_lr, momentum=0.9)

    train_aug = BatchAugment([ViewSpec(size=h, scale=FINETUNE_CROP_SCALE, ratio=tuple(aug.crop_ratio),
                                       flip_prob=FINETUNE_FLIP_PROB)], aug.mean, aug.std)
    g_order = _generator(device, seed)
    g_aug = _generator(device, seed + 1)
    steps_per_epoch = n // batch
    total = cfg.finetune_epochs * steps_per_epoch
    step = 0
    model.train()
    head.train()
    for _ in range(cfg.finetune_epochs):
        perm = torch.randperm(n, generator=g_order, device=device)
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            (x,) = train_aug(x_train[idx], g_aug)  # the model layout already
            for group in opt.param_groups:
                group["lr"] = _cosine(group["base_lr"], step, total)
            with _autocast(device):
                logits = head(model(x).flatten(1))
            loss = F.cross_entropy(logits.float(), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1

    feats = extract_features(model, x_test, aug.mean, aug.std, cfg.batch_size, device)
    with torch.no_grad():
        hits = _topk_hits(head(feats), y_test)
    return _percent(hits, len(x_test), "finetune")


# ------------------------------------------------------------------------------------ evaluate
def _labeled(store: ImageStore, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(images, labels, dropped) of the labeled rows of a store, after validating it."""
    if len(store) == 0:
        raise EvaluationError(f"{name} set {store.root} is empty (0 images)")
    labels = store.labels()
    keep = labels >= 0
    dropped = int((~keep).sum())
    if not keep.any():
        raise EvaluationError(f"{name} set {store.root} has no labeled images "
                              f"(all {len(labels)} are unlabeled, label -1)")
    if labels.max() >= len(store.classes):
        raise EvaluationError(f"{name} set {store.root} has label {int(labels.max())} but only "
                              f"{len(store.classes)} class names")
    images = store.images()
    if dropped:
        images, labels = images[keep], labels[keep]
    return images, labels, dropped


def map_test_labels(train: ImageStore, test: ImageStore, test_labels: np.ndarray) -> np.ndarray:
    """Test labels as indices into the train class list, matched by class name (two stores
    number their classes independently: in the order each first saw them). -1 stays -1."""
    index = {name: i for i, name in enumerate(train.classes)}
    used = np.unique(test_labels[test_labels >= 0])
    missing = [test.classes[i] for i in used if test.classes[i] not in index]
    if missing:
        raise EvaluationError(f"test set has labeled images of classes absent from the train set: {missing}")
    lookup = np.array([index.get(name, -1) for name in test.classes] + [-1], dtype=np.int64)
    return lookup[test_labels]  # label -1 (unlabeled) picks the trailing -1


def _describe(protocol: str, cfg: EvalConfig, num_classes: int, num_train: int) -> str:
    top5 = " (top-5 is trivially 100% with <= 5 classes)" if num_classes <= 5 else ""
    if protocol == "knn":
        k = f"k={cfg.knn_k}" if cfg.knn_k <= num_train else f"k={cfg.knn_k} clamped to {num_train}"
        return (f"kNN: cosine, {k}, T={cfg.knn_temperature}, weighted votes exp(s/T), "
                f"frozen features{top5}")
    if protocol == "linear":
        return (f"linear probe: frozen standardised features, SGD momentum 0.9 + cosine, "
                f"{cfg.linear_epochs} epochs, lr {cfg.linear_lr} x batch {cfg.linear_batch_size}/256, "
                f"wd {cfg.linear_weight_decay}, no augmentation{top5}")
    return (f"fine-tune: all layers, SGD momentum 0.9 + cosine, {cfg.finetune_epochs} epochs, head lr "
            f"{cfg.finetune_lr} / backbone x{cfg.finetune_backbone_lr_scale} (x batch "
            f"{cfg.finetune_batch_size}/256), wd {cfg.finetune_weight_decay}, crop scale "
            f"{FINETUNE_CROP_SCALE} + flip{top5}")


def evaluate(encoder: nn.Module, train: ImageStore, test: ImageStore, protocols: Sequence[str],
             cfg: EvalConfig, aug: AugmentConfig, device: torch.device | str, seed: int) -> EvalReport:
    """Run the requested protocols on a labeled train/test pair of stores.

    Validation (each failure an `EvaluationError` with a one-line message): known, non-empty
    protocol list; non-empty stores with equal image sizes; at least one labeled image in
    each after unlabeled (-1) rows are dropped (the count is in the report); test classes
    present in the train class list (matched by name, see the module docstring). An encoder
    that is not on `device` is copied there (never moved: the caller's model is left as it
    was). Features are extracted once and shared by kNN and the linear probe. The number of
    classes is the length of the train class list, so the confusion matrix rows/columns
    follow `train.classes`.
    """
    device = _as_device(device)
    requested = list(dict.fromkeys(protocols))
    if not requested:
        raise EvaluationError(f"no evaluation protocol requested; choose from {list(PROTOCOLS)}")
    unknown = [p for p in requested if p not in PROTOCOLS]
    if unknown:
        raise EvaluationError(f"unknown evaluation protocol(s) {unknown}; choose from {list(PROTOCOLS)}")
    if (train.height, train.width) != (test.height, test.width):
        raise EvaluationError(f"image size mismatch: train images are {train.height}x{train.width}, "
                              f"test images are {test.height}x{test.width}")
    x_train, y_train, dropped_train = _labeled(train, "train")
    x_test, y_test, dropped_test = _labeled(test, "test")
    y_test = map_test_labels(train, test, y_test)
    num_classes = len(train.classes)

    metrics: dict[str, float] = {}
    confusion: Tensor | None = None
    if "knn" in requested or "linear" in requested:
        param = next(encoder.parameters(), None)
        if param is not None and param.device != device:
            encoder = copy.deepcopy(encoder).to(device)  # a copy: the caller's model stays where it is
        f_train = extract_features(encoder, x_train, aug.mean, aug.std, cfg.batch_size, device)
        f_test = extract_features(encoder, x_test, aug.mean, aug.std, cfg.batch_size, device)
        t_train = torch.from_numpy(y_train).to(device)
        t_test = torch.from_numpy(y_test).to(device)
        if "knn" in requested:
            metrics |= knn_classify(f_train, t_train, f_test, t_test, k=cfg.knn_k,
                                    temperature=cfg.knn_temperature, num_classes=num_classes)
        if "linear" in requested:
            lin, confusion = _linear_probe(f_train, t_train, f_test, t_test, cfg, seed, num_classes)
            metrics |= lin
        del f_train, f_test
    if "finetune" in requested:
        metrics |= finetune(encoder, x_train, y_train, x_test, y_test, num_classes, aug, cfg, device, seed)

    ordered = {k: metrics[k] for p in requested for k in (f"{p}_top1", f"{p}_top5")}
    return EvalReport(
        metrics=ordered,
        protocols={p: _describe(p, cfg, num_classes, len(y_train)) for p in requested},
        confusion=confusion,
        num_train=len(y_train),
        num_test=len(y_test),
        dropped_unlabeled=dropped_train + dropped_test,
        classes=list(train.classes),
    )
