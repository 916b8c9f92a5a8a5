"""Per-frame metrics for generated moving-shapes videos.

Given clean prefix frames of a test clip, the rest of the clip is fixed by the
physics (constant velocity, wall bounces), so a generated continuation can be
scored frame by frame against the simulator's truth. Four metrics:

* ``colour_error``        how far pixels are from the allowed colours (the 4
                           palette colours plus the black background). Blur,
                           noise, colour shift and "melting" raise it.
* ``object_persistence``  1.0 when a frame holds exactly the clip's objects
                           (by colour), no more and no fewer, else 0.0.
* ``motion_error``        distance in pixels between each object's tracked
                           centre and its true centre.
* ``shape_fidelity``      per object, the overlap (IoU) of the pixels of its
                           colour with its true pixels: 1.0 is the exact shape
                           at the exact place; a blob, a smear, a 1-pixel shift
                           or a missing object all lower it.

Every metric is a pure numpy function returning one value per frame, shape
(F,), so you can plot it against the frame index. ``evaluate`` runs all three
on one clip.

Input frames
------------
``frames`` is (F, H, W, 3) RGB, either uint8 in [0, 255] or float in [0, 1]
(floats are clipped to [0, 1]). Model outputs in [-1, 1] must be mapped to
[0, 1] first: ``(x + 1) / 2``.

Tracking by colour
------------------
Every pixel is "snapped" to its nearest allowed colour. Colours are distinct
within a clip, so the pixels that snap to, say, red belong to the red object,
and the red object's tracked centre is their centroid. This is why two objects
overlapping is not a problem: we never need to separate them spatially.

Occlusion in the truth
----------------------
Objects are drawn in order, so the second object can hide the first one, even
completely (this happens in test.npz). ``visible_objects`` re-renders the true
continuation and marks which objects actually show at least ``min_pixels``
pixels. An object hidden in the truth is not required to be present
(persistence) and is not scored (motion error) in that frame.

Floors: always run the metrics on ground-truth clips first
----------------------------------------------------------
A metric is only meaningful next to its value on real data. On the 128
clips of test.npz (64 frames each; the numbers are measured by
``python -m tiny_data.metrics``):

* colour error: exactly 0 (every pixel is a palette colour or black);
* persistence:  exactly 1 in every frame;
* shape fidelity: exactly 1 in every frame (the truth's pixels are its own
  true pixels);
* motion error: 0 (up to float rounding, < 1e-12 px) on the shipped one-object
  clips: every centre sits on a pixel centre, and the triangle's centroid
  offset is measured on its rasterised pixels (see ``centroid_offset``). NOT 0
  when objects overlap (two-object clips, ``make_dataset(max_objects=2)``): a
  partly occluded object's visible pixels are off-centre, up to 1.5 px, 99% of
  frames within 1 px. Differences between methods smaller than the floor
  mean nothing.
"""

from __future__ import annotations

import numpy as np

from tiny_data.shapes import BACKGROUND, COLOURS, FRAME_SIZE, PALETTE, SHAPES, TEXTURE_DARK, render

# Allowed colours in [0, 1] units: the palette in COLOURS order, then black.
# A snapped label k < len(COLOURS) is palette colour COLOURS[k]; the label
# BACKGROUND_LABEL (= len(COLOURS)) is the background.
ALLOWED_RGB = np.array([PALETTE[c] for c in COLOURS] + [BACKGROUND], dtype=np.float64) / 255.0
BACKGROUND_LABEL = len(COLOURS)

MIN_PIXELS = 3        # a colour "is there" when at least this many pixels snap to it
MAX_DISTANCE = np.sqrt(3.0)  # largest possible distance between two RGB colours in [0, 1]^3


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------

def to_unit_rgb(frames) -> np.ndarray:
    """Return frames as float64 in [0, 1], shape (F, H, W, 3).

    uint8 (or any integer type) is divided by 255; floats are assumed to be in
    [0, 1] already and are clipped to it.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames of shape (F, H, W, 3), got {frames.shape}")
    if np.issubdtype(frames.dtype, np.integer):
        return frames.astype(np.float64) / 255.0
    return np.clip(frames.astype(np.float64), 0.0, 1.0)


def _squared_distances_to_allowed(frames) -> np.ndarray:
    """(F, H, W, 5) squared Euclidean RGB distance from each pixel to each allowed colour."""
    x = to_unit_rgb(frames)
    d2 = np.zeros(x.shape[:-1] + (len(ALLOWED_RGB),))
    for channel in range(3):                      # a loop over 3 channels is faster than
        diff = x[..., channel, None] - ALLOWED_RGB[:, channel]  # one big (..., 5, 3) array
        d2 += diff * diff
    return d2


def snap(frames) -> np.ndarray:
    """Label every pixel with its nearest allowed colour: int (F, H, W).

    Labels 0..3 are indices into COLOURS; BACKGROUND_LABEL (4) is black.
    """
    return np.argmin(_squared_distances_to_allowed(frames), axis=-1)


def colour_counts(frames) -> np.ndarray:
    """int (F, len(COLOURS)): how many pixels of each frame snap to each palette colour."""
    labels = snap(frames)
    return np.stack([(labels == k).sum(axis=(1, 2)) for k in range(len(COLOURS))], axis=1)


def visible_objects(true_centres, colours, shapes, radii, size: int = FRAME_SIZE,
                    min_pixels: int = MIN_PIXELS) -> np.ndarray:
    """bool (F, K): which objects the TRUE continuation shows in each frame.

    Re-renders the simulator's truth (drawing order = slot order, as in
    shapes.render) and marks an object visible when at least ``min_pixels`` of
    its pixels are not covered by a later object. Padding slots (colour -1)
    are always False.

    true_centres: (F, K, 2) (y, x); colours, shapes: (K,) indices (-1 = none);
    radii: (K,).
    """
    true_centres = np.asarray(true_centres, dtype=np.float64)
    colours, shapes = np.asarray(colours), np.asarray(shapes)
    slots = [k for k in range(len(colours)) if colours[k] >= 0]
    objects = [{"colour": COLOURS[colours[k]], "shape": SHAPES[shapes[k]],
                "radius": float(radii[k])} for k in slots]
    truth = render(objects, true_centres[:, slots], size)
    visible = np.zeros(true_centres.shape[:2], dtype=bool)
    for k in slots:   # the render is exact, so count pixels equal to the colour
        count = (truth == PALETTE[COLOURS[colours[k]]]).all(axis=-1).sum(axis=(1, 2))
        visible[:, k] = count >= min_pixels
    return visible


def centroid_offset(shape: str, radius: float) -> np.ndarray:
    """(dy, dx): where the area centroid of a shape lies relative to its centre.

    Circles and squares are symmetric (0, 0). Our triangle has its apex at
    dy = -r and its base at dy = +r, so its centroid is 2/3 of the way down:
    dy = +r/3 for the continuous shape. The tracker subtracts this so that it estimates the centre used
    by the simulator rather than the centroid.

    With whole-pixel motion a shape is always rasterised on the
    same grid (its centre on a pixel centre), so the offset of its PIXELS'
    centroid is exact and known: we measure it once on the rasterised shape
    (28/31 = 0.90 px for the r = 3 triangle, not quite r/3 = 1). The floor of
    an unoccluded object is then 0 up to float rounding.
    """
    from tiny_data.shapes import shape_mask
    if shape != "triangle":
        return np.zeros(2)
    k = int(np.ceil(radius)) + 1                  # a grid the shape fits in, centre on pixel (k, k)
    mask = shape_mask(shape, (k + 0.5, k + 0.5), radius, 2 * k + 1)
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean() - k, xs.mean() - k])


# ----------------------------------------------------------------------------
# The three metrics
# ----------------------------------------------------------------------------

def colour_error(frames) -> np.ndarray:
    """Colour fidelity error per frame, float (F,), in [0, 1].

    For each pixel: the Euclidean RGB distance (RGB in [0, 1]) to the nearest
    allowed colour (palette or black), divided by sqrt(3) so that 1 is the
    largest possible distance. The frame's value is the mean over its pixels.

    Clean data scores exactly 0. Blur (edge pixels become mixtures), noise,
    and colour shift (e.g. red drifting to orange) all raise it.
    """
    d = np.sqrt(_squared_distances_to_allowed(frames).min(axis=-1))   # (F, H, W)
    return d.mean(axis=(1, 2)) / MAX_DISTANCE


def object_persistence(frames, colours_present, min_pixels: int = MIN_PIXELS,
                       visible=None) -> np.ndarray:
    """Does each frame hold exactly the clip's objects? float (F,) of 1.0 / 0.0.

    A palette colour counts as present in a frame when at least ``min_pixels``
    pixels snap to it (background pixels are ignored). A frame scores 1.0 when

      * every expected colour is present (no object vanished), and
      * no other palette colour is present (no object appeared).

    colours_present: the clip's colour indices (into COLOURS), e.g. the set of
        colours in the prefix; -1 entries (padding) are ignored.
    visible: optional bool (F, K) aligned with colours_present, from
        ``visible_objects``. An object hidden in the truth in frame t may be
        present or absent in frame t without penalty (it is still a colour of
        the clip, so showing it is not "a new object").

    Use ``persistence_rate`` for the fraction of frames that pass.
    """
    colours_present = np.asarray(colours_present).reshape(-1)
    counts = colour_counts(frames)                        # (F, C)
    seen = counts >= min_pixels
    num_frames = seen.shape[0]
    allowed = np.zeros(len(COLOURS), dtype=bool)          # colours the clip may show
    required = np.zeros((num_frames, len(COLOURS)), dtype=bool)
    for k, c in enumerate(colours_present):
        if c < 0:
            continue
        allowed[c] = True
        required[:, c] = True if visible is None else np.asarray(visible)[:, k]
    ok = (seen | ~required).all(axis=1) & (~seen | allowed).all(axis=1)
    return ok.astype(np.float64)


def persistence_rate(persistence) -> float:
    """Fraction of frames whose persistence is 1 (the mean of object_persistence)."""
    return float(np.mean(persistence))


def motion_error(frames, true_centres, colours, shapes=None, radii=None,
                 min_pixels: int = MIN_PIXELS, visible=None) -> np.ndarray:
    """Mean distance in pixels between tracked and true object centres, float (F,).

    Tracking: the pixels that snap to an object's colour; their centroid, in
    the same coordinates as the simulator (pixel (i, j) has its centre at
    (i + 0.5, j + 0.5)). If ``shapes`` and ``radii`` are given, the known
    centroid offset of the shape is removed (triangles, see
    ``centroid_offset``); without them triangles read about r/3 px too low.

    Missing object: if fewer than ``min_pixels`` pixels have the colour, that
    object scores a fixed penalty equal to the frame diagonal
    (sqrt(H^2 + W^2), 22.6 px for 16x16), i.e. worse than any tracked
    position could be. So a vanished object shows up as a large jump.

    Objects hidden in the truth (``visible`` False, see ``visible_objects``)
    are not scored in that frame. The frame's value is the mean over its
    scored objects (NaN if none is scored, which cannot happen for clips from
    shapes.py: at least one object is always visible).

    true_centres: (F, K, 2) (y, x) from the simulator; colours: (K,) indices
    into COLOURS with -1 for padding; shapes, radii: (K,) or None.
    """
    labels = snap(frames)                                 # (F, H, W)
    num_frames, h, w = labels.shape
    true_centres = np.asarray(true_centres, dtype=np.float64)
    colours = np.asarray(colours).reshape(-1)
    penalty = float(np.hypot(h, w))
    ys = np.arange(h)[:, None] + 0.5
    xs = np.arange(w)[None, :] + 0.5

    total = np.zeros(num_frames)
    scored = np.zeros(num_frames)
    for k, c in enumerate(colours):
        if c < 0:
            continue
        offset = np.zeros(2)
        if shapes is not None and radii is not None:
            offset = centroid_offset(SHAPES[int(shapes[k])], float(radii[k]))
        mask = labels == c                                # (F, H, W)
        n = mask.sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            cy = (mask * ys).sum(axis=(1, 2)) / n - offset[0]
            cx = (mask * xs).sum(axis=(1, 2)) / n - offset[1]
        dist = np.hypot(cy - true_centres[:, k, 0], cx - true_centres[:, k, 1])
        dist = np.where(n >= min_pixels, dist, penalty)
        use = np.ones(num_frames, bool) if visible is None else np.asarray(visible)[:, k]
        total += np.where(use, dist, 0.0)
        scored += use
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / scored


def shape_fidelity(frames, true_centres, colours, shapes, radii,
                   min_pixels: int = MIN_PIXELS, visible=None) -> np.ndarray:
    """Shape fidelity per frame, float (F,), in [0, 1]: 1 is perfect.

    For each object: the intersection over union (IoU) of two pixel sets,

      * generated: the pixels that snap to the object's colour, and
      * true:      the object's pixels in the re-rendered truth (what shows of
                   it; a part hidden behind a later object is not its pixel),

    so the right shape, at the right place, of the right colour scores 1, and
    a blob, a smeared edge, a shift, a wrong shape or extra pixels of that
    colour score less. A missing object scores 0. The frame's value is the
    mean over its scored objects: objects hidden in the truth (``visible``
    False, see ``visible_objects``) are not scored in that frame.

    Why IoU per object and not a pixel accuracy over the frame: the frame is
    mostly background, which any dark blur gets right; IoU only counts the
    object's own pixels. How it reads, on the 7x7 shapes of the toy (numbers
    from the test clips, see tests/test_metrics.py): the truth scores exactly
    1; shifted by one pixel along one axis 0.62, diagonally 0.49; a 3x3 box
    blur 0.81 (its corners and edges snap to black); one of two objects
    removed 0.49. So 0.6 means "about one pixel off", not "the right blob".

    true_centres: (F, K, 2) (y, x); colours, shapes: (K,) indices (-1 = none);
    radii: (K,). Must match the frames (same F).
    """
    labels = snap(frames)                                 # (F, H, W)
    num_frames, h, w = labels.shape
    true_centres = np.asarray(true_centres, dtype=np.float64)
    colours, shapes = np.asarray(colours).reshape(-1), np.asarray(shapes).reshape(-1)
    if visible is None:
        visible = visible_objects(true_centres, colours, shapes, radii, h, min_pixels)
    slots = [k for k in range(len(colours)) if colours[k] >= 0]
    objects = [{"colour": COLOURS[colours[k]], "shape": SHAPES[shapes[k]],
                "radius": float(radii[k])} for k in slots]
    truth = render(objects, true_centres[:, slots], h)    # (F, H, W, 3), exact
    total = np.zeros(num_frames)
    scored = np.zeros(num_frames)
    for k in slots:
        colour = colours[k]
        true = (truth == PALETTE[COLOURS[colour]]).all(axis=-1)   # (F, H, W)
        made = labels == colour
        inter = (true & made).sum(axis=(1, 2))
        union = (true | made).sum(axis=(1, 2))
        iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
        use = np.asarray(visible)[:, k]
        total += np.where(use, iou, 0.0)
        scored += use
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / scored


# ----------------------------------------------------------------------------
# The textured toy (shapes.make_dataset(..., textured=True))
# ----------------------------------------------------------------------------
# Each object carries a fine random pattern, and only the history holds it. A model that forgets or blurs its
# history loses the pattern first: its object goes smooth, then dark. Two kinds of score, per frame:
#   against the truth  psnr, lit_iou: is it the right object in the right place?
#   without the truth  detail_kept, present, shade_error: measured against the prompt (the true frames the model
#                      was given), so they say how much of the object and its detail survive, right or not.
# The truth's own detail and lit area do not change from frame to frame (the object only moves), so the prompt's
# are the truth's.
# NOTE(choice): detail as Laplacian energy against the prompt's (docs/method.md, "The textured toy's scores").

LIT = 0.175          # a pixel is lit when a channel exceeds this (half of the dark shade, TEXTURE_DARK = 0.35)


def lit_mask(frames) -> np.ndarray:
    """bool (F, H, W): the pixels that belong to an object (any channel above LIT)."""
    return to_unit_rgb(frames).max(axis=-1) > LIT


def detail_energy(frames) -> np.ndarray:
    """float (F,): the mean squared 4-neighbour Laplacian over pixels and channels (the frame's edges and its
    texture). The black background continues outside the frame, and the ring just outside is counted too, so an
    object touching the border keeps all of its detail."""
    x = np.pad(to_unit_rgb(frames), ((0, 0), (2, 2), (2, 2), (0, 0)))
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return (lap ** 2).mean(axis=(1, 2, 3))


def detail_kept(frames, reference) -> np.ndarray:
    """float (F,) in [0, 1]: exp(-|log(E / E_ref)|) of each frame's detail_energy E against the reference frames'
    mean. 1: as much detail as the reference; a smooth blob, a faded or a vanished object, or noise all score less
    (0.5: half or twice the reference's)."""
    energy, ref = detail_energy(frames), detail_energy(reference).mean()
    return np.exp(-np.abs(np.log((energy + 1e-6) / (ref + 1e-6))))


def present(frames, reference) -> np.ndarray:
    """float (F,) of 1.0 / 0.0: the frame has at least half as many lit pixels as the reference frames' mean."""
    return (lit_mask(frames).sum(axis=(1, 2)) >= 0.5 * lit_mask(reference).sum(axis=(1, 2)).mean()).astype(float)


def shade_error(frames) -> np.ndarray:
    """float (F,): the mean RGB distance (/ sqrt 3) of the lit pixels to the nearest allowed shade (a palette colour,
    or TEXTURE_DARK times one); NaN for a frame with no lit pixel."""
    shades = np.concatenate([ALLOWED_RGB[:len(COLOURS)], TEXTURE_DARK * ALLOWED_RGB[:len(COLOURS)]])
    x = to_unit_rgb(frames)
    d = np.sqrt(((x[..., None, :] - shades) ** 2).sum(-1)).min(-1) / MAX_DISTANCE      # (F, H, W)
    lit = lit_mask(frames)
    with np.errstate(invalid="ignore"):
        return (d * lit).sum(axis=(1, 2)) / lit.sum(axis=(1, 2))


def psnr(frames, truth) -> np.ndarray:
    """float (F,): 10 log10(1 / MSE) in dB, RGB in [0, 1] (capped at 60 dB for an exact frame)."""
    mse = ((to_unit_rgb(frames) - to_unit_rgb(truth)) ** 2).mean(axis=(1, 2, 3))
    return 10 * np.log10(1 / np.maximum(mse, 1e-6))


def lit_iou(frames, truth) -> np.ndarray:
    """float (F,): the overlap (IoU) of the lit pixels with the truth's (1 when both are empty)."""
    a, b = lit_mask(frames), lit_mask(truth)
    union = (a | b).sum(axis=(1, 2))
    return np.where(union > 0, (a & b).sum(axis=(1, 2)) / np.maximum(union, 1), 1.0)


def textured_scores(frames, truth, prompt) -> dict:
    """Every textured-toy score of one clip's frames (F, H, W, 3) against its truth (same frames) and its prompt
    (the true frames the model was given): {name: float (F,)}."""
    return {"detail_kept": detail_kept(frames, prompt), "present": present(frames, prompt),
            "shade_error": shade_error(frames), "psnr": psnr(frames, truth), "lit_iou": lit_iou(frames, truth)}


# ----------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------

def evaluate(frames, clip_info: dict, min_pixels: int = MIN_PIXELS) -> dict:
    """Run all metrics on one generated clip against its truth.

    frames: (F, H, W, 3) generated (or ground-truth) frames.
    clip_info: the truth for ONE clip, with the keys of load_dataset indexed
        by the clip, for frames 0..F-1 (slice centres to match frames):
          centres (F, 2, 2), colours (2,), shapes (2,), radii (2,).
        E.g. ``{k: data[k][i] for k in ("centres", "colours", "shapes", "radii")}``.

    Returns a dict of per-frame float arrays (F,): "colour_error",
    "persistence", "motion_error", "shape_fidelity". Occlusion in the truth is accounted for
    with ``visible_objects``.
    """
    frames = np.asarray(frames)
    centres = np.asarray(clip_info["centres"])
    if len(centres) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(centres)} true centres")
    colours, shapes, radii = clip_info["colours"], clip_info["shapes"], clip_info["radii"]
    visible = visible_objects(centres, colours, shapes, radii, frames.shape[1], min_pixels)
    return {
        "colour_error": colour_error(frames),
        "persistence": object_persistence(frames, colours, min_pixels, visible),
        "motion_error": motion_error(frames, centres, colours, shapes, radii,
                                     min_pixels, visible),
        "shape_fidelity": shape_fidelity(frames, centres, colours, shapes, radii,
                                         min_pixels, visible),
    }


def ground_truth_floor(data: dict) -> dict:
    """Run ``evaluate`` on every ground-truth clip of a data set (load_dataset
    dict). Returns {metric: float (N, F)}: the floor every method is compared to."""
    keys = ("centres", "colours", "shapes", "radii")
    per_clip = [evaluate(data["frames"][i], {k: data[k][i] for k in keys})
                for i in range(len(data["frames"]))]
    return {m: np.stack([r[m] for r in per_clip]) for m in per_clip[0]}


if __name__ == "__main__":
    from tiny_data.shapes import TEST_PATH, load_dataset

    floor = ground_truth_floor(load_dataset(TEST_PATH))
    for name, values in floor.items():
        print(f"{name:13s} mean {values.mean():.4f}  max {values.max():.4f}  "
              f"min {values.min():.4f}  ({values.size} frames)")
