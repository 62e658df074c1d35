"""Drift (MMD permutation test), near-duplicates and k-center selection on real embeddings of
demo images by a small untrained encoder (what the tests need is a fixed image -> vector map)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sslflow.ssl_models.backbones import SSLResNet
from sslflow.tasks.data.demo import generate_demo
from sslflow.tasks.serving.drift import class_shares, cluster_shares, cluster_weights, mmd_test, pca_2d
from sslflow.tasks.serving.encoder import ImageEncoder, embed_images
from sslflow.tasks.serving.near_duplicates import near_duplicates
from sslflow.tasks.serving.select import k_center_greedy

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def encoder() -> ImageEncoder:
    torch.manual_seed(0)
    return ImageEncoder(SSLResNet("resnet18", 8, True, 16), 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()


@pytest.fixture(scope="module")
def pool(encoder) -> dict[str, np.ndarray]:
    """Embedded once: 60 images of each demo class (16 px), and the first 5 classes colour-shifted."""
    images, labels = generate_demo(60, size=16, seed=3)
    first = labels < 5
    tint = np.array([90, 40, 0], np.float32)  # the same shapes under a warm, dimmer light
    shifted = (images[first] * 0.6 + tint).clip(0, 255).astype(np.uint8)
    return {"emb": embed_images(encoder, images, 128), "labels": labels,
            "shifted": embed_images(encoder, shifted, 128)}


def test_a_batch_of_other_classes_or_colours_is_drift(pool):
    rng = np.random.default_rng(0)
    first = np.flatnonzero(pool["labels"] < 5)
    other = np.flatnonzero(pool["labels"] >= 5)
    ref = pool["emb"][rng.choice(first, 150, replace=False)]
    res = mmd_test(ref, pool["emb"][rng.choice(other, 60, replace=False)], permutations=200, level=0.01)
    assert res.drifted and res.p_value < 0.01 and res.score > 0, res
    res = mmd_test(ref, pool["shifted"][rng.choice(len(pool["shifted"]), 60, replace=False)], permutations=200,
                   level=0.01)
    assert res.drifted, res
    assert "drift: MMD^2" in res.summary()


def test_an_unshifted_batch_is_rejected_at_about_the_level(pool):
    """40 disjoint reference / new draws of the same distribution at level 0.05: the expected
    number of false alarms is 2; more than 7 has probability < 0.001 under a valid test."""
    first = np.flatnonzero(pool["labels"] < 5)
    rejections, scores = 0, []
    for draw in range(40):
        idx = np.random.default_rng(100 + draw).permutation(first)
        res = mmd_test(pool["emb"][idx[:100]], pool["emb"][idx[100:160]], permutations=99, level=0.05, seed=draw)
        rejections += res.drifted
        scores.append(res.p_value)
    assert rejections <= 7, (rejections, scores)
    assert np.mean(scores) > 0.3  # p-values of a valid test are ~uniform under the null


def test_shares_point_at_where_the_new_batch_went(pool):
    labels = pool["labels"]
    ref_idx = np.flatnonzero(labels < 8)
    new_idx = np.flatnonzero(labels >= 8)
    rows = cluster_shares(pool["emb"][ref_idx], pool["emb"][new_idx], k=6)
    assert len(rows) == 6 and rows[0]["change"] > 0.1 and abs(sum(r["new_share"] for r in rows) - 1) < 1e-3
    by_class = class_shares([str(x) for x in labels[:50]], ["9"] * 10)
    assert by_class[0]["class"] == "9" and by_class[0]["new_share"] == 1.0
    w = cluster_weights(pool["emb"][ref_idx], pool["emb"][new_idx], pool["emb"], k=6)
    assert w[new_idx].mean() > w[ref_idx].mean()
    a, b = pca_2d(pool["emb"][:10], pool["emb"][10:30])
    assert a.shape == (10, 2) and b.shape == (20, 2)


def test_near_duplicates_made_by_resize_and_jpeg_are_found(encoder):
    from PIL import Image

    rng = np.random.default_rng(0)  # 40 distinct smooth colour textures, 32 px
    images = np.stack([np.asarray(Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
                                  .resize((32, 32), Image.BICUBIC)) for _ in range(40)])
    store = embed_images(encoder, images[:30], 64)

    def resave(img: np.ndarray, side: int, quality: int) -> np.ndarray:
        buf = io.BytesIO()
        Image.fromarray(img).resize((side, side), Image.BICUBIC).save(buf, "JPEG", quality=quality)
        return np.asarray(Image.open(buf).convert("RGB").resize((32, 32), Image.BICUBIC))

    copies = np.stack([resave(images[i], 24, 80) for i in (3, 17)])
    fresh = images[30:40]
    batch = np.concatenate([fresh[:5], copies, fresh[5:], resave(fresh[0], 28, 85)[None]])
    # an untrained encoder: every cosine is high, so the threshold is too
    hits = near_duplicates(embed_images(encoder, batch, 64), store, threshold=0.995)
    found = {h["index"]: (h["match"], h["match_index"]) for h in hits}
    assert found == {5: ("store", 3), 6: ("store", 17), 12: ("batch", 0)}, hits


def test_k_center_greedy_covers_every_cluster_random_does_not():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(10, 16)) * 5
    sizes = [500] + [5] * 9  # one dense cluster and 9 small ones
    x = np.concatenate([c + rng.normal(size=(s, 16)) * 0.1 for c, s in zip(centers, sizes, strict=True)])
    cluster = np.repeat(np.arange(10), sizes)
    picked = k_center_greedy(x, 10, seed=0)
    assert len(set(picked.tolist())) == 10 and len(set(cluster[picked])) == 10
    assert len(set(cluster[rng.choice(len(x), 10, replace=False)])) < 10
    # labeled points of cluster 1..9 already cover them: picks go to the dense cluster 0 only
    assert set(cluster[k_center_greedy(x[:500], 3, labeled=centers[1:])]) == {0}
    w = np.where(cluster == 4, 100.0, 1.0)
    assert cluster[k_center_greedy(x, 2, weights=w, labeled=x[:1])[0]] == 4
