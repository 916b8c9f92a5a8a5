"""
sample.py -- generate videos chunk by chunk from a checkpoint written by train.py, or from Wan2.1's weights.

    python sample.py                                   # continue 4 held-out test clips, side by side with truth
    python sample.py --caption "red circle, blue square" --frames 48
    python sample.py --ckpt runs/toy/latest --seed 3 --no-ema
    python sample.py --ckpt checkpoints/toy_tf --compare checkpoints/toy_ar_s0.6 --frames 32   # shipped: TF | RF
    python sample.py --preset wan2.1-t2v-1.3b --prompt "A cat walks on the grass, realistic"     # Wan2.1 text-to-video
    python sample.py --ckpt runs/wan/latest --prompt "..."                 # a Wan model fine-tuned by train.py

Toy: writes samples.gif, samples.mp4 (when imageio-ffmpeg is installed) and contact_sheet.png to --out. The model
is rebuilt from the checkpoint alone (its meta.json says what it is); nothing is guessed.
Wan: writes one MP4 per video (480x832, 81 frames at 16 fps by default). The prompt is encoded by umT5, the video
generated 3 latent frames (one chunk) at a time with the KV cache, then decoded by Wan's VAE one latent frame at a
time straight into the file. Defaults as in the paper: 32 Euler steps, shift 5, CFG 5 against Wan's negative prompt.
The latents are saved first (wan_seedN_latents.safetensors); --latents FILE decodes such a file again, alone.
"""

import argparse
import re
from pathlib import Path

import numpy as np
import torch

import checkpoints
import cli
import fast_attn
import media
import rf
import wan
from tiny_data import shapes

SAMPLE_RANGES = dict(num=cli.AT_LEAST_1, frames=cli.AT_LEAST_1, prefix_frames=cli.AT_LEAST_0, steps=cli.AT_LEAST_1,
                     shift=cli.ABOVE_0, cfg=cli.AT_LEAST_0, height=cli.AT_LEAST_1, width=cli.AT_LEAST_1)


# Compiled blocks read the KV cache eagerly, but no GPU run has yet compared a compiled video with an eager one.
UNVERIFIED_COMPILE = ("note: --compile is not yet verified for sampling (no GPU run has compared it with eager "
                      "sampling; docs/performance.md): check a video against one made without it")


def parse_args(argv=None):
    """-> (options, the rf.Config fields given: for --preset, or the routing fields for a checkpoint)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint folder written by train.py (default: runs/toy/latest)")
    p.add_argument("--compare", nargs="+", default=None, metavar="CKPT",
                   help="toy: also roll out these checkpoints, on the same clips, prefix and seed, side by side "
                        "(e.g. --ckpt checkpoints/toy_tf --compare checkpoints/toy_ar_s0.6 --frames 32)")
    p.add_argument("--out", default=None,
                   help="output folder (default: the run's samples/ for a checkpoint of a train.py run, e.g. "
                        "runs/toy/samples for runs/toy/latest; runs/samples/<checkpoint folder name> for another, "
                        "e.g. a shipped one; runs/compare with --compare; runs/samples/wan for --preset)")
    p.add_argument("--caption", default=None, help='e.g. "red circle, blue square"; default: test-set clips')
    p.add_argument("--num", type=int, default=None, help="number of videos (default: toy 4, Wan 1)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per video, prefix included (default: toy 24; Wan 81 video frames, 1 + 4k)")
    p.add_argument("--prefix_frames", type=int, default=None,
                   help="clean test-clip frames to continue from (default: one chunk; 0 with --caption)")
    p.add_argument("--test_data", default=str(shapes.TEST_PATH), help="held-out clips to continue")
    p.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's sample_steps)")
    p.add_argument("--shift", type=float, default=None, help="timestep shift (default: sample_shift)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: sample_cfg)")
    p.add_argument("--seed", type=int, default=0, help="the noise seed (the same seed gives the same video)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="use the EMA weights")
    p.add_argument("--no_cache", action="store_true", help="recompute the history at every step (reference path)")
    p.add_argument("--device", default="auto", help="auto (the GPU if there is one) | cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true", help="compile each DiT block (fast_attn.compile_blocks): on a "
                   "GPU, faster chunks once the first has compiled; on a CPU, only the wait for the compiler. "
                   "Not yet verified against eager sampling on a GPU (docs/performance.md)")
    p.add_argument("--save_frames", action="store_true",
                   help="toy: also write the rollouts as arrays, frames.npz: truth and one uint8 (N, T, H, W, 3) "
                        "array per model, for metrics of your own")
    p.add_argument("--routing_plot", default=None, metavar="PATH",
                   help="save a bar chart (PNG) of how often each history chunk was selected while generating the "
                        "last chunk, like the paper's Fig. 8 (needs a checkpoint with top_k or window routing)")
    group = p.add_argument_group("Wan2.1 text-to-video (--preset wan2.1-t2v-1.3b, or --ckpt of a train.py Wan run)")
    group.add_argument("--preset", default=None, help="wan2.1-t2v-1.3b: Wan2.1's weights from --wan")
    group.add_argument("--prompt", default=None, help="what the video shows")
    group.add_argument("--negative_prompt", default=wan.WAN_NEGATIVE_PROMPT, help="CFG's unconditional prompt "
                     "(default: Wan's own, in Chinese)")
    group.add_argument("--wan", default=None, help=f"the DiT: any wan.load_wan source (default: {wan.WAN_PARTS_REPO})")
    group.add_argument("--text_encoder", default=None, help="umT5 + tokenizer, diffusers layout (default: --wan)")
    group.add_argument("--vae", default=None, help="Wan's VAE, diffusers layout (default: --wan)")
    group.add_argument("--height", type=int, default=None, help="pixels (default: 8 x frame_size, i.e. 480)")
    group.add_argument("--width", type=int, default=None, help="pixels (default: 8 x frame_size, i.e. 832)")
    group.add_argument("--offload", action="store_true",
                     help="run the text encoder on the CPU, so it never takes GPU memory (slower)")
    group.add_argument("--latents", default=None, metavar="FILE",
                     help="only decode FILE, the latents an earlier run saved (wan_seedN_latents.safetensors)")
    cli.add_config_options(p, "model and method", "With --preset: these override the preset's values (given per "
                           "preset below).\nWith --ckpt: the model is the checkpoint's; only top_k, window and sink "
                           "may change.")
    args, overrides = cli.split_config_options(vars(p.parse_args(argv)))
    return argparse.Namespace(**args), overrides


def main(argv=None):
    args, overrides = parse_args(argv)
    cli.check_ranges(args, SAMPLE_RANGES)
    device = cli.pick_device(args.device)
    meta_file = Path(args.ckpt or "") / "meta.json"
    try:
        meta = checkpoints.read_meta(args.ckpt) if args.ckpt and meta_file.is_file() else None
    except ValueError as e:                                 # a damaged meta.json: one line, not a traceback
        cli.fail(e)
    if args.preset is not None and not args.preset.startswith("wan"):
        cli.fail(f"--preset {args.preset!r}: sample.py takes --preset only for Wan (wan2.1-t2v-1.3b); the toy "
                 f"samples from a --ckpt")
    if args.preset or args.latents or (meta and meta.get("train", {}).get("preset", "").startswith("wan")):
        return main_wan(args, overrides, device, meta)
    if args.prompt is not None:
        cli.fail("--prompt is for Wan (--preset wan2.1-t2v-1.3b); the toy takes --caption")
    try:
        main_toy(args, overrides, device)
    except (OSError, ValueError) as e:
        cli.remove_if_empty(getattr(args, "made", []))
        cli.fail(str(e).splitlines()[0])
    except BaseException:
        cli.remove_if_empty(getattr(args, "made", []))
        raise


# ----------------------------------------------------------------------------------------------------------------
# the toy: checkpoint(s) -> rollouts of held-out clips (or of a caption) -> GIF, MP4, contact sheet, frames.npz
# ----------------------------------------------------------------------------------------------------------------

def main_toy(args, overrides, device):
    ckpts = [args.ckpt or "runs/toy/latest"] + (args.compare or [])
    args.num = 4 if args.num is None else args.num
    args.frames = 24 if args.frames is None else args.frames
    if args.compare and args.routing_plot:
        raise ValueError("--routing_plot draws one checkpoint's routing: drop --compare")
    models = [checkpoints.load_models(c, args.ema, device, overrides) for c in ckpts]   # (dit, text_encoder, meta)
    if args.compile:
        print(UNVERIFIED_COMPILE)
        for dit, _, _ in models:
            fast_attn.compile_blocks(dit)
    cfg, fpc = models[0][0].cfg, models[0][0].cfg.frames_per_chunk
    for ckpt, (dit, _, _) in zip(ckpts[1:], models[1:]):
        if (dit.cfg.frames_per_chunk, dit.cfg.frame_size, dit.cfg.in_dim) != (fpc, cfg.frame_size, cfg.in_dim):
            raise ValueError(f"--compare {ckpt} makes other videos (chunk, frame size or channels) than {ckpts[0]}")
    if args.routing_plot and not cfg.routed:
        raise ValueError("--routing_plot needs a checkpoint with history routing (config top_k or window); "
                         "this one is dense")
    if args.routing_plot and args.no_cache:   # recomputing the whole sequence would count every chunk's queries
        raise ValueError("--routing_plot counts the last chunk's routing in cached sampling: drop --no_cache")
    captions, truth, prefix_frames = toy_inputs(args, fpc)
    out = output_folder(args, ckpts)
    videos = []
    for ckpt, (dit, text_encoder, meta) in zip(ckpts, models):
        print(f"checkpoint {ckpt} (step {meta['step']}, {trained_with(meta)}), "
              f"{'EMA' if args.ema else 'online'} weights, seed {args.seed}, device {device}")
        prefix = truth[:, :prefix_frames].to(device) if prefix_frames else None
        videos.append(media.to_uint8(rollout(dit, text_encoder, captions, prefix, args, device)))
    names = column_names(ckpts, models) if args.compare else ["generated"]
    train_frames = models[0][2].get("train", {}).get("clip_frames")
    write_toy(out, videos, truth, names, captions, args, prefix_frames, train_frames)


def toy_inputs(args, fpc):
    """-> (captions, truth (N, F, 3, H, W) in [-1, 1] or None, prefix frames) for --caption or the test clips."""
    prefix_frames = args.prefix_frames if args.prefix_frames is not None else (0 if args.caption is not None else fpc)
    for name, n in (("--frames", args.frames), ("--prefix_frames", prefix_frames)):
        if n % fpc:
            raise ValueError(f"{name} {n} is not a multiple of the chunk ({fpc} frames): use {n - n % fpc or fpc}")
    if args.caption is not None:
        if prefix_frames:
            raise ValueError(f"--prefix_frames {prefix_frames} continues test clips, and --caption draws new videos "
                             f"from the caption alone: drop one of the two")
        if not args.caption.strip():
            print('note: --caption is empty: the videos are unconditional (shapes of the model\'s choosing); give '
                  'one like --caption "red circle, blue square", or drop --caption to continue test-set clips')
        return [args.caption] * args.num, None, 0
    test = shapes.load_dataset(args.test_data)
    if args.frames > test["frames"].shape[1]:
        print(f"note: test clips have {test['frames'].shape[1]} frames; truth shown up to there")
    return test["captions"][:args.num], media.from_uint8(test["frames"][:args.num]), prefix_frames


def output_folder(args, ckpts):
    """--out; else the run's samples/ for a checkpoint of a train.py run (OUT/latest, OUT/step_N), else
    runs/samples/<checkpoint folder name> (never beside a shipped checkpoint, inside the repository); runs/compare
    with --compare. Says where, and when it replaces samples already there."""
    if args.out:
        out = Path(args.out)
    elif args.compare:
        out = Path("runs/compare")
    else:
        ckpt = Path(ckpts[0])
        in_run = ckpt.name == "latest" or re.fullmatch(r"step_\d+", ckpt.resolve().name)
        out = ckpt.resolve().parent / "samples" if in_run else Path("runs/samples") / ckpt.resolve().name
        print(f"samples go to {out} (pass --out to write elsewhere)")
    if (out / "samples.gif").exists():
        print(f"note: replacing the samples in {out} (pass --out to write elsewhere)")
    args.made = cli.new_folders(out)                  # removed again if sampling fails before writing anything
    out.mkdir(parents=True, exist_ok=True)
    return out


def trained_with(meta) -> str:
    """The stage a checkpoint was saved in, for a reader: a checkpoint saved during the teacher-forcing warm-up is
    teacher forcing, whatever --degrade the run would have switched to later."""
    degrade = meta["config"]["degrade"]
    if meta.get("stage") == "teacher_forcing" and degrade != "none":
        warmup = meta.get("train", {}).get("warmup_steps")
        return "teacher forcing: saved during the warm-up" + (f" (--degrade {degrade} starts at step {warmup})"
                                                              if warmup else "")
    return f"{method_label(meta)}: degrade {degrade}"


def column_names(ckpts, models) -> list:
    """One name per --compare column: the method (method_label). Different checkpoints with the same name are told
    apart by their size where it differs ("teacher forcing (2 layers)"), else by their folder; the same checkpoint
    twice keeps one name."""
    names = [method_label(meta, dit.cfg) for dit, _, meta in models]
    folders = [Path(c).resolve() for c in ckpts]

    def clashes(names):
        return {i for i, n in enumerate(names)
                if any(m == n and folders[j] != folders[i] for j, m in enumerate(names))}

    clash = clashes(names)
    if not clash:
        return names
    sizes = [f for f in ("num_layers", "dim", "num_heads", "ffn_dim")
             if len({getattr(models[i][0].cfg, f) for i in clash}) > 1]
    words = dict(num_layers="layers", dim="wide", num_heads="heads", ffn_dim="FFN")

    def size(i):
        return ", ".join(f"{getattr(models[i][0].cfg, f)} {words[f]}" for f in sizes)

    for describe in ((size,) if sizes else ()) + (lambda i: Path(ckpts[i]).name, lambda i: str(ckpts[i])):
        named = [f"{n} ({describe(i)})" if i in clash else n for i, n in enumerate(names)]
        if not clashes(named):
            break
    return named


def method_label(meta, sampling=None) -> str:
    """What a toy checkpoint was trained with, from its meta: "teacher forcing", "RF s=0.6", "RF s=0.6 top-2", ...
    sampling: the Config it samples with, whose routing (given now, e.g. --window 3) is the one named."""
    cfg = dict(meta["config"])
    if sampling is not None:
        cfg.update({name: getattr(sampling, name) for name in checkpoints.ROUTING_FIELDS})
    if meta.get("stage") == "teacher_forcing" or cfg["degrade"] == "none":
        label = "teacher forcing"
    else:
        label = {"autoregressive": "RF", "parallel": "parallel resampling", "noise": "noise augmentation"}[
            cfg["degrade"]] + (f" s={cfg['resample_shift']:g}" if cfg["degrade"] != "noise" else "")
    routing = (f" top-{cfg['top_k']}" if cfg.get("top_k") else "") + (f" window {cfg['window']}"
                                                                       if cfg.get("window") else "")
    return label + routing


def rollout(dit, text_encoder, captions, prefix, args, device):
    """One checkpoint's videos (N, F, 3, H, W) in [-1, 1]: rf.generate, chunk by chunk, with a progress bar."""
    fpc = dit.cfg.frames_per_chunk
    context, neg_context = text_encoder.contexts(captions)
    P = 0 if prefix is None else prefix.shape[1]
    bar = cli.progress(total=(args.frames - P) // fpc, desc="chunks", dynamic_ncols=True)

    def progress(i):                               # called after chunk i is finished (and written to the cache)
        bar.update()
        if args.routing_plot and i < args.frames // fpc - 1:         # count afresh: the last chunk's routing stays
            dit.routing_log = media.RoutingLog()

    dit.routing_log = media.RoutingLog() if args.routing_plot else None
    with cli.autocast(device):
        video = rf.generate(dit, context, args.frames, steps=args.steps, shift=args.shift, cfg_scale=args.cfg,
                            neg_context=neg_context, prefix=prefix, seed=args.seed, use_cache=not args.no_cache,
                            progress=progress)
    bar.close()
    if args.routing_plot:
        media.save_routing_plot(dit.routing_log, args.routing_plot, dit.cfg)
        print(f"wrote {args.routing_plot} (routing sparsity {dit.routing_log.sparsity():.0%} on the last chunk)")
        dit.routing_log = None
    return video


def write_toy(out, videos, truth, names, captions, args, prefix_frames, train_frames):
    """truth | each model, one row per clip -> samples.gif (a red bar past the training length), samples.mp4,
    contact_sheet.png, and with --save_frames frames.npz."""
    columns = [list(v) for v in videos]                   # per checkpoint: its videos, one per clip
    arrays = {}
    if truth is not None:                                 # truth | generated (| compared), one row per clip
        tru = media.to_uint8(truth[:, :args.frames])
        arrays["truth"] = tru
        if tru.shape[1] < args.frames:                    # past the end of the test clip: blank truth
            tru = np.concatenate([tru, np.full_like(videos[0][:, tru.shape[1]:], 255)], axis=1)
        columns, names = [list(tru)] + columns, ["truth"] + names
    rows = [list(row) for row in zip(*columns)]
    labels = [f"{name}: {c}" if j == 0 else name for c in captions for j, name in enumerate(names)]
    frames = media.grid_frames(rows, titles=names if args.compare else None)
    media.save_gif(frames, out / "samples.gif", boundary=train_frames)
    wrote_mp4 = media.save_mp4(frames, out / "samples.mp4")
    media.save_contact_sheet([v for row in rows for v in row], labels, out / "contact_sheet.png", boundary=train_frames)
    if args.save_frames:
        arrays |= {name: v for name, v in zip(names[-len(videos):], videos)}
        np.savez_compressed(out / "frames.npz", **arrays)
    print(f"wrote {out / 'samples.gif'}{', samples.mp4' if wrote_mp4 else ''}, contact_sheet.png"
          f"{', frames.npz' if args.save_frames else ''} ({args.num} videos x {args.frames} frames, "
          f"{prefix_frames} prefix frames" + (f"; columns: {' | '.join(names)})" if args.compare else ")"))


# ----------------------------------------------------------------------------------------------------------------
# Wan2.1: prompt -> umT5 features -> chunk-by-chunk latents -> VAE, frame by frame -> MP4
# ----------------------------------------------------------------------------------------------------------------

def main_wan(args, overrides, device, meta):
    """Wan2.1 text-to-video: prompt -> umT5 features -> chunk-by-chunk generation -> VAE, frame by frame -> MP4."""
    if args.latents:                                           # decode only
        return decode_wan(load_latents(args.latents), args.latents, args.vae or args.wan or wan.WAN_PARTS_REPO,
                          device, Path(args.out) if args.out else Path(args.latents).parent)
    if not args.prompt:
        cli.fail('Wan samples from a prompt: pass --prompt "..."')
    if args.caption is not None or args.prefix_frames or args.no_cache or args.routing_plot:
        cli.fail("--caption, --prefix_frames, --no_cache and --routing_plot are for the toy")
    cuda = device.type == "cuda"
    if meta is not None and args.preset is None:           # a Wan model fine-tuned by train.py
        try:
            cfg = checkpoints.checkpoint_config(meta["config"], overrides, checkpoints.ROUTING_FIELDS,
                                                f"sampling {args.ckpt}")
        except ValueError as e:
            cli.fail(e)
        preset_name, fields = meta["train"]["preset"], checkpoints.config_to_dict(cfg)
        weights = Path(args.ckpt) / ("dit_ema.safetensors" if args.ema else "dit.safetensors")
        saved = checkpoints.local_paths(meta["train"])     # paths saved relative to the repository, made whole
        source = saved.get("wan") or wan.WAN_PARTS_REPO
        text_source = args.text_encoder or saved.get("text_encoder") or source
        vae_source = args.vae or saved.get("vae") or source
        out = Path(args.out) if args.out else Path(args.ckpt).resolve().parent / "samples"
    else:
        preset_name, fields = args.preset, overrides
        try:
            cfg = rf.preset(preset_name, **fields)
        except ValueError as e:
            cli.fail(f"{e}")
        weights = source = args.wan or wan.WAN_PARTS_REPO
        text_source, vae_source = args.text_encoder or source, args.vae or source
        out = Path(args.out) if args.out else Path("runs/samples/wan")
    frames, num = args.frames or 81, args.num or 1
    height, width = args.height or 8 * cfg.frame_size[0], args.width or 8 * cfg.frame_size[1]
    step = 8 * cfg.patch_size[1]                              # the VAE's 8 x the patch's 2
    if height % step or width % step:
        cli.fail(f"{height}x{width}: height and width must be multiples of {step} (VAE stride 8 x patch "
                 f"{cfg.patch_size[1]}), e.g. 480x832 or 240x416")
    try:
        num_latent = wan.latent_frames(frames, cfg.frames_per_chunk)
    except ValueError as e:
        cli.fail(f"--frames {e}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"Wan2.1 text-to-video: {weights}; {frames} frames ({num_latent} latent frames, "
          f"{num_latent // cfg.frames_per_chunk} chunks) at {height}x{width}; seed {args.seed}, device {device}"
          + (f"; routing top_k={cfg.top_k} window={cfg.window} sink={cfg.sink}" if cfg.routed else ""))

    def free(*modules):
        for m in modules:
            m.to("meta")                                       # drops the weights' memory at once
        if cuda:
            torch.cuda.empty_cache()

    try:
        # 1. the prompts' features; the text encoder is then dropped, so it never shares the GPU with the DiT
        text_device = "cpu" if args.offload else device
        tokenizer, encoder = wan.load_wan_text_encoder(text_source, torch.bfloat16 if cuda else torch.float32,
                                                      text_device)
        context, _ = wan.encode_prompts(tokenizer, encoder, [args.prompt] * num, cfg.text_len)
        neg_context, _ = wan.encode_prompts(tokenizer, encoder, [args.negative_prompt], cfg.text_len)
        free(encoder)
        # 2. the latents, chunk by chunk (bf16 on CUDA: fp32 islands, bf16 matmuls, as train.py trains)
        dit = wan.load_wan(weights, torch.bfloat16 if cuda else torch.float32, device, preset_name, **fields).eval()
        if args.compile:
            print(UNVERIFIED_COMPILE)
            fast_attn.compile_blocks(dit)
        bar = cli.progress(total=num_latent // cfg.frames_per_chunk, desc="chunks", dynamic_ncols=True)
        with cli.autocast(device):
            latents = rf.generate(dit, context.to(device), num_latent, steps=args.steps, shift=args.shift,
                                  cfg_scale=args.cfg, neg_context=neg_context.to(device),
                                  size=(height // 8, width // 8), seed=args.seed, progress=lambda i: bar.update())
        bar.close()
        free(dit)
    except (OSError, ValueError, ImportError) as e:
        cli.fail(f"{e}")
    # saved before decoding: if the VAE fails, --latents decodes them without generating them again
    from safetensors.torch import save_file
    latents_file = out / f"wan_seed{args.seed}_latents.safetensors"
    save_file({"latents": latents.float().cpu().contiguous()}, latents_file)
    decode_wan(latents, latents_file, vae_source, device, out)


def load_latents(path):
    """(num, latent frames, channels, h, w) from a file main_wan saved."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path)["latents"]
    except (OSError, KeyError, SafetensorError) as e:
        cli.fail(f"cannot read latents from {path} ({type(e).__name__}): pass a wan_seedN_latents.safetensors "
                 f"that sample.py wrote")


def decode_wan(latents, latents_file, vae_source, device, out):
    """Pixels: the VAE decodes one latent frame at a time, straight into one MP4 per video (named after the file)."""
    import imageio.v2 as imageio
    num, num_latent, channels, h, w = latents.shape
    try:
        vae = wan.load_wan_vae(vae_source, device)
    except (OSError, ValueError, ImportError) as e:
        cli.fail(f"{e}; the latents are saved: decode them alone with --latents {latents_file}")
    if vae.config.z_dim != channels:
        cli.fail(f"the VAE in {vae_source} has {vae.config.z_dim} latent channels, the latents {channels}")
    temporal, spatial = wan.vae_strides(vae)
    frames, height, width = 1 + temporal * (num_latent - 1), spatial * h, spatial * w
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(latents_file).name.removesuffix("_latents.safetensors")
    for i in range(num):
        path = out / f"{stem}_{i}.mp4"
        with imageio.get_writer(path, fps=wan.WAN_FPS, macro_block_size=16) as writer:
            for pixels in cli.progress(wan.vae_decode_chunks(vae, latents[i:i + 1]), total=num_latent,
                                       desc=f"decode {path.name}", dynamic_ncols=True):
                for frame in media.to_uint8(pixels)[0]:
                    writer.append_data(frame)
        print(f"wrote {path} ({frames} frames, {height}x{width}, {wan.WAN_FPS} fps)")


if __name__ == "__main__":
    with cli.parts_written("sample.py"):
        main()
