"""
media.py -- pictures and videos: frames to uint8 and back, side-by-side grids, GIF / MP4 / contact sheets, and
the plots of the loss and of history routing.
"""

import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import rf

RED = (220, 40, 40)          # marks frames past the training clip length (GIF, contact sheet)


def from_uint8(frames):
    """(..., H, W, 3) uint8 frames (numpy or torch) -> (..., 3, H, W) float in [-1, 1], the model's pixel range."""
    x = torch.as_tensor(frames)
    return x.movedim(-1, -3).float() / 127.5 - 1


def to_uint8(video):
    """(B, F, 3, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return ((video.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 1, 3, 4, 2).cpu().numpy()


def grid_frames(rows, scale=4, gap=2, titles=None):
    """rows: list of rows, each a list of (F, H, W, 3) uint8 videos side by side. -> (F, H', W', 3): one grid image
    per frame, upscaled by nearest neighbour so small frames stay crisp; `titles` (one per column) on a strip above,
    wrapped to the column's width."""
    F_, H, W, _ = rows[0][0].shape
    width = W * scale // 6                                                          # ~6 px per character
    lines = [textwrap.wrap(t, width) or [""] for t in titles] if titles else []
    cols, top = len(rows[0]), 12 * max(map(len, lines)) + 2 if titles else 0
    out = np.full((F_, top + len(rows) * (H * scale + gap) - gap, cols * (W * scale + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, vid in enumerate(row):
            big = vid.repeat(scale, 1).repeat(scale, 2)
            y, x = top + r * (H * scale + gap), c * (W * scale + gap)
            out[:, y:y + H * scale, x:x + W * scale] = big
    if titles:
        strip = Image.fromarray(out[0, :top])
        draw = ImageDraw.Draw(strip)
        for c, column in enumerate(lines):
            for i, line in enumerate(column):
                draw.text((c * (W * scale + gap) + 2, 1 + 12 * i), line, fill="black")
        out[:, :top] = np.asarray(strip)
    return out


def save_gif(frames, path, fps=8, boundary=None):
    """frames (F, H, W, 3) uint8 -> an endlessly looping GIF; a red bar marks frames past `boundary`."""
    imgs = []
    for i, f in enumerate(frames):
        img = Image.fromarray(f)
        if boundary is not None and i >= boundary:
            ImageDraw.Draw(img).rectangle([0, 0, img.width - 1, 2], fill=RED)
        imgs.append(img)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)


def save_mp4(frames, path, fps=8):
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary)
    except ImportError:
        print("note: no MP4 (pip install imageio imageio-ffmpeg)")
        return False
    h, w = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, (-h) % 16), (0, (-w) % 16), (0, 0)), constant_values=255)
    imageio.mimsave(path, list(frames), fps=fps, macro_block_size=16)
    return True


def save_contact_sheet(rows, labels, path, every=2, scale=3, boundary=None):
    """One line of frames per video (every `every`-th frame), labelled on the left. Above the columns, each frame's
    number (counted from 1, as in the GIF); with `boundary` (the training clip length, in frames), a red bar over the
    frames past it and a line below the sheet that says so."""
    frames = [np.concatenate(list(v[::every]), axis=1) for v in rows]              # (H, F/every * W, 3)
    label_w, head = 180, 16
    H, W = frames[0].shape[:2]
    w = rows[0].shape[2] * scale                                                   # one frame's width on the sheet
    shown = range(0, len(rows[0]), every)                                          # 0-based frame indices
    past = [boundary is not None and i >= boundary for i in shown]
    foot = 14 if any(past) else 0
    sheet = Image.new("RGB", (label_w + W * scale, head + len(frames) * (H * scale + 4) + foot), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 1), "frame", fill="black")
    for j, (i, late) in enumerate(zip(shown, past)):
        x = label_w + j * w
        draw.text((x + 2, 1), str(i + 1), fill=RED if late else "black")
        if late:
            draw.rectangle([x, head - 4, x + w - 1, head - 2], fill=RED)
    for i, (f, label) in enumerate(zip(frames, labels)):
        y = head + i * (H * scale + 4)
        sheet.paste(Image.fromarray(f).resize((W * scale, H * scale), Image.NEAREST), (label_w, y))
        draw.text((4, y + H * scale // 2 - 6), label, fill="black")
    if foot:
        draw.text((4, sheet.height - foot + 1), f"red bar: frames past the training clip length ({boundary} frames)",
                  fill=RED)
    sheet.save(path)


# --------------------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------------------

def pyplot():
    """matplotlib's pyplot, drawing to files only (no window, no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def mask_ascii(num_chunks: int, two_stream: bool = True) -> str:
    """rf's mask rule at chunk level, as printed in the docs. `#` = attends, `.` = masked."""
    chunk = torch.arange(num_chunks)
    if two_stream:
        chunk = torch.cat([chunk, chunk])
        stream = torch.tensor([rf.HISTORY] * num_chunks + [rf.NOISY] * num_chunks)
    else:
        stream = torch.zeros(num_chunks, dtype=torch.long)
    names = [("H" if s == rf.HISTORY and two_stream else "Z" if two_stream else "C") + str(c + 1)
             for c, s in zip(chunk.tolist(), stream.tolist())]
    grid = rf.dense_mask(chunk, stream)
    rows = ["q\\k " + " ".join(f"{n:>3}" for n in names)]
    rows += [f"{n:>3} " + " ".join(f"{'#' if a else '.':>3}" for a in row) for n, row in zip(names, grid.tolist())]
    return "\n".join(rows)


class RoutingLog:
    """Counts routing decisions while attached to a model (model.routing_log = RoutingLog()): per history chunk,
    how often it was eligible and how often selected, summed over every routed call, layer, head and query token."""

    def __init__(self):
        self.eligible = torch.zeros(0, dtype=torch.long)
        self.selected = torch.zeros(0, dtype=torch.long)

    def add(self, selected, eligible):
        """selected (B, nh, Lq, J) and eligible (Lq, J) of one routed attention call."""
        B, nh = selected.shape[:2]
        new = selected.sum((0, 1, 2)).cpu(), eligible.sum(0).cpu() * B * nh          # (J,) each
        n = max(len(self.selected), len(new[0]))
        self.selected, self.eligible = (F.pad(old, (0, n - len(old))) + F.pad(x, (0, n - len(x)))
                                        for old, x in zip((self.selected, self.eligible), new))

    def frequency(self):
        """(J,) how often each history chunk was selected when it could have been (the paper's Fig. 8)."""
        return self.selected / self.eligible.clamp(min=1)

    def sparsity(self) -> float:
        """The fraction of eligible (query, history chunk) pairs not attended: 1 - k / J for top-k over J."""
        eligible = self.eligible.sum().item()
        return 1.0 - self.selected.sum().item() / eligible if eligible else 0.0


def save_routing_plot(log, path, cfg):
    """Bar chart of log.frequency(): per history chunk (1-based, as in the paper), the fraction of routing decisions
    (layers x heads x query tokens x videos x CFG branches) that selected it."""
    plt = pyplot()
    freq = log.frequency().numpy()
    rule = f"top-{cfg.top_k}" if cfg.top_k else f"window {cfg.window}"
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(freq) + 2), 3.5))
    ax.bar(range(1, len(freq) + 1), freq, color="tab:blue")
    ax.set(xlabel="history chunk", ylabel="selection frequency", ylim=(0, 1), xticks=range(1, len(freq) + 1),
           title=f"{rule}{' + sink' if cfg.sink else ''} routing while generating chunk {len(freq) + 1} "
                 f"(sparsity {log.sparsity():.0%})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_losses(rows, path, warmup_steps, buckets):
    """Loss per noise-level bucket against step -> a PNG at path. rows: the run's log.jsonl rows; a bucket with no
    chunk in an interval is None. Returns False (and draws nothing) while there is nothing to draw."""
    rows = [r for r in rows if any(v is not None and v > 0 for v in r["bucket_loss"])]
    if not rows:
        return False
    plt = pyplot()
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (lo, hi) in enumerate(zip(buckets[:-1], buckets[1:])):
        losses = [float("nan") if r["bucket_loss"][i] is None else r["bucket_loss"][i] for r in rows]
        ax.plot(steps, losses, marker=".", label=f"t in [{lo}, {hi})")
    ax.axvline(warmup_steps, color="grey", ls="--", lw=1, label="end of teacher-forcing warm-up")
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="training loss per noise level")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
