"""Batched augmentation: each op on known inputs and against torchvision, then the pipeline.

Everything runs on CPU in a few seconds; the CUDA tests (CPU/CUDA agreement, no host sync)
run only where a GPU is present.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from sslflow.ssl_models.augment import (
    CROP_ATTEMPTS,
    NUM_UNIFORMS,
    BatchAugment,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    crop_boxes_from_uniform,
    eval_view,
    gaussian_blur,
    normalize,
    random_grayscale,
    resized_crop,
    rgb_to_grayscale,
    sample_crop_boxes,
    solarize,
    to_float,
)
from sslflow.ssl_models.config import AugmentConfig
from sslflow.ssl_models.views import ViewSpec

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
RATIO = (3 / 4, 4 / 3)
FULL = torch.tensor([[0.0, 0.0, 1.0, 1.0]])


def make_cfg(**overrides) -> AugmentConfig:
    """The built-in defaults of the augment section, with overrides."""
    values = dict(
        strength=0.5, crop_scale=(0.08, 1.0), crop_ratio=RATIO, flip_prob=0.5, jitter_prob=0.8,
        grayscale_prob=0.2, blur_sigma=(0.1, 2.0), local_crops=6, local_crop_scale=(0.05, 0.4),
        local_size=16, mean=MEAN, std=STD,
    )
    values.update(overrides)
    return AugmentConfig(**values)


def no_aug_cfg(**overrides) -> AugmentConfig:
    """Everything off: the pipeline must reduce to eval_view."""
    values = dict(strength=0.0, flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0, crop_ratio=(1.0, 1.0))
    values.update(overrides)
    return make_cfg(**values)


def S(size: int, scale: tuple[float, float], blur_prob: float = 0.0, solarize_prob: float = 0.0) -> tuple:
    """A view of the shared recipe: (size, crop scale, blur, solarize); `augmenter` completes it."""
    return (size, scale, blur_prob, solarize_prob)


def augmenter(cfg: AugmentConfig, specs: list[tuple]) -> BatchAugment:
    """BatchAugment of views drawn with the shared recipe `cfg` (flip, jitter, grayscale from it)."""
    views = [ViewSpec.from_augment(cfg, size, scale, blur_prob=b, solarize_prob=s) for size, scale, b, s in specs]
    return BatchAugment(views, cfg.mean, cfg.std)


def rand_images(b: int, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    """Float images in [0, 1] on the uint8 grid (so channel ties occur, as in real data)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, h, w), generator=g).float() / 255


def rand_uint8(b: int, h: int = 32, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, h, w, 3), generator=g, dtype=torch.uint8)


def colour(r: float, g: float, b: float, size: int = 2) -> torch.Tensor:
    return torch.tensor([r, g, b], dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


# --------------------------------------------------------------------------------------------
# dtype, layout, normalisation
# --------------------------------------------------------------------------------------------


def test_to_float_layout_and_values():
    images = rand_uint8(2, 5, 7)
    x = to_float(images)
    assert x.shape == (2, 3, 5, 7) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x, images.permute(0, 3, 1, 2).float() / 255, rtol=0, atol=0)


def test_normalize_and_eval_view():
    x = torch.full((1, 3, 2, 2), 0.5)
    out = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 1.0, 0.25]))
    assert out.is_contiguous()  # NCHW on the CPU (channels_last on CUDA: model_layout)

    images = rand_uint8(3, 6, 6)
    view = eval_view(images, MEAN, STD)
    expected = (images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(
        STD
    ).view(1, 3, 1, 1)
    assert view.shape == (3, 3, 6, 6) and view.is_contiguous()
    torch.testing.assert_close(view, expected)


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------


def test_full_box_without_flip_is_identity():
    x = rand_images(2)
    out = resized_crop(x, FULL.expand(2, 4), torch.tensor([False, False]), 8)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


def test_flip_equals_torch_flip_per_image():
    x = rand_images(2, 8, 8)
    out = resized_crop(x, FULL.expand(2, 4), torch.tensor([True, False]), 8)
    torch.testing.assert_close(out[0], torch.flip(x[0], dims=[-1]), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=1e-6)


def test_crop_of_left_and_top_half_of_gradients():
    cols = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 8, 8)  # value = column index
    rows = cols.transpose(2, 3)  # value = row index
    left = torch.tensor([[0.0, 0.0, 0.5, 1.0]])
    top = torch.tensor([[0.0, 0.0, 1.0, 0.5]])
    no = torch.tensor([False])
    # 8x4 px box -> 4x4: columns map 1:1, rows are averaged pairs of equal values
    out = resized_crop(cols, left, no, 4)
    torch.testing.assert_close(out, torch.arange(4.0).view(1, 1, 1, 4).expand(1, 3, 4, 4))
    out = resized_crop(rows, top, no, 4)
    torch.testing.assert_close(out, torch.arange(4.0).view(1, 1, 4, 1).expand(1, 3, 4, 4))
    # flipped: the left half read right to left
    out = resized_crop(cols, left, torch.tensor([True]), 4)
    torch.testing.assert_close(out, torch.arange(3.0, -1.0, -1.0).view(1, 1, 1, 4).expand(1, 3, 4, 4))
    # upscaled x2: pixel centres at 0.5 i - 0.25 (align_corners=False), clamped to the crop's
    # edge pixels 0 and 3 (not to the image's: column 4 lies outside the box)
    out = resized_crop(cols, left, no, 8)
    expected = (0.5 * torch.arange(8.0) - 0.25).clamp(min=0, max=3)
    torch.testing.assert_close(out[0, 0, 3], expected)


@pytest.mark.parametrize("size", [5, 8, 23])
def test_resized_crop_equals_crop_then_resize_in_float64(size):
    """Pixel-aligned boxes, per image, on a non-square image: the same values as cropping the
    box and resizing it (bilinear, align_corners=False), flipped where asked. The outermost
    output pixels repeat the crop's edge pixels; clamping at the image border instead reads
    up to half a pixel outside the box (errors of ~0.3 on random images)."""
    g = torch.Generator().manual_seed(size)
    h, w, b = 13, 11, 8
    x = torch.rand(b, 3, h, w, generator=g, dtype=torch.float64)
    cols = torch.sort(torch.randperm(w + 1, generator=g)[:2]).values
    pix = []
    for _ in range(b):  # integer pixel boxes (i0, j0, i1, j1): left, top, right, bottom edges
        c = torch.sort(torch.randperm(w + 1, generator=g)[:2]).values.tolist()
        r = torch.sort(torch.randperm(h + 1, generator=g)[:2]).values.tolist()
        pix.append((c[0], r[0], c[1], r[1]))
    pix[0] = (int(cols[0]), 0, int(cols[1]), h)  # full height
    pix[1] = (0, 0, w, h)  # the whole image
    pix[2] = (3, 4, 4, 5)  # a single pixel
    boxes = torch.tensor([(i0 / w, j0 / h, i1 / w, j1 / h) for i0, j0, i1, j1 in pix], dtype=torch.float64)
    flip = torch.rand(b, generator=g) < 0.5
    out = resized_crop(x, boxes, flip, size)
    for i, (i0, j0, i1, j1) in enumerate(pix):
        crop = x[i:i + 1, :, j0:j1, i0:i1]
        ref = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)
        ref = ref.flip(-1) if flip[i] else ref
        torch.testing.assert_close(out[i:i + 1], ref, rtol=0, atol=1e-12, msg=f"box {pix[i]}, flip {bool(flip[i])}")


def test_crop_of_non_square_image():
    # 4 rows x 8 columns; the right half is a 4x4 square
    x = torch.arange(8.0).view(1, 1, 1, 8).expand(1, 3, 4, 8)
    out = resized_crop(x, torch.tensor([[0.5, 0.0, 1.0, 1.0]]), torch.tensor([False]), 4)
    torch.testing.assert_close(out, (4 + torch.arange(4.0)).view(1, 1, 1, 4).expand(1, 3, 4, 4))


@pytest.mark.parametrize("aspect", [1.0, 2.0, 0.6])
def test_sampled_boxes_respect_scale_ratio_and_bounds(aspect):
    scale = (0.08, 1.0)
    g = torch.Generator().manual_seed(0)
    boxes = sample_crop_boxes(4000, scale, RATIO, g, "cpu", aspect=aspect)
    x0, y0, x1, y1 = boxes.unbind(1)
    w, h = x1 - x0, y1 - y0
    eps = 1e-5
    assert boxes.shape == (4000, 4)
    assert bool((x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1 + eps).all() and (y1 <= 1 + eps).all())
    assert bool((w > 0).all() and (h > 0).all())
    area = w * h
    assert bool((area >= scale[0] - eps).all() and (area <= scale[1] + eps).all())
    pixel_ratio = w / h * aspect
    assert bool((pixel_ratio >= RATIO[0] - eps).all() and (pixel_ratio <= RATIO[1] + eps).all())
    # the draw spans the range (on a non-square image the largest box within the ratio
    # range is smaller than the image: 2/3 of it at aspect 2, 0.8 at aspect 0.6)
    assert float(area.min()) < 0.12 and float(area.max()) > (0.9 if aspect == 1.0 else 0.6)
    assert float(x0.std()) > 0.05 and float(y0.std()) > 0.05


def test_sampled_boxes_fallback_to_clamped_central_crop():
    g = torch.Generator().manual_seed(0)
    # ratio 3..4 never fits a square image at area >= 0.9: full width, height w / 3, centred
    boxes = sample_crop_boxes(50, (0.9, 1.0), (3.0, 4.0), g, "cpu")
    torch.testing.assert_close(boxes, torch.tensor([[0.0, 1 / 3, 1.0, 2 / 3]]).expand(50, 4))
    boxes = sample_crop_boxes(50, (0.9, 1.0), (0.2, 0.25), g, "cpu")
    torch.testing.assert_close(boxes, torch.tensor([[0.375, 0.0, 0.625, 1.0]]).expand(50, 4))
    # a 2:1 image with ratio 3/4..4/3 and full area: full height, width 4/3 of it, centred
    boxes = sample_crop_boxes(50, (1.0, 1.0), RATIO, g, "cpu", aspect=2.0)
    w = (4 / 3) / 2
    torch.testing.assert_close(boxes, torch.tensor([[(1 - w) / 2, 0.0, (1 + w) / 2, 1.0]]).expand(50, 4))


def test_first_valid_attempt_is_chosen():
    u = torch.zeros(2, 2 * CROP_ATTEMPTS + 2)
    u[:, :CROP_ATTEMPTS] = 0.5  # area 0.75 for every attempt (scale 0.5..1)
    u[:, CROP_ATTEMPTS] = 1.0  # attempt 0: ratio 4 -> width sqrt(3) > 1, invalid
    u[:, CROP_ATTEMPTS + 1] = 0.5  # attempt 1: ratio 1 -> valid, chosen
    u[:, CROP_ATTEMPTS + 2 :] = 0.0  # later attempts: ratio 1/4 -> invalid anyway
    u[1, CROP_ATTEMPTS + 2] = 0.5  # row 1: attempt 2 also valid, but attempt 1 comes first
    u[1, 1] = 0.0  # ... and attempt 1 of row 1 has area 0.5
    u[:, -2:] = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # top-left / bottom-right positions
    boxes = crop_boxes_from_uniform(u, (0.5, 1.0), (0.25, 4.0))
    s0, s1 = math.sqrt(0.75), math.sqrt(0.5)
    expected = torch.tensor([[0.0, 0.0, s0, s0], [1 - s1, 1 - s1, 1.0, 1.0]])
    torch.testing.assert_close(boxes, expected)


# --------------------------------------------------------------------------------------------
# colour
# --------------------------------------------------------------------------------------------


def test_grayscale_weights_and_torchvision():
    pure = torch.cat([colour(1, 0, 0), colour(0, 1, 0), colour(0, 0, 1)])
    gray = rgb_to_grayscale(pure)
    assert gray.shape == (3, 1, 2, 2)
    torch.testing.assert_close(gray[:, 0, 0, 0], torch.tensor([0.299, 0.587, 0.114]), rtol=0, atol=2e-4)
    x = rand_images(4)
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=1e-6)


def test_random_grayscale_per_image():
    x = rand_images(3)
    out = random_grayscale(x, torch.tensor([True, False, True]))
    assert out.shape == x.shape
    for i in (0, 2):
        torch.testing.assert_close(out[i], TF.rgb_to_grayscale(x[i], num_output_channels=3))
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("shift", "expected"),
    [(1 / 3, (0, 1, 0)), (-1 / 3, (0, 0, 1)), (1 / 6, (1, 1, 0)), (0.5, (0, 1, 1)), (0.0, (1, 0, 0))],
)
def test_hue_rotation_of_pure_red(shift, expected):
    out = adjust_hue(colour(1, 0, 0), torch.tensor([shift]))
    torch.testing.assert_close(out, colour(*expected), rtol=0, atol=1e-6)


def test_hue_keeps_grays_and_is_per_image():
    gray = colour(0.4, 0.4, 0.4)
    torch.testing.assert_close(adjust_hue(gray, torch.tensor([0.3])), gray, rtol=0, atol=0)
    both = torch.cat([colour(0, 0, 1), colour(0, 0, 1)])
    out = adjust_hue(both, torch.tensor([1 / 3, -1 / 3]))  # blue -> red, blue -> green
    torch.testing.assert_close(out, torch.cat([colour(1, 0, 0), colour(0, 1, 0)]), rtol=0, atol=1e-6)


def test_hue_matches_torchvision_per_image():
    x = rand_images(12, 6, 6, seed=1)
    shifts = torch.linspace(-0.5, 0.5, 12)
    out = adjust_hue(x, shifts)
    expected = torch.stack([TF.adjust_hue(x[i], float(shifts[i])) for i in range(12)])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (adjust_brightness, TF.adjust_brightness),
        (adjust_contrast, TF.adjust_contrast),
        (adjust_saturation, TF.adjust_saturation),
    ],
)
def test_brightness_contrast_saturation_match_torchvision_per_image(ours, theirs):
    x = rand_images(8, 6, 6, seed=2)
    factors = torch.tensor([0.0, 0.3, 0.6, 1.0, 1.0, 1.4, 1.8, 2.5])
    out = ours(x, factors)
    expected = torch.stack([theirs(x[i], float(factors[i])) for i in range(8)])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-6)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_neutral_factors_are_exact_identity():
    x = rand_images(4)
    one = torch.ones(4)
    for op in (adjust_brightness, adjust_contrast, adjust_saturation):
        torch.testing.assert_close(op(x, one), x, rtol=0, atol=0)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(4)), x, rtol=0, atol=1e-6)


def test_solarize_known_values():
    x = torch.tensor([0.0, 0.25, 0.49, 0.5, 0.75, 1.0]).view(1, 1, 1, 6).expand(2, 3, 1, 6)
    out = solarize(x, torch.tensor([True, False]))
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 0.25, 0.49, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(out[1], x[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], TF.solarize(x[0], 0.5))


# --------------------------------------------------------------------------------------------
# blur
# --------------------------------------------------------------------------------------------


def test_blur_kernel_size_rule():
    assert [blur_kernel_size(s) for s in (16, 32, 64, 96, 224)] == [3, 3, 7, 9, 23]


@pytest.mark.parametrize("kernel_size", [3, 9])  # shifted-sum path and depthwise-conv path
def test_blur_tiny_or_zero_sigma_is_identity(kernel_size):
    x = rand_images(2, 16, 16)
    torch.testing.assert_close(gaussian_blur(x, torch.tensor([1e-3, 0.0]), kernel_size), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_blur_preserves_constant_image(kernel_size):
    x = torch.full((2, 3, 16, 16), 0.37)
    out = gaussian_blur(x, torch.tensor([0.5, 3.0]), kernel_size)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_blur_sigma_is_per_image_and_matches_torchvision(kernel_size):
    x = rand_images(2, 16, 16, seed=3)
    sigmas = torch.tensor([0.5, 2.0])
    together = gaussian_blur(x, sigmas, kernel_size)
    for i in range(2):
        alone = gaussian_blur(x[i : i + 1], sigmas[i : i + 1], kernel_size)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=1e-6)
        tv = TF.gaussian_blur(x[i], [kernel_size, kernel_size], [float(sigmas[i])] * 2)
        torch.testing.assert_close(together[i], tv, rtol=0, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


# --------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------


SIMCLR = [S(32, (0.08, 1.0)), S(32, (0.08, 1.0))]
BYOL = [S(32, (0.08, 1.0), blur_prob=1.0), S(32, (0.08, 1.0), blur_prob=0.1, solarize_prob=0.2)]
DINO = [*BYOL, *[S(16, (0.05, 0.4), blur_prob=0.5) for _ in range(6)]]


def test_multicrop_shapes_dtype_layout():
    aug = augmenter(make_cfg(), DINO)
    out = aug(rand_uint8(6), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in out] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 6
    for v in out:
        assert v.dtype == torch.float32
        assert v.is_contiguous()  # the CPU model layout
        assert bool(torch.isfinite(v).all())
        assert not v.requires_grad


def test_eager_cpu_works_without_no_grad_and_on_non_square_images():
    assert torch.is_grad_enabled()
    aug = augmenter(make_cfg(), BYOL)
    out = aug(rand_uint8(4, 24, 40), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in out] == [(4, 3, 32, 32)] * 2


def test_output_stays_float32_inside_autocast():
    aug = augmenter(make_cfg(), [S(32, (0.08, 1.0), blur_prob=1.0), S(96, (0.08, 1.0), blur_prob=1.0)])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = aug(rand_uint8(2), torch.Generator().manual_seed(0))
    assert [v.dtype for v in out] == [torch.float32, torch.float32]


def test_same_image_gets_different_views_per_row():
    images = rand_uint8(1).expand(16, 32, 32, 3).contiguous()
    for view in augmenter(make_cfg(), BYOL)(images, torch.Generator().manual_seed(0)):
        rows = view.flatten(1)
        distinct = {tuple(r.tolist()) for r in rows}
        assert len(distinct) == 16


def test_same_seed_same_output_different_seed_different_output():
    aug = augmenter(make_cfg(), DINO)
    images = rand_uint8(8)
    a = aug(images, torch.Generator().manual_seed(123))
    b = aug(images, torch.Generator().manual_seed(123))
    c = aug(images, torch.Generator().manual_seed(124))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(not torch.equal(x, z) for x, z in zip(a, c, strict=True))


def test_generator_state_reproduces_a_step_and_draw_size_is_fixed():
    aug = augmenter(make_cfg(), BYOL)
    images = rand_uint8(5)
    g = torch.Generator().manual_seed(7)
    aug(images, g)  # step 0
    state = g.get_state()
    first = aug(images, g)
    after = g.get_state()
    g.set_state(state)
    again = aug(images, g)
    assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    # one draw of (views, batch, NUM_UNIFORMS) per call, whatever the recipe
    g.set_state(state)
    torch.rand((len(BYOL), 5, NUM_UNIFORMS), generator=g)
    assert torch.equal(g.get_state(), after)


def test_everything_off_reduces_to_eval_view():
    images = rand_uint8(4)
    views = [S(32, (1.0, 1.0))]
    out = augmenter(no_aug_cfg(), views)(images, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(out, eval_view(images, MEAN, STD), rtol=0, atol=1e-5)
    flipped = augmenter(no_aug_cfg(flip_prob=1.0), views)(images, torch.Generator().manual_seed(0))[0]
    torch.testing.assert_close(flipped, torch.flip(eval_view(images, MEAN, STD), dims=[-1]), rtol=0, atol=1e-5)


def test_probabilities_are_per_image():
    images = rand_uint8(1).expand(400, 32, 32, 3).contiguous()
    views = [S(32, (1.0, 1.0))]
    out = augmenter(no_aug_cfg(flip_prob=0.5), views)(images, torch.Generator().manual_seed(0))[0]
    ref = eval_view(images[:1], MEAN, STD)
    flipped = (out - torch.flip(ref, dims=[-1])).flatten(1).abs().amax(1) < 1e-5
    kept = (out - ref).flatten(1).abs().amax(1) < 1e-5
    assert bool((flipped ^ kept).all())
    assert 150 < int(flipped.sum()) < 250


def test_grayscale_prob_one_gives_gray_views():
    aug = augmenter(make_cfg(grayscale_prob=1.0), BYOL)
    std, mean = torch.tensor(STD).view(1, 3, 1, 1), torch.tensor(MEAN).view(1, 3, 1, 1)
    for view in aug(rand_uint8(4), torch.Generator().manual_seed(0)):
        x = view * std + mean
        torch.testing.assert_close(x[:, 0], x[:, 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(x[:, 0], x[:, 2], rtol=0, atol=1e-5)


def test_rejects_bad_inputs():
    aug = augmenter(make_cfg(), SIMCLR)
    with pytest.raises(TypeError):
        aug(torch.rand(2, 32, 32, 3), torch.Generator())
    with pytest.raises(ValueError):
        BatchAugment([], MEAN, STD)
    with pytest.raises(ValueError):
        ViewSpec(32, (0.0, 1.0))


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")


@cuda
def test_ops_agree_between_cpu_and_cuda():
    x = rand_images(8, 16, 16, seed=4)
    f = torch.linspace(0.2, 1.8, 8)
    shift = torch.linspace(-0.5, 0.5, 8)
    mask = torch.arange(8) % 2 == 0
    boxes = sample_crop_boxes(8, (0.08, 1.0), RATIO, torch.Generator().manual_seed(0), "cpu")
    cases = [
        (lambda t, d: resized_crop(t, boxes.to(d), mask.to(d), 12), 1e-5),
        (lambda t, d: adjust_brightness(t, f.to(d)), 1e-6),
        (lambda t, d: adjust_contrast(t, f.to(d)), 1e-5),
        (lambda t, d: adjust_saturation(t, f.to(d)), 1e-5),
        (lambda t, d: adjust_hue(t, shift.to(d)), 1e-5),
        (lambda t, d: random_grayscale(t, mask.to(d)), 1e-6),
        (lambda t, d: gaussian_blur(t, f.to(d), 3), 1e-5),
        (lambda t, d: gaussian_blur(t, f.to(d), 9), 2e-3),  # cuDNN may use TF32
        (lambda t, d: solarize(t, mask.to(d)), 0.0),
        (lambda t, d: normalize(t, MEAN, STD), 1e-5),
    ]
    for fn, atol in cases:
        torch.testing.assert_close(fn(x.cuda(), "cuda").cpu(), fn(x, "cpu"), rtol=0, atol=atol)


@cuda
def test_cuda_pipeline_is_reproducible_and_never_syncs():
    aug = augmenter(make_cfg(), DINO)
    images = rand_uint8(64).cuda()
    aug(images, torch.Generator("cuda").manual_seed(0))  # warm-up: caches device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        a = aug(images, torch.Generator("cuda").manual_seed(0))
        b = aug(images, torch.Generator("cuda").manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(v.is_cuda and v.is_contiguous(memory_format=torch.channels_last) for v in a)
