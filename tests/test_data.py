"""Tests for the toy moving-shapes data set (tiny_data/shapes.py)."""

import numpy as np
import pytest

from tiny_data import shapes
from tiny_data.shapes import (
    COLOURS, FRAME_SIZE, PALETTE, SHAPES, TEST_PATH, TRAIN_PATH, VOCAB,
    detokenize, load_dataset, make_clip, make_dataset, save_dataset, tokenize,
)


@pytest.fixture(scope="module")
def small():
    return make_dataset(seed=123, num_clips=32, num_frames=64, max_objects=2)   # two objects: the harder case


def test_shipped_data_has_one_object_per_clip():
    assert shapes.SHIPPED_OBJECTS == 1
    assert np.all(load_dataset(TEST_PATH)["num_objects"] == 1)


def test_same_seed_same_data():
    a = make_dataset(seed=7, num_clips=8, num_frames=10)
    b = make_dataset(seed=7, num_clips=8, num_frames=10)
    c = make_dataset(seed=8, num_clips=8, num_frames=10)
    for key in ("frames", "centres", "num_objects", "colours", "shapes", "radii"):
        np.testing.assert_array_equal(a[key], b[key])
    assert a["captions"] == b["captions"]
    assert not np.array_equal(a["frames"], c["frames"])


def test_short_clip_is_prefix_of_long_clip():
    for seed in range(10):
        short = make_clip(np.random.default_rng(seed), num_frames=12)
        long = make_clip(np.random.default_rng(seed), num_frames=64)
        np.testing.assert_array_equal(short["frames"], long["frames"][:12])
        np.testing.assert_array_equal(short["centres"], long["centres"][:12])
        assert short["caption"] == long["caption"]
    # Also holds for whole data sets, clip by clip.
    a = make_dataset(seed=3, num_clips=5, num_frames=12)
    b = make_dataset(seed=3, num_clips=5, num_frames=64)
    np.testing.assert_array_equal(a["frames"], b["frames"][:, :12])


def test_clip_structure():
    clip = make_clip(np.random.default_rng(0), num_frames=5)
    assert clip["frames"].shape == (5, FRAME_SIZE, FRAME_SIZE, 3)
    assert clip["frames"].dtype == np.uint8
    n = len(clip["objects"])
    assert clip["centres"].shape == (5, n, 2) and clip["centres"].dtype == np.float32
    expected = ", ".join(f"{o['colour']} {o['shape']}" for o in clip["objects"])
    assert clip["caption"] == expected


def test_objects_valid_and_inside_frame(small):
    assert set(np.unique(small["num_objects"])) == {1, 2}
    for i in range(len(small["frames"])):
        n = small["num_objects"][i]
        colours = small["colours"][i, :n]
        assert len(set(colours)) == n                 # distinct colours
        assert np.all(small["colours"][i, n:] == -1)
        assert np.all(np.isnan(small["centres"][i, :, n:]))
        r = small["radii"][i, :n]
        assert np.all((r >= shapes.MIN_RADIUS) & (r <= shapes.MAX_RADIUS))
        c = small["centres"][i, :, :n]                # (F, n, 2)
        assert np.all(c - r[None, :, None] >= 0)
        assert np.all(c + r[None, :, None] <= FRAME_SIZE)


def test_only_palette_and_background_colours(small):
    # Pack each RGB pixel into one integer so np.unique is fast.
    rgb = small["frames"].reshape(-1, 3).astype(np.int64)
    packed = np.unique(rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2])
    allowed = {r << 16 | g << 8 | b for r, g, b in [(0, 0, 0), *PALETTE.values()]}
    assert set(packed.tolist()) <= allowed
    assert len(packed) > 2                            # several colours used


def test_every_object_is_visible_in_first_frame_when_alone(small):
    # Single-object clips: the drawn colour is the captioned colour.
    for i in np.flatnonzero(small["num_objects"] == 1):
        frame = small["frames"][i, 0]
        colour = PALETTE[COLOURS[small["colours"][i, 0]]]
        drawn = frame.reshape(-1, 3).any(axis=1)
        assert drawn.sum() >= 4 * shapes.MIN_RADIUS          # at least a few pixels
        assert np.all(frame.reshape(-1, 3)[drawn] == colour)


def test_triangle_is_upright():
    mask = shapes.shape_mask("triangle", (16.0, 16.0), 6.0)
    widths = mask.sum(axis=1)
    rows = np.flatnonzero(widths)
    assert np.all(np.diff(widths[rows]) >= 0)         # wider towards the bottom
    assert widths[rows[0]] < widths[rows[-1]]


def test_bounce_flips_velocity_at_wall(small):
    c = small["centres"].astype(np.float64)
    steps = np.diff(c, axis=1)                        # (N, F-1, 2, 2) displacements
    flips = 0
    for i in range(len(c)):
        for j in range(small["num_objects"][i]):
            r = small["radii"][i, j]
            for axis in range(2):
                pos, v = c[i, :, j, axis], steps[i, :, j, axis]
                wall_gap = np.minimum(pos - r, FRAME_SIZE - r - pos)
                speed = np.median(np.abs(v))          # most steps are free flight
                assert shapes.MIN_SPEED <= speed <= shapes.MAX_SPEED
                # Free flight keeps |velocity| fixed. A step that crosses a
                # wall is reflected, so its displacement can be shorter; such
                # steps only happen next to a wall.
                free = np.isclose(np.abs(v), speed, atol=1e-4)
                for t in np.flatnonzero(~free):
                    assert wall_gap[t] < speed
                # Between consecutive free steps the velocity sign flips only
                # if the object touched a wall in between.
                idx = np.flatnonzero(free)
                for a, b in zip(idx[:-1], idx[1:]):
                    if np.sign(v[a]) != np.sign(v[b]):
                        flips += 1
                        assert wall_gap[a + 1:b + 1].min() <= shapes.MAX_SPEED
                    else:
                        assert b == a + 1             # no detour without a flip
    assert flips > 10                                 # bounces really happen


def test_tokenize_round_trip():
    for caption in ["red circle", "blue square, yellow triangle", "green triangle"]:
        tokens = tokenize(caption)
        assert tokens.dtype == np.int64 and tokens.shape == (8,)
        assert detokenize(tokens) == caption
    assert list(tokenize("red circle, blue square")[:5]) == [
        VOCAB.index("red"), VOCAB.index("circle"),
        VOCAB.index("blue"), VOCAB.index("square"), 0]
    assert VOCAB == ["<pad>", *COLOURS, *SHAPES]


def test_tokenize_unknown_word():
    with pytest.raises(ValueError, match="purple") as info:
        tokenize("purple circle")
    assert "\n" not in str(info.value) and "triangle" in str(info.value)
    with pytest.raises(ValueError):
        tokenize("<pad>")


def test_empty_caption_is_all_pads():
    np.testing.assert_array_equal(tokenize(""), np.zeros(8, dtype=np.int64))
    assert tokenize("", max_len=4).shape == (4,)


def test_save_load_round_trip(tmp_path):
    data = make_dataset(seed=5, num_clips=4, num_frames=6)
    path = tmp_path / "d.npz"
    save_dataset(path, data)
    loaded = load_dataset(path)
    assert loaded["captions"] == data["captions"]
    for key in ("frames", "centres", "num_objects", "colours", "shapes", "radii"):
        np.testing.assert_array_equal(loaded[key], data[key])


def test_load_errors_are_helpful(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m tiny_data.shapes"):
        load_dataset(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="python -m tiny_data.shapes"):
        load_dataset(bad)


@pytest.mark.parametrize("path, n, f", [(TRAIN_PATH, 2000, 16), (TEST_PATH, 128, 64)])
def test_shipped_files(path, n, f):
    data = load_dataset(path)
    assert data["frames"].shape == (n, f, FRAME_SIZE, FRAME_SIZE, 3) and data["frames"].dtype == np.uint8
    assert data["centres"].shape == (n, f, 2, 2) and data["centres"].dtype == np.float32
    assert len(data["captions"]) == n
    assert data["num_objects"].shape == (n,)
    assert data["colours"].shape == data["shapes"].shape == (n, 2)
    for caption in data["captions"][:50]:
        tokenize(caption)                             # all words in vocabulary


def test_shipped_train_matches_generator():
    # Cheap determinism check on the shipped file: regenerate the first clips.
    shipped = load_dataset(TRAIN_PATH)
    fresh = make_dataset(seed=0, num_clips=20, num_frames=16)
    np.testing.assert_array_equal(shipped["frames"][:20], fresh["frames"])
    assert shipped["captions"][:20] == fresh["captions"]


def test_shipped_files_small():
    total = sum(p.stat().st_size for p in TRAIN_PATH.parent.glob("*.npz"))
    assert total <= 10 * 1024 * 1024


# ----------------------------------------------------------------------------
# Exact motion: whole pixels, exact translates, exact bounces
# ----------------------------------------------------------------------------

def folded(p0, v, num_frames, low, high):
    """Closed form of a bounce between walls low and high (whole pixels): the free path p0 + v t, folded back
    into [low, high] by reflection (a triangle wave of period 2 (high - low)). Independent of simulate's loop."""
    span = high - low
    u = np.mod(p0 - low + v * np.arange(num_frames), 2 * span)
    return low + np.where(u <= span, u, 2 * span - u)


def test_motion_is_whole_pixels_and_bounces_are_exact_reflections():
    data = make_dataset(seed=3, num_clips=200, num_frames=48)
    bounces = 0
    for i in range(200):
        for j in range(data["num_objects"][i]):
            pixel = data["centres"][i, :, j] - 0.5              # the pixel holding the centre
            np.testing.assert_array_equal(pixel, np.round(pixel))   # on a pixel centre, every frame
            r = int(data["radii"][i, j])
            step = np.diff(pixel, axis=0)
            assert np.all(np.abs(step) <= shapes.MAX_SPEED)
            for axis in range(2):
                p, v0 = pixel[:, axis], step[0, axis]
                # The first step is free unless the object starts at a wall; either way the closed form
                # with the initial velocity must reproduce the whole path.
                v_init = v0 if r < p[0] < FRAME_SIZE - 1 - r else None
                if v_init is None:
                    continue
                np.testing.assert_array_equal(p, folded(p[0], v_init, len(p), r, FRAME_SIZE - 1 - r))
                bounces += int(np.sum(np.diff(np.sign(step[:, axis])) != 0))
    assert bounces > 100                                        # bounces really happen


def test_each_frame_is_the_exact_translate_of_the_one_before():
    """Each object alone: its frame t + 1 is its frame t moved by the whole-pixel step (no pixel changes shape),
    and for one-object clips the whole frame is."""
    data = make_dataset(seed=4, num_clips=60, num_frames=32)
    checked = 0
    for i in range(60):
        for j in range(data["num_objects"][i]):
            obj = {"colour": COLOURS[data["colours"][i, j]], "shape": SHAPES[data["shapes"][i, j]],
                   "radius": float(data["radii"][i, j])}
            alone = shapes.render([obj], data["centres"][i][:, j:j + 1])
            step = np.diff(data["centres"][i][:, j], axis=0).astype(int)
            for t in range(31):
                dy, dx = step[t]
                moved = np.roll(alone[t], (dy, dx), axis=(0, 1))
                np.testing.assert_array_equal(moved, alone[t + 1])
                assert alone[t, :, :, :].any(axis=-1).sum() == alone[t + 1].any(axis=-1).sum()   # no clipping
                checked += 1
        if data["num_objects"][i] == 1:
            np.testing.assert_array_equal(data["frames"][i], shapes.render(
                [{"colour": COLOURS[data["colours"][i, 0]], "shape": SHAPES[data["shapes"][i, 0]],
                  "radius": float(data["radii"][i, 0])}], data["centres"][i][:, :1]))
    assert checked > 1000


def test_a_wrong_bounce_would_fail_the_closed_form():
    """The closed form is strict: stopping one pixel short of the wall, or sticking a frame at it, differs."""
    exact = folded(5, 1, 20, 3, 12)
    assert exact.max() == 12 and exact.min() == 3
    short = folded(5, 1, 20, 3, 11)
    assert not np.array_equal(exact, short)
    sticky = np.concatenate([exact[:8], [exact[7]], exact[8:19]])
    assert not np.array_equal(exact, sticky)


# ----------------------------------------------------------------------------
# The textured toy: each object carries its own random pattern
# ----------------------------------------------------------------------------

def test_textured_option_leaves_the_flat_data_unchanged():
    flat = make_dataset(seed=5, num_clips=6, num_frames=12)
    again = make_dataset(seed=5, num_clips=6, num_frames=12, textured=False)
    np.testing.assert_array_equal(flat["frames"], again["frames"])
    assert "textures" not in flat


def test_the_pattern_is_carried_by_the_object():
    """Every frame of a textured clip is the exact translate of its first frame by the object's motion (the
    pattern moves with the object, whole pixels), its lit pixels are the flat clip's shape, its shades are the
    colour and TEXTURE_DARK times it, and each clip has a pattern of its own."""
    data = make_dataset(seed=4, num_clips=8, num_frames=20, textured=True)
    assert data["textures"].shape == (8, 2, shapes.TEXTURE_SIZE, shapes.TEXTURE_SIZE)
    assert len({data["textures"][i, 0].tobytes() for i in range(8)}) == 8
    for i in range(8):
        frames, centres = data["frames"][i], data["centres"][i, :, 0]
        rgb = np.array(PALETTE[COLOURS[data["colours"][i, 0]]])
        dark = np.round(shapes.TEXTURE_DARK * rgb)
        lit = frames.max(-1) > 0
        assert {tuple(c) for c in frames[lit]} == {tuple(rgb), tuple(dark)}   # both shades, nothing else
        blocks = data["textures"][i, 0]
        assert np.array_equal(blocks[::2, ::2], blocks[1::2, 1::2])        # 2x2-pixel blocks
        y0, x0 = np.floor(centres[0]).astype(int)
        for t in range(1, 20):
            dy, dx = np.floor(centres[t]).astype(int) - (y0, x0)
            moved = np.roll(frames[0], (dy, dx), axis=(0, 1))
            assert np.array_equal(frames[t], moved), (i, t)


def test_textured_data_keeps_the_prefix_property_and_the_files_load():
    short = make_dataset(seed=9, num_clips=4, num_frames=6, textured=True)
    long = make_dataset(seed=9, num_clips=4, num_frames=24, textured=True)
    np.testing.assert_array_equal(short["frames"], long["frames"][:, :6])
    data = load_dataset(shapes.TEXTURED_TEST_PATH)
    assert data["frames"].shape == (128, 64, FRAME_SIZE, FRAME_SIZE, 3) and data["textures"].shape[0] == 128
    fresh = make_dataset(seed=2, num_clips=5, num_frames=16, textured=True)
    np.testing.assert_array_equal(load_dataset(shapes.TEXTURED_TRAIN_PATH)["frames"][:5], fresh["frames"])
