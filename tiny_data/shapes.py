"""Toy video data: flat-coloured shapes bouncing around a black 16x16 frame.

Every clip holds one object (the shipped files; up to MAX_OBJECTS = 2 on request) (a colour + a shape) moving at constant
velocity and bouncing elastically off the walls. A caption such as
"red circle, blue square" names the objects, and a tiny word-level tokenizer
turns captions into integer ids for the text conditioning.

Why this data set is useful for teaching autoregressive video diffusion:

* It is tiny (trains in minutes on a laptop) yet has real temporal structure.
* The future is fully determined by the first two frames' positions plus the
  bounce rule, so a model that has learned the physics can continue a clip
  for as many frames as we like, and mistakes (drift, colour shifts, objects
  that melt or teleport) are easy to spot by eye.

Coordinates: pixel (row i, column j) covers the square [i, i+1) x [j, j+1), so
its centre is at (i + 0.5, j + 0.5) and the frame spans [0, size] on each axis.
An object is rasterised by testing which pixel centres lie inside it (hard
edges, no antialiasing), so every pixel is exactly one palette colour or black.

Motion is exact: every object centre sits on a pixel centre and
moves by a whole number of pixels per frame, so each object's next frame is
the exact pixel translate of its current one, and a bounce is an exact
reflection about the last pixel position where the shape still fits. The
next frame is then fully determined by the frames before it: a perfect model
reaches zero error, and any error is the model's. (With sub-pixel motion the
rasterised edges jitter in a way two frames cannot pin down.)

Run ``python -m tiny_data.shapes`` to regenerate the shipped files
(train.npz, test.npz, preview.png) deterministically.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

# ----------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------

FRAME_SIZE = 16                      # frames are FRAME_SIZE x FRAME_SIZE RGB (small: the toy trains on 2 CPU cores)
BACKGROUND = (0, 0, 0)               # flat black background

# Pure saturated colours: far apart in RGB, so colour mistakes are obvious.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)          # index order used in arrays
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# NOTE(choice): one size, half-extent 3 (7x7 pixels): at 2 the triangle and the circle are 5-pixel blobs that are
# hard to tell apart at a glance. One pixel per frame on each axis (diagonal motion): whole pixels make the
# motion exact, and small steps keep the next frame close to the last one.
MIN_RADIUS, MAX_RADIUS = 3, 3        # half-extent of a shape, in whole pixels
MIN_SPEED, MAX_SPEED = 1, 1          # |velocity| per axis, in whole pixels per frame
MAX_OBJECTS = 2                      # the data set arrays are padded to this
# NOTE(choice): the shipped clips hold ONE object. With one or two, the quick start's model continued a
# clip markedly worse (1,000 steps: first generated chunk 0.50 -> 0.60 shape fidelity, the training length 0.38 ->
# 0.52): occlusion and two motions to track cost capacity the 10 minutes do not have. Two-object clips are one
# argument away: make_dataset(..., max_objects=2).
SHIPPED_OBJECTS = 1

DATA_DIR = Path(__file__).resolve().parent
TRAIN_PATH = DATA_DIR / "train.npz"
TEST_PATH = DATA_DIR / "test.npz"
PREVIEW_PATH = DATA_DIR / "preview.png"
REGENERATE_HINT = "run `python -m tiny_data.shapes` to regenerate"

# The textured toy: each object carries its own random pattern, so it has fine detail that only the history holds
# (the caption does not say it). A model that blurs or forgets the history loses the detail first.
# NOTE(choice): 2x2-pixel blocks, "off" at 0.35 of the colour (docs/method.md, "The textured toy").
TEXTURE_BLOCK = 2                    # the pattern is made of TEXTURE_BLOCK x TEXTURE_BLOCK pixel blocks ...
TEXTURE_SIZE = FRAME_SIZE            # ... tiling a TEXTURE_SIZE x TEXTURE_SIZE square that moves with the object
TEXTURE_DARK = 0.35                  # an "off" block shows the object's colour times this
TEXTURED_TRAIN_PATH = DATA_DIR / "textured_train.npz"
TEXTURED_TEST_PATH = DATA_DIR / "textured_test.npz"
TEXTURED_PREVIEW_PATH = DATA_DIR / "textured_preview.png"
TEXTURED_HINT = "run `python -m tiny_data.shapes --textured` to make it"


# ----------------------------------------------------------------------------
# Simulation
# ----------------------------------------------------------------------------

def sample_state(rng: np.random.Generator, size: int = FRAME_SIZE,
                 max_objects: int = MAX_OBJECTS) -> dict:
    """Draw the random initial state of a clip. This is the ONLY place that
    consumes random numbers (unless simulate is asked for random turns), and
    it does not depend on the clip length.

    Returns a dict with
      objects:  list of {"colour": str, "shape": str, "radius": float}
      position: int64 (n_obj, 2) initial (y, x) pixel holding the centre (the
                centre itself is at pixel + 0.5)
      velocity: int64 (n_obj, 2) initial (vy, vx) in whole pixels per frame
    """
    if not 1 <= max_objects <= len(COLOURS):
        raise ValueError(f"max_objects must be in 1..{len(COLOURS)}, got {max_objects}")
    n_obj = int(rng.integers(1, max_objects + 1))
    # Distinct colours, so a caption word always identifies one object.
    colour_ids = rng.choice(len(COLOURS), size=n_obj, replace=False)

    objects, position, velocity = [], [], []
    for c in colour_ids:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        radius = int(rng.integers(MIN_RADIUS, MAX_RADIUS + 1))
        # Keep the whole shape inside the frame: its pixels span pos - r .. pos + r.
        pos = rng.integers(radius, size - radius, size=2)
        speed = rng.integers(MIN_SPEED, MAX_SPEED + 1, size=2)
        sign = rng.choice([-1, 1], size=2)
        objects.append({"colour": COLOURS[int(c)], "shape": shape, "radius": float(radius)})
        position.append(pos)
        velocity.append(speed * sign)
    return {"objects": objects,
            "position": np.array(position, dtype=np.int64),
            "velocity": np.array(velocity, dtype=np.int64)}


def simulate(state: dict, num_frames: int, size: int = FRAME_SIZE,
             turn: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """Deterministic physics: constant velocity plus elastic wall bounces, in
    whole pixels.

    Returns float32 (num_frames, n_obj, 2) (y, x) centres, each a pixel centre
    (pixel index + 0.5); frame 0 is the initial position. No randomness is used
    here, so a longer simulation of the same state always starts with the
    shorter one (the prefix property).

    The pixel p holding a centre may range over [r, size - 1 - r] (the shape's
    pixels p - r .. p + r stay inside). A step that would leave that range is
    reflected about the wall pixel it crossed: p -> 2 * wall - p, and that
    velocity component flips. Everything is integer, so this is exact.

    turn > 0 (the random-walk variant of experiments/turning_toy.py): before
    each step, each velocity component flips with probability `turn`, drawn
    from `rng` frame by frame. The shipped data has turn = 0 and draws nothing.
    """
    pos = state["position"].astype(np.int64).copy()
    vel = state["velocity"].astype(np.int64).copy()
    radius = np.array([int(o["radius"]) for o in state["objects"]], dtype=np.int64)[:, None]
    low, high = radius, size - 1 - radius

    centres = np.empty((num_frames, len(pos), 2), dtype=np.float32)
    for t in range(num_frames):
        centres[t] = pos + 0.5
        if turn > 0:
            vel = np.where(rng.random(vel.shape) < turn, -vel, vel)
        pos = pos + vel
        # One reflection is enough: a step (MAX_SPEED px) is shorter than the
        # free range (size - 1 - 2 * MAX_RADIUS px).
        below, above = pos < low, pos > high
        pos = np.where(below, 2 * low - pos, pos)
        pos = np.where(above, 2 * high - pos, pos)
        vel = np.where(below | above, -vel, vel)
    return centres


# ----------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------

def shape_mask(shape: str, centre, radius: float, size: int = FRAME_SIZE) -> np.ndarray:
    """Boolean (size, size) mask of the pixels whose centres lie inside the shape."""
    # Offsets of every pixel centre from the shape centre (broadcast to HxW).
    dy = (np.arange(size) + 0.5)[:, None] - centre[0]
    dx = (np.arange(size) + 0.5)[None, :] - centre[1]
    if shape == "circle":
        return dy**2 + dx**2 <= radius**2
    if shape == "square":
        return (np.abs(dy) <= radius) & (np.abs(dx) <= radius)
    if shape == "triangle":
        # Upright isosceles triangle inscribed in the square of half-extent r:
        # apex at the top middle (dy = -r), base along the bottom (dy = +r).
        # Its half-width grows linearly from 0 at the apex to r at the base.
        return (dy <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def make_texture(rng: np.random.Generator) -> np.ndarray:
    """A random bool (TEXTURE_SIZE, TEXTURE_SIZE) pattern of TEXTURE_BLOCK-pixel blocks, each on or off."""
    blocks = rng.random((TEXTURE_SIZE // TEXTURE_BLOCK,) * 2) < 0.5
    return np.kron(blocks, np.ones((TEXTURE_BLOCK, TEXTURE_BLOCK), dtype=bool))


def object_colours(colour: str, centre, texture: np.ndarray | None, size: int = FRAME_SIZE) -> np.ndarray:
    """float (size, size, 3) RGB of an object everywhere in the frame (the shape mask picks its pixels).

    Flat: the palette colour. Textured: the pattern is carried by the object, shifted by its centre pixel, so
    it moves with the object exactly; "off" pixels show the colour times TEXTURE_DARK.
    """
    rgb = np.array(PALETTE[colour], dtype=np.float64)
    if texture is None:
        return np.broadcast_to(rgb, (size, size, 3))
    cy, cx = int(np.floor(centre[0])), int(np.floor(centre[1]))
    rows = (np.arange(size) - cy) % TEXTURE_SIZE
    cols = (np.arange(size) - cx) % TEXTURE_SIZE
    shade = np.where(texture[np.ix_(rows, cols)], 1.0, TEXTURE_DARK)
    return shade[..., None] * rgb


def render(objects: list[dict], centres: np.ndarray, size: int = FRAME_SIZE) -> np.ndarray:
    """Draw uint8 (F, size, size, 3) frames; later objects are drawn over earlier ones.

    An object with a "texture" (see make_texture) is drawn with its pattern; one without is flat.
    """
    frames = np.zeros((len(centres), size, size, 3), dtype=np.uint8)
    frames[:] = BACKGROUND
    for t, frame_centres in enumerate(centres):
        for obj, centre in zip(objects, frame_centres):
            mask = shape_mask(obj["shape"], centre, obj["radius"], size)
            rgb = object_colours(obj["colour"], centre, obj.get("texture"), size)
            frames[t][mask] = np.round(rgb[mask]).astype(np.uint8)
    return frames


def make_clip(rng: np.random.Generator, num_frames: int, size: int = FRAME_SIZE,
              max_objects: int = MAX_OBJECTS, turn: float = 0.0, textured: bool = False) -> dict:
    """Generate one clip.

    The random initial state is drawn first (independently of num_frames) and
    the motion is then deterministic, so with the same seed a 12-frame clip
    equals the first 12 frames of a 64-frame clip. textured=True gives each
    object a random pattern (make_texture), drawn right after the state.

    Returns a dict with
      frames:  uint8 (F, H, W, 3)
      caption: str, e.g. "red circle, blue square" (objects in drawing order)
      objects: list of {"colour", "shape", "radius"} dicts (and "texture" if textured)
      centres: float32 (F, n_obj, 2) (y, x) pixel centres per frame
    """
    state = sample_state(rng, size, max_objects)
    if textured:
        for obj in state["objects"]:
            obj["texture"] = make_texture(rng)
    centres = simulate(state, num_frames, size, turn, rng)
    objects = state["objects"]
    return {"frames": render(objects, centres, size),
            "caption": ", ".join(f"{o['colour']} {o['shape']}" for o in objects),
            "objects": objects,
            "centres": centres}


# ----------------------------------------------------------------------------
# Caption vocabulary and tokenizer
# ----------------------------------------------------------------------------

PAD_ID = 0
VOCAB: list[str] = ["<pad>", *COLOURS, *SHAPES]
WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}


def tokenize(caption: str, max_len: int = 8) -> np.ndarray:
    """Caption -> int64 (max_len,) token ids, right-padded with PAD_ID (0).

    Commas only separate objects; they are not tokens. The empty caption ""
    becomes all pads: this is the "no caption" input used for
    classifier-free guidance.
    """
    words = caption.replace(",", " ").lower().split()
    for w in words:
        if w not in WORD_TO_ID or w == VOCAB[PAD_ID]:
            raise ValueError(f"unknown word {w!r} in caption {caption!r}; "
                             f"vocabulary: {VOCAB[1:]}")
    if len(words) > max_len:
        raise ValueError(f"caption {caption!r} has {len(words)} words, "
                         f"more than max_len={max_len}")
    tokens = np.full(max_len, PAD_ID, dtype=np.int64)
    tokens[:len(words)] = [WORD_TO_ID[w] for w in words]
    return tokens


def tokenize_all(captions, max_len: int = 8) -> np.ndarray:
    """Captions -> int64 (len(captions), max_len) token ids, one row per caption (see tokenize)."""
    return np.stack([tokenize(c, max_len) for c in captions]).reshape(len(captions), max_len)


def detokenize(tokens) -> str:
    """Inverse of tokenize for captions made by make_clip (pads are dropped
    and a comma is put after each shape word that is followed by more words)."""
    words = [VOCAB[int(t)] for t in tokens if int(t) != PAD_ID]
    out = ""
    for i, w in enumerate(words):
        out += w
        if i + 1 < len(words):
            out += ", " if w in SHAPES else " "
    return out


# ----------------------------------------------------------------------------
# Data sets: generate, save, load
# ----------------------------------------------------------------------------

def make_dataset(seed: int, num_clips: int, num_frames: int, size: int = FRAME_SIZE,
                 max_objects: int = SHIPPED_OBJECTS, turn: float = 0.0, textured: bool = False) -> dict:
    """Generate num_clips clips from one seeded generator, stacked into arrays.

    Returns a dict with (N = num_clips, F = num_frames, padded to 2 objects):
      frames:      uint8   (N, F, size, size, 3)
      captions:    list[str] of length N
      centres:     float32 (N, F, 2, 2) (y, x); NaN for an absent 2nd object
      num_objects: int64   (N,)
      colours:     int64   (N, 2) index into COLOURS; -1 if absent
      shapes:      int64   (N, 2) index into SHAPES; -1 if absent
      radii:       float32 (N, 2) half-extents; NaN if absent
      textures:    bool    (N, 2, TEXTURE_SIZE, TEXTURE_SIZE), only if textured (all False if absent)
    """
    rng = np.random.default_rng(seed)
    k = MAX_OBJECTS
    data = {
        "frames": np.zeros((num_clips, num_frames, size, size, 3), dtype=np.uint8),
        "captions": [],
        "centres": np.full((num_clips, num_frames, k, 2), np.nan, dtype=np.float32),
        "num_objects": np.zeros(num_clips, dtype=np.int64),
        "colours": np.full((num_clips, k), -1, dtype=np.int64),
        "shapes": np.full((num_clips, k), -1, dtype=np.int64),
        "radii": np.full((num_clips, k), np.nan, dtype=np.float32),
    }
    if textured:
        data["textures"] = np.zeros((num_clips, k, TEXTURE_SIZE, TEXTURE_SIZE), dtype=bool)
    for i in range(num_clips):
        clip = make_clip(rng, num_frames, size, max_objects=max_objects, turn=turn, textured=textured)
        n = len(clip["objects"])
        data["frames"][i] = clip["frames"]
        data["captions"].append(clip["caption"])
        data["centres"][i, :, :n] = clip["centres"]
        data["num_objects"][i] = n
        for j, obj in enumerate(clip["objects"]):
            data["colours"][i, j] = COLOURS.index(obj["colour"])
            data["shapes"][i, j] = SHAPES.index(obj["shape"])
            data["radii"][i, j] = obj["radius"]
            if textured:
                data["textures"][i, j] = obj["texture"]
    return data


DATASET_KEYS = ("frames", "captions", "centres", "num_objects", "colours", "shapes", "radii")
OPTIONAL_KEYS = ("textures",)        # the textured toy's patterns


def save_dataset(path, data: dict) -> None:
    """Save a make_dataset dict with np.savez_compressed (no pickled objects)."""
    arrays = {key: np.asarray(data[key]) for key in DATASET_KEYS + OPTIONAL_KEYS if key in data}
    arrays["captions"] = np.array(data["captions"], dtype=np.str_)  # unicode array
    np.savez_compressed(path, **arrays)


def load_dataset(path) -> dict:
    """Load a file written by save_dataset; captions come back as list[str].

    Raises FileNotFoundError if the file is missing and ValueError if it is
    unreadable or incomplete, each with a one-line hint on how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data set file {path} not found; {REGENERATE_HINT}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {key: npz[key] for key in DATASET_KEYS}
            data.update({key: npz[key] for key in OPTIONAL_KEYS if key in npz.files})
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"data set file {path} is corrupt or incomplete "
                         f"({type(err).__name__}: {err}); {REGENERATE_HINT}") from None
    n = len(data["frames"])
    if data["frames"].ndim != 5 or any(len(data[k]) != n for k in DATASET_KEYS):
        raise ValueError(f"data set file {path} has inconsistent array shapes; "
                         f"{REGENERATE_HINT}")
    data["captions"] = [str(c) for c in data["captions"]]
    return data


# ----------------------------------------------------------------------------
# Preview image
# ----------------------------------------------------------------------------

def save_preview(data: dict, path, num_clips: int = 8, num_frames: int = 8,
                 frame_step: int = 2, scale: int = 4) -> None:
    """Contact sheet: one row per clip (caption above it), every frame_step-th
    frame, upscaled by `scale` with nearest neighbour so pixels stay sharp."""
    from PIL import Image, ImageDraw  # only needed here

    frames = data["frames"][:num_clips, :num_frames * frame_step:frame_step]
    n, f, h, w, _ = frames.shape
    cell, gap, label = h * scale, 4, 14        # frame size, spacing, text band
    sheet = Image.new("RGB", (f * (cell + gap) + gap, n * (cell + label + gap) + gap),
                      (64, 64, 64))            # grey, so black frames stand out
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        top = gap + i * (cell + label + gap)
        draw.text((gap, top), f"{i}: {data['captions'][i]}", fill=(255, 255, 255))
        for t in range(f):
            img = Image.fromarray(frames[i, t]).resize((cell, cell), Image.NEAREST)
            sheet.paste(img, (gap + t * (cell + gap), top + label))
    sheet.save(path)


def main(argv=None) -> None:
    """Regenerate the shipped files (or, with --textured, make the textured toy's) and print their sizes."""
    import argparse
    p = argparse.ArgumentParser(description="Write the toy data sets (deterministic).")
    p.add_argument("--textured", action="store_true",
                   help="write the textured toy's files instead (textured_train.npz, textured_test.npz)")
    textured = p.parse_args(argv).textured
    # The textured sets have their own seeds, so no textured clip repeats a flat clip's motion.
    train, test, preview = ((TEXTURED_TRAIN_PATH, TEXTURED_TEST_PATH, TEXTURED_PREVIEW_PATH) if textured
                            else (TRAIN_PATH, TEST_PATH, PREVIEW_PATH))
    jobs = [(train, dict(seed=2 if textured else 0, num_clips=2000, num_frames=16)),
            (test, dict(seed=3 if textured else 1, num_clips=128, num_frames=64))]  # held out
    for path, kwargs in jobs:
        data = make_dataset(**kwargs, textured=textured)
        save_dataset(path, data)
        print(f"{path.name}: {data['frames'].shape} frames, "
              f"{path.stat().st_size / 1e6:.2f} MB")
        if path == train:
            save_preview(data, preview)
    print(f"{preview.name}: {preview.stat().st_size / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
