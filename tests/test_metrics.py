"""Tests for the per-frame video metrics (tiny_data/metrics.py).

Each metric must be at its floor on ground-truth clips and must move when the
clip is corrupted in the way the metric is meant to catch.
"""

import warnings

import numpy as np
import pytest

from tiny_data.metrics import (
    MAX_DISTANCE, colour_error, evaluate, ground_truth_floor, motion_error,
    object_persistence, persistence_rate, shape_fidelity, snap, visible_objects,
)
from tiny_data import metrics
from tiny_data.shapes import COLOURS, FRAME_SIZE, PALETTE, TEST_PATH, load_dataset, make_dataset

KEYS = ("centres", "colours", "shapes", "radii")


@pytest.fixture(scope="module")
def data():
    """The held-out clips as test.npz makes them, but with one OR two objects per clip: the shipped files hold one,
    and two objects (overlap, occlusion) are the harder case every metric must also get right."""
    return make_dataset(seed=1, num_clips=128, num_frames=64, max_objects=2)


def test_floors_on_the_shipped_test_clips():
    floor = ground_truth_floor(load_dataset(TEST_PATH))
    assert np.all(floor["colour_error"] == 0.0)
    assert np.all(floor["persistence"] == 1.0)
    assert np.all(floor["shape_fidelity"] == 1.0)
    assert floor["motion_error"].max() < 1e-9        # exact: pixel-centre motion, rasterised centroid offsets


@pytest.fixture(scope="module")
def floor(data):
    return ground_truth_floor(data)


def info(data, i):
    return {k: data[k][i] for k in KEYS}


def two_object_clip(data):
    """Index of the first test clip with two objects, both visible in every frame."""
    for i in np.flatnonzero(data["num_objects"] == 2):
        if visible_objects(data["centres"][i], data["colours"][i], data["shapes"][i],
                           data["radii"][i]).all():
            return int(i)
    raise AssertionError("no fully visible two-object clip in test.npz")


def box_blur(frames):
    """3x3 box blur of uint8 frames, returned as float in [0, 1]."""
    x = frames.astype(np.float64) / 255.0
    p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    return sum(p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


# ----------------------------------------------------------------------------
# Floors on ground truth
# ----------------------------------------------------------------------------

def test_ground_truth_floors(floor):
    assert floor["colour_error"].shape == (128, 64)
    assert np.all(floor["colour_error"] == 0.0)
    assert np.all(floor["persistence"] == 1.0)
    motion = floor["motion_error"]
    assert np.all(np.isfinite(motion))
    assert motion.mean() < 0.5           # measured 0.20 px (whole-pixel motion)
    assert motion.max() <= 1.5           # measured 1.5 px (an occlusion frame)
    assert np.percentile(motion, 99) <= 1.0   # measured 1.0: 7x7 shapes overlap more often
    assert np.all(floor["shape_fidelity"] == 1.0)   # exact: the truth is its own true pixels


def test_truth_has_hidden_objects_and_they_are_forgiven(data):
    """The second object can fully hide the first in the truth; without the
    visibility mask persistence would fail and motion would be penalised."""
    hidden = 0
    for i in range(len(data["frames"])):
        vis = visible_objects(*(data[k][i] for k in KEYS))
        hidden += int((~vis[:, :data["num_objects"][i]]).sum())
    assert hidden > 0
    i = next(i for i in range(128)
             if not visible_objects(*(data[k][i] for k in KEYS))[:, :data["num_objects"][i]].all())
    frames = data["frames"][i]
    assert object_persistence(frames, data["colours"][i]).min() == 0.0  # strict version fails
    assert evaluate(frames, info(data, i))["persistence"].min() == 1.0


def test_uint8_and_float_inputs_agree(data):
    frames = data["frames"][0]
    np.testing.assert_array_equal(snap(frames), snap(frames / 255.0))
    np.testing.assert_allclose(colour_error(frames), colour_error(frames / 255.0))


# ----------------------------------------------------------------------------
# Colour error
# ----------------------------------------------------------------------------

def test_colour_error_detects_blur_noise_and_shift(data):
    frames = data["frames"][:8].reshape(-1, FRAME_SIZE, FRAME_SIZE, 3)
    assert colour_error(frames).max() == 0.0
    assert colour_error(box_blur(frames)).min() > 0.01
    rng = np.random.default_rng(0)
    noisy = frames / 255.0 + rng.normal(0.0, 0.1, frames.shape)
    assert colour_error(noisy).min() > 0.03      # ~0.045; noise on black is half clipped
    shifted = frames / 255.0 * 0.7 + 0.15        # washed-out colours, grey background
    assert colour_error(shifted).min() > 0.1
    # A frame of mid-grey is (sqrt(3) * 0.5 / sqrt(3)) = 0.5 from black.
    grey = np.full((1, 4, 4, 3), 0.5)
    np.testing.assert_allclose(colour_error(grey), [np.sqrt(3 * 0.25) / MAX_DISTANCE])


# ----------------------------------------------------------------------------
# Object persistence
# ----------------------------------------------------------------------------

def test_persistence_detects_removed_object(data):
    i = two_object_clip(data)
    frames = data["frames"][i].copy()
    gone = PALETTE[COLOURS[data["colours"][i, 0]]]
    frames[(frames == gone).all(-1)] = 0            # paint the first object black
    result = evaluate(frames, info(data, i))
    assert np.all(result["persistence"] == 0.0)
    assert persistence_rate(result["persistence"]) == 0.0


def test_persistence_detects_new_object(data):
    i = two_object_clip(data)
    frames = data["frames"][i].copy()
    new = next(c for c in range(len(COLOURS)) if c not in data["colours"][i])
    frames[10:, 0:2, 0:2] = PALETTE[COLOURS[new]]   # a 2x2 blob from frame 10 on
    p = evaluate(frames, info(data, i))["persistence"]
    assert np.all(p[:10] == 1.0) and np.all(p[10:] == 0.0)
    assert persistence_rate(p) == pytest.approx(10 / 64)
    # Two stray pixels are below min_pixels=3 and do not count as an object.
    frames = data["frames"][i].copy()
    frames[:, 0, 0:2] = PALETTE[COLOURS[new]]
    assert np.all(evaluate(frames, info(data, i))["persistence"] == 1.0)


# ----------------------------------------------------------------------------
# Motion error
# ----------------------------------------------------------------------------

def test_motion_error_detects_a_3px_shift(data):
    shifts = []
    for i in range(64):
        c, r = data["centres"][i], data["radii"][i]
        # frames where no object reaches the right edge after the shift (no wrap-around)
        safe = np.all(np.nan_to_num(c[:, :, 1] + r + 3, nan=0.0) <= FRAME_SIZE, axis=1)
        if not safe.any():
            continue
        moved = np.roll(data["frames"][i], 3, axis=2)
        err = evaluate(moved, info(data, i))["motion_error"]
        shifts.append(err[safe])
    shifts = np.concatenate(shifts)
    assert len(shifts) > 1000
    assert 2.8 < shifts.mean() < 3.2               # 3 px, give or take the sub-pixel floor
    assert shifts.min() >= 3 - 1.5 and shifts.max() <= 3 + 1.5   # the extremes are occlusion frames


def test_motion_error_penalises_a_missing_object(data):
    i = two_object_clip(data)
    frames = data["frames"][i].copy()
    gone = PALETTE[COLOURS[data["colours"][i, 0]]]
    frames[(frames == gone).all(-1)] = 0
    err = motion_error(frames, data["centres"][i], data["colours"][i],
                       data["shapes"][i], data["radii"][i])
    diagonal = np.hypot(FRAME_SIZE, FRAME_SIZE)
    assert np.all(err >= diagonal / 2)              # mean of the penalty and a tracked object


# ----------------------------------------------------------------------------
# Shape fidelity
# ----------------------------------------------------------------------------

def shifted(frames, dy, dx):
    """Frames moved by (dy, dx) pixels, black coming in at the edges (no wrap-around)."""
    out = np.zeros_like(frames)
    h, w = frames.shape[1:3]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        frames[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def fidelity(frames, data, i):
    return shape_fidelity(frames, *(data[k][i] for k in KEYS))


def test_shape_fidelity_falls_with_a_shift_a_blur_and_a_missing_object(data):
    clips = range(32)
    mean = lambda corrupt: np.mean([fidelity(corrupt(data["frames"][i]), data, i).mean() for i in clips])
    assert mean(lambda f: f) == 1.0
    one_px = mean(lambda f: shifted(f, 0, 1))
    diagonal = mean(lambda f: shifted(f, 1, 1))
    assert 0.5 < one_px < 0.75                     # measured 0.62 on all 128 clips
    assert 0.35 < diagonal < one_px                # measured 0.49: two axes off is worse than one
    assert 0.6 < mean(box_blur) < 0.95             # measured 0.81: the blurred edges snap to black
    i = two_object_clip(data)
    frames = data["frames"][i].copy()
    gone = PALETTE[COLOURS[data["colours"][i, 0]]]
    frames[(frames == gone).all(-1)] = 0
    np.testing.assert_array_equal(fidelity(frames, data, i), 0.5)   # one of two objects scores 0


def test_shape_fidelity_is_the_iou_of_one_object():
    """A hand-made case: the true 7x7 square against a 7x6 guess inside it plus 3 stray pixels of its colour."""
    colours, shapes_, radii = np.array([0, -1]), np.array([1, -1]), np.array([3.0, np.nan])
    centres = np.array([[[8.5, 8.5], [np.nan, np.nan]]])
    truth = np.zeros((1, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
    truth[0, 5:12, 5:12] = PALETTE[COLOURS[0]]
    assert shape_fidelity(truth, centres, colours, shapes_, radii)[0] == 1.0
    guess = truth.copy()
    guess[0, 5:12, 11] = 0                           # 42 of the 49 true pixels
    guess[0, 0, 0:3] = PALETTE[COLOURS[0]]           # and 3 that are not
    np.testing.assert_allclose(shape_fidelity(guess, centres, colours, shapes_, radii), [42 / 52])
    # The other colours do not count: a green square where the red one should be is a missing red object.
    green = truth.copy()
    green[truth.all(-1) | (truth == PALETTE[COLOURS[0]]).all(-1)] = PALETTE[COLOURS[1]]
    assert shape_fidelity(green, centres, colours, shapes_, radii)[0] == 0.0


def test_shape_fidelity_ignores_objects_hidden_in_the_truth(data):
    for i in range(len(data["frames"])):
        vis = visible_objects(*(data[k][i] for k in KEYS))
        n = data["num_objects"][i]
        if not vis[:, :n].all():
            break
    f = fidelity(data["frames"][i], data, i)
    assert np.all(f == 1.0)                          # the hidden object is not scored, so not a 0
    assert "shape_fidelity" in evaluate(data["frames"][i], info(data, i))


# ----------------------------------------------------------------------------
# The textured toy's scores
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def textured():
    from tiny_data.shapes import TEXTURED_TEST_PATH
    return load_dataset(TEXTURED_TEST_PATH)


def test_textured_scores_are_perfect_on_the_truth(textured):
    for i in range(0, 128, 9):
        frames = textured["frames"][i]
        s = metrics.textured_scores(frames[2:], frames[2:], frames[:2])
        assert np.allclose(s["detail_kept"], 1) and np.all(s["present"] == 1) and np.all(s["lit_iou"] == 1)
        assert np.all(s["psnr"] == 60) and np.all(s["shade_error"] < 1e-3)   # uint8 rounding of the dark shade


def test_textured_scores_fall_for_a_blur_a_flat_object_a_fade_and_a_shift(textured):
    """What the evidence needs them to see: a blurred or a flat (untextured) object keeps its place but loses
    detail; a faded one loses detail and presence; a black frame loses everything; a shift loses only fidelity."""
    frames = textured["frames"][:16, 2:10].astype(float)
    prompt = textured["frames"][:16, :2]
    padded = np.pad(frames, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    blur = sum(padded[:, :, a:a + 16, b:b + 16] for a in range(3) for b in range(3)) / 9
    flat = np.where(frames.max(-1, keepdims=True) > 0, frames.max((2, 3), keepdims=True), 0)
    variants = {"blur": blur, "flat": flat, "fade": frames * 0.3, "black": frames * 0,
                "shift": np.roll(frames, 2, axis=3)}
    s = {name: [metrics.textured_scores(v[i].astype(np.uint8), frames[i].astype(np.uint8), prompt[i])
                for i in range(16)] for name, v in variants.items()}
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")                                 # a black frame has no shade to score
        mean = {name: {k: np.nanmean([r[k] for r in rows]) for k in rows[0]} for name, rows in s.items()}
    assert mean["blur"]["detail_kept"] < 0.2 and mean["blur"]["present"] == 1
    assert mean["flat"]["detail_kept"] < 0.8 and mean["flat"]["lit_iou"] == 1
    assert mean["fade"]["detail_kept"] < 0.2 and mean["fade"]["present"] <= 0.5
    assert mean["black"]["detail_kept"] < 1e-3 and mean["black"]["present"] == 0 and mean["black"]["lit_iou"] == 0
    assert mean["shift"]["detail_kept"] > 0.9 and mean["shift"]["lit_iou"] < 0.7 and mean["shift"]["psnr"] < 20
