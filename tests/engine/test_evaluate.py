"""Tests of the evaluation protocols (ssl_models/evaluate.py); CPU, a few seconds each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sslflow.ssl_models.backbones import SSLResNet
from sslflow.ssl_models.config import AugmentConfig, EvalConfig
from sslflow.ssl_models.evaluate import (
    EvaluationError,
    evaluate,
    extract_features,
    finetune,
    knn_classify,
    knn_votes,
    linear_probe,
)
from sslflow.ssl_models.store import ImageStore

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
AUG = AugmentConfig(
    strength=0.5, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), flip_prob=0.5, jitter_prob=0.8,
    grayscale_prob=0.2, blur_sigma=(0.1, 2.0), local_crops=0, local_crop_scale=(0.05, 0.4), local_size=8,
    mean=MEAN, std=STD,
)
CFG = EvalConfig(
    protocols=("knn", "linear"), knn_k=20, knn_temperature=0.07, batch_size=64, linear_epochs=10,
    linear_lr=0.1, linear_weight_decay=0.0, linear_batch_size=64, finetune_epochs=8, finetune_lr=0.4,
    finetune_backbone_lr_scale=0.5, finetune_weight_decay=5e-4, finetune_batch_size=32,
)
CPU = torch.device("cpu")
# the same code runs on CUDA; exercised there when a GPU is present
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


# ------------------------------------------------------------------------------------ helpers
def reference_votes(train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, k: int, t: float,
                    c: int) -> torch.Tensor:
    """Brute force, one test point at a time, in float64.

    Votes exp(s / T), each row divided by exp(s_max / T) (the implementation's overflow-safe
    scaling: it does not change the ranking of the classes).
    """
    train = torch.nn.functional.normalize(train.double(), dim=1)
    test = torch.nn.functional.normalize(test.double(), dim=1)
    k = min(k, len(train))
    out = torch.zeros(len(test), c, dtype=torch.float64)
    for i, x in enumerate(test):
        sims = train @ x
        order = torch.argsort(sims, descending=True)[:k].tolist()
        for j in order:
            out[i, labels[j]] += math.exp(sims[j].item() / t)
        out[i] /= math.exp(sims[order[0]].item() / t)
    return out


def reference_accuracy(votes: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Top-1/top-5 in percent, ranking only the classes that received a vote (a vote is > 0 in
    float64 here); asserts no test point's top-5 membership depends on tie-breaking."""
    top1 = top5 = 0
    k = min(5, votes.shape[1])
    for v, y in zip(votes, labels, strict=True):
        top1 += int(v.argmax() == y)
        if v[y] == 0:  # no neighbour of class y: not ranked, never a hit
            continue
        greater = int((v > v[y]).sum())
        tied = int((v == v[y]).sum())  # includes y itself
        assert greater >= k or greater + tied <= k, "ambiguous top-5 (ties at the boundary)"
        top5 += int(greater + tied <= k)
    return 100.0 * top1 / len(labels), 100.0 * top5 / len(labels)


def clusters(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(1234)) * 4
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centers[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def solid_images(n_per_class: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """4 classes: red, green and blue solid squares and a black/white checkerboard, with noise."""
    rng = np.random.default_rng(seed)
    base = np.zeros((4, size, size, 3), np.float32)
    base[0, ..., 0] = base[1, ..., 1] = base[2, ..., 2] = 200
    yy, xx = np.mgrid[:size, :size]
    base[3] = (((yy // 4 + xx // 4) % 2) * 200)[..., None]
    labels = np.repeat(np.arange(4), n_per_class)
    imgs = base[labels] + rng.normal(0, 20, (len(labels), size, size, 3))
    return np.clip(imgs, 0, 255).astype(np.uint8), labels.astype(np.int64)


def tiny_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return SSLResNet("resnet18", width=8)


def make_store(path, images: np.ndarray, names: list[str | None]) -> ImageStore:
    store = ImageStore.create(path, images.shape[1], images.shape[2])
    if len(images):
        store.add(images, names)
    return store


# ------------------------------------------------------------------------------------ kNN
@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize(("k", "chunk"), [(10, 7), (1000, 64), (1, None)])
def test_knn_matches_brute_force(k: int, chunk: int | None, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    c, n, m = 8, 50 if k == 1000 else 300, 40  # k=1000 > 50 train points: clamped
    train, test = torch.randn(n, 16, generator=g), torch.randn(m, 16, generator=g)
    y_train = torch.randint(0, c, (n,), generator=g)
    y_test = torch.randint(0, c, (m,), generator=g)
    t = 0.1
    ref = reference_votes(train, y_train, test, k, t, c)
    train, test, y_train, y_test = (v.to(device) for v in (train, test, y_train, y_test))
    votes = knn_votes(train, y_train, test, k=k, temperature=t, num_classes=c, chunk_size=chunk)
    torch.testing.assert_close(votes.double().cpu(), ref, rtol=1e-4, atol=1e-6)

    got = knn_classify(train, y_train, test, y_test, k=k, temperature=t, num_classes=c, chunk_size=chunk)
    top1, top5 = reference_accuracy(ref, y_test)
    assert set(got) == {"knn_top1", "knn_top5"}
    assert got["knn_top1"] == pytest.approx(top1)
    assert got["knn_top5"] == pytest.approx(top5)


def test_knn_clamps_k_to_train_size() -> None:
    feats, labels = clusters(5, 3, 8, 0.1, 0)
    a = knn_classify(feats, labels, feats, labels, k=10_000, temperature=0.07)
    b = knn_classify(feats, labels, feats, labels, k=len(feats), temperature=0.07)
    assert a == b


def test_knn_separated_clusters_is_perfect_and_shuffled_labels_are_chance() -> None:
    train, y_train = clusters(100, 10, 32, 0.5, seed=0)
    test, y_test = clusters(30, 10, 32, 0.5, seed=1)
    assert knn_classify(train, y_train, test, y_test, k=20)["knn_top1"] == 100.0

    perm = torch.randperm(len(y_train), generator=torch.Generator().manual_seed(3))
    res = knn_classify(train, y_train[perm], test, y_test, k=20)
    assert 3.0 < res["knn_top1"] < 20.0  # chance is 10%
    assert 30.0 < res["knn_top5"] < 70.0  # chance is 50%


def test_knn_top5_with_few_classes_counts_only_voted_classes() -> None:
    """C <= 5: top-5 is the share of test points whose class got at least one of the k votes
    (not 100 %, as ranking the unvoted classes too would give)."""
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(40, 4, generator=g), torch.randn(200, 4, generator=g)
    y_train, y_test = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (200,), generator=g)
    res = knn_classify(train, y_train, test, y_test, k=3)
    voted = knn_votes(train, y_train, test, k=3, num_classes=3) > 0
    expected = 100.0 * voted[torch.arange(200), y_test].double().mean().item()
    assert res["knn_top5"] == pytest.approx(expected) and expected < 100.0


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_knn_top5_ranks_only_voted_classes_so_k1_top5_equals_top1(device: torch.device) -> None:
    """With k=1 only the nearest neighbour's class has a vote: top-5 must equal top-1. Counting
    the classes without a vote (all tied at 0) reported 75 % where 58 % is the truth."""
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g).to(device), torch.randn(200, 16, generator=g).to(device)
    y_train = torch.randint(0, 10, (300,), generator=g).to(device)
    y_test = torch.randint(0, 10, (200,), generator=g).to(device)
    res = knn_classify(train, y_train, test, y_test, k=1, temperature=0.07, chunk_size=37)
    assert 0.0 < res["knn_top1"] < 30.0  # random labels: about chance
    assert res["knn_top5"] == res["knn_top1"]
    # k=3: at most 3 voted classes, so top-5 = "the class is among the neighbours' classes"
    res3 = knn_classify(train, y_train, test, y_test, k=3, temperature=0.07)
    votes = knn_votes(train, y_train, test, k=3, temperature=0.07, num_classes=10)
    among = (votes > 0)[torch.arange(200, device=device), y_test].double().mean().item()
    assert res3["knn_top5"] == pytest.approx(100.0 * among)


def test_knn_small_temperature_does_not_overflow() -> None:
    train, y_train = clusters(20, 10, 16, 0.5, seed=0)
    test, y_test = clusters(5, 10, 16, 0.5, seed=1)
    votes = knn_votes(train, y_train, test, k=20, temperature=0.001)
    assert torch.isfinite(votes).all()
    assert knn_classify(train, y_train, test, y_test, k=20, temperature=0.001)["knn_top1"] == 100.0


def test_knn_rejects_bad_inputs() -> None:
    x = torch.randn(4, 3)
    with pytest.raises(EvaluationError, match="dimension"):
        knn_classify(x, torch.zeros(4), torch.randn(4, 5), torch.zeros(4))
    with pytest.raises(EvaluationError, match="k >= 1"):
        knn_classify(x, torch.zeros(4), x, torch.zeros(4), k=0)
    with pytest.raises(EvaluationError, match=r"class indices in \[0, 2\).*\[-1, 1\]"):
        knn_classify(x, torch.tensor([0, 1, -1, 0]), x, torch.zeros(4), num_classes=2)
    with pytest.raises(EvaluationError, match=r"class indices in \[0, 2\)"):
        linear_probe(x, torch.tensor([0, 1, 1, 0]), x, torch.tensor([0, 1, 2, 0]), CFG, seed=0, num_classes=2)


# ------------------------------------------------------------------------------------ linear
@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_linear_probe_separable_and_deterministic(device: torch.device) -> None:
    # Different scales per dimension and an offset: the standardisation has to cope.
    train, y_train = clusters(100, 6, 24, 1.0, seed=0)
    test, y_test = clusters(50, 6, 24, 1.0, seed=1)
    scale = torch.logspace(-2, 2, 24)
    train, test = train * scale + 7, test * scale + 7
    train, y_train, test, y_test = (v.to(device) for v in (train, y_train, test, y_test))
    rng_before = torch.get_rng_state()
    a = linear_probe(train, y_train, test, y_test, CFG, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is left alone
    b = linear_probe(train, y_train, test, y_test, CFG, seed=0)
    assert a == b
    assert set(a) == {"linear_top1", "linear_top5"}
    assert a["linear_top1"] > 95.0
    assert a["linear_top5"] >= a["linear_top1"]


# ------------------------------------------------------------------------------------ features
def test_extract_features_shape_mode_and_values() -> None:
    enc = tiny_encoder()
    enc.train()
    enc.layer1.eval()  # a mixed-mode module: each submodule's flag must come back as it was
    modes = {name: m.training for name, m in enc.named_modules()}
    imgs, _ = solid_images(5, seed=0)  # 20 images, 3 batches of 8
    feats = extract_features(enc, imgs, MEAN, STD, batch_size=8, device=CPU)
    assert feats.shape == (20, enc.feature_dim) and feats.dtype == torch.float32
    assert {name: m.training for name, m in enc.named_modules()} == modes

    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    enc.eval()
    with torch.no_grad():
        manual = enc(x)
    torch.testing.assert_close(feats, manual, rtol=1e-4, atol=1e-5)
    # a tensor input (as the trainer passes) gives the same
    torch.testing.assert_close(extract_features(enc, torch.from_numpy(imgs), MEAN, STD, 64, CPU), feats)


# ------------------------------------------------------------------------------------ fine-tune
def test_finetune_learns_and_leaves_encoder_untouched() -> None:
    enc = tiny_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    x_train, y_train = solid_images(24, seed=0)  # 96 images, 3 steps of 32 per epoch
    x_test, y_test = solid_images(10, seed=1)
    rng_before = torch.get_rng_state()
    a = finetune(enc, x_train, y_train, x_test, y_test, 4, AUG, CFG, CPU, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert set(a) == {"finetune_top1", "finetune_top5"}
    assert a["finetune_top1"] >= 60.0, a  # chance is 25%
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    b = finetune(enc, x_train, y_train, x_test, y_test, 4, AUG, CFG, CPU, seed=0)
    assert a == b


# ------------------------------------------------------------------------------------ evaluate
@pytest.fixture
def stores(tmp_path):
    x_train, y_train = solid_images(12, seed=0)
    x_test, y_test = solid_images(5, seed=1)
    names = ["red", "green", "blue", "checker"]
    train = make_store(tmp_path / "train", x_train, [names[i] for i in y_train])
    # test: classes in another order and a few unlabeled images, which must be dropped
    test_names = [names[i] for i in y_test] + [None, None, None]
    x_test = np.concatenate([x_test, x_test[:3]])
    order = np.random.default_rng(0).permutation(len(x_test))
    test = make_store(tmp_path / "test", x_test[order], [test_names[i] for i in order])
    assert test.classes != train.classes
    return train, test


def test_evaluate_report_has_requested_keys(stores) -> None:
    train, test = stores
    rep = evaluate(tiny_encoder(), train, test, ["knn", "linear"], CFG, AUG, CPU, seed=0)
    js = rep.to_json()
    json.dumps(js)
    metric_keys = {"knn_top1", "knn_top5", "linear_top1", "linear_top5"}
    assert set(js) == metric_keys | {"protocols", "num_train", "num_test", "dropped_unlabeled"}
    assert set(js["protocols"]) == {"knn", "linear"}
    assert "k=20" in rep.protocols["knn"]
    assert rep.num_train == 48 and rep.num_test == 20 and rep.dropped_unlabeled == 3
    assert rep.confusion is not None and rep.confusion.shape == (4, 4)
    confusion = rep.confusion_json()
    assert confusion["classes"] == ["red", "green", "blue", "checker"]  # train's order: confusion axes
    assert confusion["matrix"] == rep.confusion.tolist()
    assert int(rep.confusion.sum()) == 20
    # solid colours are trivially separable even with random features: the name mapping is right
    assert rep.metrics["knn_top1"] > 80.0 and rep.metrics["linear_top1"] > 80.0

    only_knn = evaluate(tiny_encoder(), train, test, ["knn"], CFG, AUG, CPU, seed=0)
    assert set(only_knn.metrics) == {"knn_top1", "knn_top5"} and only_knn.confusion_json() is None
    assert only_knn.metrics == {k: js[k] for k in ("knn_top1", "knn_top5")}


def test_evaluate_errors(tmp_path) -> None:
    imgs, labels = solid_images(3, seed=0)
    names = ["red", "green", "blue", "checker"]
    train = make_store(tmp_path / "train", imgs, [names[i] for i in labels])
    test = make_store(tmp_path / "test", imgs, [names[i] for i in labels])
    enc = tiny_encoder()

    def run(tr, te, protocols=("knn",)):
        return evaluate(enc, tr, te, protocols, CFG, AUG, CPU, seed=0)

    with pytest.raises(EvaluationError, match=r"test set .* is empty"):
        run(train, make_store(tmp_path / "empty", np.zeros((0, 16, 16, 3), np.uint8), []))
    with pytest.raises(EvaluationError, match=r"train set .* is empty"):
        run(make_store(tmp_path / "empty2", np.zeros((0, 16, 16, 3), np.uint8), []), test)
    unlabeled = make_store(tmp_path / "unl", imgs, [None] * len(imgs))
    with pytest.raises(EvaluationError, match=r"test set .* no labeled images"):
        run(train, unlabeled)
    with pytest.raises(EvaluationError, match=r"train set .* no labeled images"):
        run(unlabeled, test)
    big = make_store(tmp_path / "big", np.zeros((2, 8, 8, 3), np.uint8), ["red", "red"])
    with pytest.raises(EvaluationError, match=r"image size mismatch.*16x16.*8x8"):
        run(train, big)
    with pytest.raises(EvaluationError, match=r"unknown evaluation protocol.*'svm'"):
        run(train, test, ["knn", "svm"])
    with pytest.raises(EvaluationError, match="no evaluation protocol"):
        run(train, test, [])
    other = make_store(tmp_path / "other", imgs[:2], ["purple", "red"])
    with pytest.raises(EvaluationError, match=r"absent from the train set.*purple"):
        run(train, other)
