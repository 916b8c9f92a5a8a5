"""
wan.py -- Wan2.1's files: the DiT's weights in both key layouts, umT5 and the VAE, latent helpers, a memory estimate.

Our module names are those of Wan's own checkpoint (Wan-AI/Wan2.1-T2V-1.3B), so loading it into rf.DiT is a
key-for-key copy. diffusers' WanTransformer3DModel (Wan-AI/Wan2.1-T2V-1.3B-Diffusers) holds the same tensors under
other names: a pure rename (every tensor has the same shape and values in both; no transpose, split or reshape),
as the tables below spell out and tests/test_wan_loading.py checks. Both hubs store fp32 (5.7 GB). The text encoder
(umT5) and the VAE are not re-implemented: transformers' and diffusers' classes, read from the diffusers layout of
the Wan repo and imported only when used.
"""

import html
import importlib
import json
import os
from pathlib import Path

import torch
from einops import rearrange

from checkpoints import check_state_keys
from rf import DiT, ROPE_LEN, Config, preset


# --- key names: Wan's and diffusers' -----------------------------------------------------------------------------

# Module names, Wan -> diffusers. A key is a module name + ".weight" / ".bias", or the name of a bare parameter.
WAN_TO_DIFFUSERS = {
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "head.modulation": "scale_shift_table",                    # (1, 2, D): the head's shift, scale
    "head.head": "proj_out",
}                                                              # patch_embedding: the same name in both
WAN_TO_DIFFUSERS_BLOCK = {                                     # inside blocks.{i}.
    "modulation": "scale_shift_table",                         # (1, 6, D), same order in both
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",       # the affine cross-attention LayerNorm is Wan's norm3 and diffusers' norm2 ...
    "norm2": "norm3",       # ... a swap (the FFN's norm has no parameters in either, but the rename must invert)
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
}
DIFFUSERS_TO_WAN = {v: k for k, v in WAN_TO_DIFFUSERS.items()}
DIFFUSERS_TO_WAN_BLOCK = {v: k for k, v in WAN_TO_DIFFUSERS_BLOCK.items()}
SINGLE_FILE_PREFIX = "model.diffusion_model."   # some single-file exports (ComfyUI) put Wan's keys under it
DIT_WEIGHTS = "diffusion_pytorch_model.safetensors"   # the DiT's file name in both hub layouts
DIT_HUB_FILES = ["config.json", "diffusion_pytorch_model*.safetensors*",                  # original layout
                 "transformer/config.json", "transformer/diffusion_pytorch_model*.safetensors*"]  # diffusers


def _rename(key, top, block):
    """Rename one key by its module: [blocks.{i}.]{module}[.weight|.bias]. A module not in the table keeps its name,
    so a stray key reaches the strict check below and is named there as unexpected."""
    prefix, rest, table = "", key, top
    if key.startswith("blocks.") and key.count(".") >= 2:
        i, rest = key[len("blocks."):].split(".", 1)
        prefix, table = f"blocks.{i}.", block
    module, dot, leaf = rest.rpartition(".")
    if leaf not in ("weight", "bias"):                        # a bare parameter: modulation, scale_shift_table
        module, dot, leaf = rest, "", ""
    return prefix + table.get(module, module) + dot + leaf


def diffusers_to_wan_key(name: str) -> str:
    """diffusers' key -> Wan's, e.g. blocks.0.attn2.to_out.0.weight -> blocks.0.cross_attn.o.weight."""
    return _rename(name, DIFFUSERS_TO_WAN, DIFFUSERS_TO_WAN_BLOCK)


def wan_to_diffusers_key(name: str) -> str:
    """Wan's key -> diffusers', e.g. blocks.0.norm3.weight -> blocks.0.norm2.weight."""
    return _rename(name, WAN_TO_DIFFUSERS, WAN_TO_DIFFUSERS_BLOCK)


def _is_diffusers_key(name):
    return (name.startswith(("condition_embedder.", "proj_out.", "scale_shift_table"))
            or ".attn1." in name or ".attn2." in name or name.endswith(".scale_shift_table"))


def wan_key_names(keys):
    """A checkpoint's keys -> ({file key: our key}, layout "original" | "diffusers").

    Strips a leading `model.diffusion_model.` (as diffusers' single-file loader does) and renames diffusers keys.
    The layout is decided once per checkpoint, never per key: norm2 and norm3 name different modules in the two."""
    stripped = {k: k.removeprefix(SINGLE_FILE_PREFIX) for k in keys}
    diffusers = any(_is_diffusers_key(k) for k in stripped.values())
    names = {k: diffusers_to_wan_key(s) if diffusers else s for k, s in stripped.items()}
    seen, twice = set(), set()
    for n in names.values():
        (twice if n in seen else seen).add(n)
    if twice:                                          # e.g. a file holding both layouts: one would be dropped
        raise ValueError(f"several keys of the checkpoint map to the same name ({', '.join(sorted(twice)[:5])}): "
                         f"it mixes the original and the diffusers layouts")
    return names, "diffusers" if diffusers else "original"


def keeps_fp32(name: str) -> bool:
    """Parameters of Wan's fp32 islands: time embedding and projection, modulation tables, the affine cross-attention
    norm and the head. The DiT's forward runs these with autocast off on fp32 inputs, so they must be fp32."""
    return (name.startswith(("time_embedding.", "time_projection.", "head."))
            or name.endswith("modulation") or ".norm3." in name)


def _param_dtype(name, dtype):
    # NOTE(choice): "everything in dtype" would be simplest, but the fp32 islands of rf.py's DiT feed fp32 inputs to
    # these layers with autocast off, and would fail on bf16 weights. So with a 16-bit dtype they stay fp32, like
    # diffusers' _keep_in_fp32_modules; they are ~17M of the 1.3B parameters. The rest runs under bf16 autocast.
    return torch.float32 if dtype.is_floating_point and dtype.itemsize < 4 and keeps_fp32(name) else dtype


# --- where the weights are --------------------------------------------------------------------------------------

def _dit_files(folder: Path):
    """The DiT weight files of a folder: one file, or the shards its diffusers index lists."""
    index = folder / (DIT_WEIGHTS + ".index.json")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {', '.join(missing)}: the download is "
                                    f"incomplete; fetch the folder again")
        return [folder / s for s in shards]
    if (folder / DIT_WEIGHTS).is_file():
        return [folder / DIT_WEIGHTS]
    raise FileNotFoundError(f"no DiT weights in {folder}: expected {DIT_WEIGHTS} (original layout, or diffusers' "
                            f"transformer/ folder), its shards with {index.name}, or a transformer/ subfolder")


def _is_repo_id(source: str) -> bool:
    """owner/name, as on the hub (a path that does not exist may look like one: the error then says both)."""
    parts = source.split("/")
    ok = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return len(parts) == 2 and all(p and set(p) <= ok and not p.startswith(".") for p in parts)


def _download(repo_id: str, patterns=DIT_HUB_FILES) -> Path:
    """Fetch only the files of a hub repo that match `patterns` (default: the DiT's weights and config), with
    huggingface_hub's progress bars and cache. Offline: one line with the command that downloads the whole model
    folder and the option that takes it."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import RepositoryNotFoundError
    except ImportError:
        raise ImportError(f"{repo_id!r} is not a local path, and fetching it from the hub needs huggingface_hub: "
                          f"pip install huggingface_hub") from None
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; reading it here too honours it when it is set later
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=offline))
    except RepositoryNotFoundError:
        raise ValueError(f"{repo_id!r} is neither a local path nor a model on the Hugging Face Hub (if it is private, "
                         f"log in with `hf auth login`)") from None
    except Exception as e:                 # offline, no connection, a hub error: huggingface_hub has many types
        why = ("HF_HUB_OFFLINE is set and it is not in the local cache" if offline
               else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}")
        name = repo_id.split("/")[1]
        raise ConnectionError(
            f"could not reach the Hugging Face Hub for {repo_id!r} ({why}), and there is no local path of that name. "
            f"Download the whole model where there is internet (hf download {repo_id} --local-dir {name}) and pass "
            f"that folder: --wan {name} (train.py, sample.py) or wan.load_wan('{name}')") from None


def find_wan_files(source):
    """-> (weight files, their config.json or None). source: a weights file, a folder in either layout (for
    diffusers: the repo root or its transformer/ folder), or a hub repo id (owner/name)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise ValueError(f"{path}: expected a .safetensors, .pth, .pt or .bin weights file, or a folder")
        return [path], None           # a lone file: a config.json beside it need not be its own, so none is read
    if not path.is_dir() and _is_repo_id(str(source)):
        path = _download(str(source))
    if not path.is_dir():
        raise FileNotFoundError(f"no file or folder {path}, and {str(source)!r} is not a hub repo id (owner/name)")
    if (path / "transformer").is_dir():                       # the diffusers repo root
        path = path / "transformer"
    config = path / "config.json"
    return _dit_files(path), config if config.is_file() else None


# --- the config beside the weights -----------------------------------------------------------------------------

WAN_CONFIG_FIELDS = ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "text_len", "text_dim", "in_dim",
                     "out_dim", "patch_size", "eps")                  # Wan's config.json uses our field names
DIFFUSERS_CONFIG_FIELDS = {"num_attention_heads": "num_heads", "ffn_dim": "ffn_dim", "num_layers": "num_layers",
                           "in_channels": "in_dim", "out_channels": "out_dim", "text_dim": "text_dim",
                           "freq_dim": "freq_dim", "patch_size": "patch_size", "eps": "eps"}
# settings our DiT has no switch for: Wan2.1 text-to-video, as Wan's and diffusers' configs spell them
WAN_FIXED = {"model_type": "t2v", "qk_norm": True, "cross_attn_norm": True, "window_size": (-1, -1)}
DIFFUSERS_FIXED = {"qk_norm": "rms_norm_across_heads", "cross_attn_norm": True, "image_dim": None,
                   "added_kv_proj_dim": None, "rope_max_seq_len": ROPE_LEN, "pos_embed_seq_len": None}


def diffusers_wan_config(cfg: Config) -> dict:
    """cfg as the keyword arguments of diffusers' WanTransformer3DModel (the same model, its field names)."""
    return dict(patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
                attention_head_dim=cfg.dim // cfg.num_heads, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
                text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
                eps=cfg.eps)


def check_wan_config(raw: dict, cfg: Config, where="config.json"):
    """A checkpoint's config.json (Wan's or diffusers' field names) against cfg; a ValueError names every field
    that disagrees. Fields the file does not have are not checked (the key and shape check still is)."""
    def same(a, b):
        return (tuple(a) if isinstance(a, list) else a) == (tuple(b) if isinstance(b, list) else b)

    if "num_attention_heads" in raw:                                  # diffusers
        ours = {f: (o, getattr(cfg, o)) for f, o in DIFFUSERS_CONFIG_FIELDS.items()}
        ours["attention_head_dim"] = ("dim/num_heads", cfg.dim // cfg.num_heads)
        fixed = DIFFUSERS_FIXED
    else:
        ours, fixed = {f: (f, getattr(cfg, f)) for f in WAN_CONFIG_FIELDS}, WAN_FIXED
    wrong = [f"{f}={raw[f]!r} (model: {o}={v!r})" for f, (o, v) in ours.items() if f in raw and not same(raw[f], v)]
    unsupported = [f"{f}={raw[f]!r} (rf has only {v!r})" for f, v in fixed.items() if f in raw and not same(raw[f], v)]
    if wrong or unsupported:
        raise ValueError(f"{where} disagrees with the model being built: {'; '.join(wrong + unsupported)}. "
                         + ("Pass the checkpoint's sizes as overrides, e.g. load_wan(source, num_layers=...), or use "
                            "the checkpoint of the preset's model." if wrong else
                            "rf implements the Wan2.1 text-to-video DiT only."))


# --- reading tensors --------------------------------------------------------------------------------------------

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _torch_load(path):
    """A .pth / .pt / .bin state dict, read safely."""
    # safe loading: weights_only=True rebuilds tensors and plain containers only, never arbitrary pickled objects,
    # so a file from the internet cannot run code; mmap=True maps the file instead of reading it all into memory
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a plain state dict that loads with weights_only=True ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); rf never unpickles arbitrary objects: re-save it "
                         f"with torch.save(model.state_dict(), path) or as safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return state


def tensor_index(files, device, stack):
    """{key: (shape, file dtype, load)} from the file headers: nothing is read yet; load() reads one tensor onto
    device. stack: a contextlib.ExitStack that keeps the safetensors files open until the caller is done."""
    from safetensors import safe_open
    index = {}
    for path in files:
        if path.suffix == ".safetensors":
            f = stack.enter_context(safe_open(str(path), framework="pt", device=str(device)))
            part = {}
            for k in f.keys():
                s = f.get_slice(k)
                part[k] = (tuple(s.get_shape()), SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype()),
                           lambda f=f, k=k: f.get_tensor(k))
        else:
            part = {k: (tuple(v.shape), v.dtype, lambda v=v: v.to(device)) for k, v in _torch_load(path).items()}
        twice = sorted(index.keys() & part.keys())
        if twice:
            raise ValueError(f"{path} repeats keys of another shard ({', '.join(twice[:5])})")
        index.update(part)
    return index


def load_wan(source, dtype=torch.bfloat16, device="cpu", preset_name="wan2.1-t2v-1.3b", **config_overrides) -> DiT:
    """Wan2.1's DiT weights -> our DiT on `device`, parameters in `dtype` (the fp32 islands' in fp32, below).

    source: a weights file (.safetensors in either layout, or a .pth / .pt / .bin state dict); a folder in the
    original layout (diffusion_pytorch_model.safetensors + config.json) or the diffusers layout (the repo root or
    its transformer/ folder, one file or shards + index); or a hub repo id (Wan-AI/Wan2.1-T2V-1.3B,
    Wan-AI/Wan2.1-T2V-1.3B-Diffusers), of which only the DiT's files are downloaded.
    The model is preset(preset_name, **config_overrides). A config.json beside the weights must agree with it, and
    the checkpoint must hold exactly its keys and shapes: both are checked before a single tensor is read.
    With a 16-bit dtype, run the model under torch.autocast(device_type, dtype=dtype)."""
    from contextlib import ExitStack
    cfg = preset(preset_name, **config_overrides)
    device = torch.device(device)
    files, config_json = find_wan_files(source)
    if config_json is not None:
        check_wan_config(json.loads(config_json.read_text()), cfg, where=str(config_json))
    with torch.device("meta"):
        model = DiT(cfg)                                      # shapes only: no memory, no init
    with ExitStack() as stack:
        index = tensor_index(files, device, stack)
        # Wan's checkpoints are fp32; bf16 / fp16 files load as well. fp8 / int files are quantised: their scales
        # live in other keys, and a plain cast would give wrong weights.
        odd = sorted({(str(dt), k) for k, (_, dt, _) in index.items() if dt not in SAFETENSORS_DTYPES.values()})
        if odd:
            raise ValueError(f"{source} holds {odd[0][0]} tensors (e.g. {odd[0][1]}): quantised checkpoints are not "
                             f"supported; use Wan's fp32 (or a bf16 / fp16) checkpoint")
        names, layout = wan_key_names(index)
        renamed = ", keys renamed to Wan's" if layout == "diffusers" else ""
        check_state_keys({k: v.shape for k, v in model.state_dict().items()},
                         {names[k]: shape for k, (shape, _, _) in index.items()},
                         what=f"the weights in {source} ({layout} layout{renamed})",
                         hint=f"Pass the preset ({preset_name}) and overrides of the model these weights are for.")
        # tensor by tensor, cast on the way: peak memory ~ one copy of the weights in the target dtype. (On the CPU
        # in the file's own dtype there is no copy at all: safetensors maps the file, copy-on-write.)
        state = {names[k]: load().to(device=device, dtype=_param_dtype(names[k], dtype))
                 for k, (_, _, load) in index.items()}
    model.load_state_dict(state, strict=True, assign=True)    # the meta parameters are replaced by these tensors
    left_on_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left_on_meta:
        raise RuntimeError(f"load_wan left {left_on_meta[:3]} on the meta device: a bug in rf.py")
    in_file = "/".join(sorted({str(dt).removeprefix("torch.") for _, dt, _ in index.values()}))
    print(f"load_wan: {sum(p.numel() for p in model.parameters()):,} parameters from {source} ({layout} layout, "
          f"{in_file} in the file) -> {str(dtype).removeprefix('torch.')} on {device}"
          + (" (fp32 islands in float32)" if dtype.itemsize < 4 else ""))
    return model


# --- the text encoder and the VAE --------------------------------------------------------------------------------
# Not re-implemented here: transformers' UMT5EncoderModel with its tokenizer, and diffusers' AutoencoderKLWan, read
# from the diffusers layout of the Wan repo (tokenizer/, text_encoder/, vae/). Imported only when used.

WAN_PARTS_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"      # the repo that has all of them in the diffusers layout
WAN_FPS = 16                                             # Wan's sample_fps: the frame rate it was trained on
WAN_NEGATIVE_PROMPT = (                                  # Wan's sample_neg_prompt: CFG's unconditional prompt
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走")
WAN_PART_FILES = {"tokenizer": "tokenizer_config.json", "text_encoder": "config.json", "vae": "config.json"}


def _need(module):
    """Import a package only the Wan path needs, or stop with the one line that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the Wan text encoder and VAE need {module}: pip install transformers 'diffusers>=0.35'"
                          ) from None


def wan_part(source, part) -> Path:
    """The folder of one part (tokenizer, text_encoder or vae) of a Wan model in the diffusers layout. source: the
    repo root (a local folder, or a hub id of which only that part is downloaded), or the part's own folder."""
    path = Path(source).expanduser()
    if not path.exists() and _is_repo_id(str(source)):
        path = _download(str(source), [f"{part}/*"])
    for folder in (path / part, path):
        if (folder / WAN_PART_FILES[part]).is_file():
            return folder
    raise FileNotFoundError(f"no {part}/ folder (with {WAN_PART_FILES[part]}) in {source}: the text encoder and the "
                            f"VAE load from the diffusers layout of Wan, e.g. {WAN_PARTS_REPO} or a local copy of it")


def load_wan_text_encoder(source, dtype=torch.float32, device="cpu"):
    """-> (tokenizer, umT5 encoder), frozen, from tokenizer/ and text_encoder/ of a Wan repo in the diffusers layout.
    Wan runs umT5 in bf16 on the GPU; on the CPU keep fp32."""
    transformers = _need("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(wan_part(source, "tokenizer"))
    encoder = transformers.UMT5EncoderModel.from_pretrained(wan_part(source, "text_encoder"), dtype=dtype)
    return tokenizer, encoder.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_prompts(tokenizer, encoder, prompts, text_len):
    """Prompts -> Wan's text features (B, text_len, text_dim) in fp32, and each prompt's real token count (B,).

    Wan's recipe: tidy the text, tokenize with EOS and truncation at text_len, run umT5 with the padding masked, keep
    the real tokens' features (EOS included) and zero-pad them to text_len. Tokens are padded on the right, so
    zeroing the padded rows is the trim and the pad in one."""
    # NOTE(choice): Wan also runs ftfy.fix_text (it repairs mis-decoded unicode); we skip it, to need one package less.
    prompts = [" ".join(html.unescape(html.unescape(p)).split()) for p in prompts]   # Wan's whitespace_clean
    tokenizer.padding_side = "right"
    tokens = tokenizer(prompts, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                       return_attention_mask=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    mask = tokens.attention_mask.to(device)                                            # (B, text_len) 1 = real
    features = encoder(tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    return (features * mask[..., None]).float(), mask.sum(1).cpu()                     # (B, text_len, text_dim)


def load_wan_vae(source, device="cpu"):
    """diffusers' AutoencoderKLWan from vae/ of a Wan repo in the diffusers layout, frozen, in fp32 (as diffusers
    recommends for this VAE)."""
    diffusers = _need("diffusers")
    vae = diffusers.AutoencoderKLWan.from_pretrained(wan_part(source, "vae"), torch_dtype=torch.float32,
                                                     low_cpu_mem_usage=False)    # 0.5 GB: no need for accelerate
    if getattr(vae.config, "patch_size", None):
        raise ValueError(f"the VAE in {source} patchifies its input (Wan2.2's): rf supports Wan2.1's VAE")
    return vae.to(device).eval().requires_grad_(False)


def vae_strides(vae):
    """(temporal, spatial) compression of the VAE: (4, 8) for Wan2.1."""
    config = vae.config
    return getattr(config, "scale_factor_temporal", None) or 4, getattr(config, "scale_factor_spatial", None) or 8


def latent_frames(frames, frames_per_chunk, temporal=4):
    """Video frames -> latent frames. The VAE makes 1 + k latent frames of 1 + 4k video frames (81 -> 21), and the
    DiT wants whole chunks of latent frames. A ValueError that names the nearest valid count otherwise."""
    ok = [1 + temporal * (n - 1) for n in range(frames_per_chunk, ROPE_LEN + 1, frames_per_chunk)]
    if frames not in ok:
        near = min(ok, key=lambda f: abs(f - frames))
        raise ValueError(f"{frames} frames: Wan's VAE takes 1 + {temporal}k frames (giving 1 + k latent frames) and "
                         f"the model whole chunks of {frames_per_chunk} latent frames, i.e. {ok[0]}, {ok[1]}, "
                         f"{ok[2]}, ... frames: use {near}")
    return 1 + (frames - 1) // temporal


def _latent_stats(vae, like):
    """Wan's per-channel latent mean and std, shaped to broadcast over (B, F, C, H, W)."""
    mean, std = (torch.tensor(getattr(vae.config, n), dtype=like.dtype, device=like.device).view(1, 1, -1, 1, 1)
                 for n in ("latents_mean", "latents_std"))
    return mean, std


@torch.no_grad()
def vae_encode(vae, video):
    """video (B, T, 3, H, W) in [-1, 1], T = 1 + 4k -> Wan latents (B, 1 + k, C, H/8, W/8), normalised per channel
    with Wan's mean and std. (diffusers' VAE does not normalise; WanPipeline does it outside, as here.)"""
    x = rearrange(video, "b t c h w -> b c t h w").to(vae.device, vae.dtype)
    mu = vae.encode(x).latent_dist.mean                    # only the mean, as Wan does
    z = rearrange(mu, "b c f h w -> b f c h w").float()
    mean, std = _latent_stats(vae, z)
    return (z - mean) / std


@torch.no_grad()
def vae_decode_chunks(vae, latents):
    """Normalised latents (B, F, C, h, w) -> video frames in [-1, 1], yielded one latent frame at a time: (B, 1, 3,
    H, W) for the first, (B, 4, 3, H, W) for each later one.

    This is diffusers' own decode loop (AutoencoderKLWan._decode) with the loop turned inside out: its causal
    decoder takes one latent frame per call and keeps the last frames each causal convolution needs in a feature
    cache, so memory stays that of one latent frame however long the video, and the frames equal vae.decode's."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    mean, std = _latent_stats(vae, latents)
    z = rearrange(latents.float() * std + mean, "b f c h w -> b c f h w").to(vae.device, vae.dtype)
    cache = [None] * sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())   # one slot per conv
    for i in range(z.shape[2]):
        x = vae.post_quant_conv(z[:, :, i:i + 1])                       # a 1x1x1 conv: frame by frame is exact
        out = vae.decoder(x, feat_cache=cache, feat_idx=[0], first_chunk=i == 0)       # (B, 3, 1 or 4, H, W)
        yield rearrange(out.clamp(-1, 1), "b c t h w -> b t c h w")


# --- memory, without memory ------------------------------------------------------------------------------------

def saved_bytes_per_token(cfg: Config) -> int:
    """Bytes one Block keeps for backward per token under bf16 autocast (fp32 weights, train.py's regime), with
    fused attention (flex / flash: q, k, v, output and a log-sum-exp, never the L x L scores). From the tensors the
    block's autograd graph saves (tests/test_wan_loading.py counts them and checks this):
      8 fp32 of width D:  the residual stream into norm1, norm3, norm2 (3); norm1 and norm2 outputs, kept by the
                          modulation (2); the fp32 inputs of the q/k RMSNorms (self q, self k, cross q) (3)
      16 bf16 of width D: the bf16 inputs of the self q, k, v, cross q and ffn.0 Linears (5: autocast casts per
                          call); attention q, k, v (self) and q (cross) (4); attention outputs = o's inputs (2);
                          the RMSNorm outputs (3); the self-attention and FFN outputs kept by the gates (2)
      2 bf16 of width ffn_dim: the FFN's hidden layer before and after GELU.
    Per-token scalars (norm statistics, log-sum-exp) and the text's K/V are left out: under 1%."""
    return 8 * 4 * cfg.dim + 16 * 2 * cfg.dim + 2 * 2 * cfg.ffn_dim


def check_key_layouts(model: DiT) -> list:
    """Both key layouts against the model's state dict, without weights. Returns lines for a report; raises on a
    mismatch. diffusers' WanTransformer3DModel is built on the meta device when diffusers is installed."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if {diffusers_to_wan_key(wan_to_diffusers_key(k)) for k in own} != set(own):
        raise ValueError("the Wan <-> diffusers key rename is not a bijection on the model's keys: a bug in rf.py")
    lines = [f"original: {len(own)} keys = the DiT's own module names; the rename to diffusers' names inverts"]
    try:
        from diffusers import WanTransformer3DModel
    except Exception as e:                                    # not installed, or broken: the check is optional
        return lines + [f"diffusers: not checked ({type(e).__name__}: diffusers is not importable)"]
    with torch.device("meta"):
        ref = WanTransformer3DModel(**diffusers_wan_config(model.cfg))
    theirs = {diffusers_to_wan_key(k): tuple(v.shape) for k, v in ref.state_dict().items()}
    if len(theirs) != len(ref.state_dict()):
        raise ValueError("two diffusers keys rename to one Wan key: a bug in rf.py")
    check_state_keys(own, theirs, what="diffusers' WanTransformer3DModel keys (renamed)", hint="A bug in rf.py.")
    return lines + [f"diffusers: {len(theirs)} keys of WanTransformer3DModel (built on meta) rename 1:1 onto ours, "
                    f"all shapes equal"]


def wan_memory_report(cfg: Config | None = None, height=480, width=832, frames=81, batch=1) -> str:
    """Memory estimate for sampling and for training the DiT at one video size, from the model built on the meta
    device (nothing is allocated). cfg: default preset("wan2.1-t2v-1.3b"); height, width, frames: pixels, as the VAE
    sees them (frames = 1 + 4k). Also checks both checkpoint key layouts. Returns a table to print."""
    cfg = cfg or preset("wan2.1-t2v-1.3b")
    if (frames - 1) % 4 or height % (8 * cfg.patch_size[1]) or width % (8 * cfg.patch_size[2]):
        raise ValueError(f"{height}x{width}, {frames} frames: need frames = 1 + 4k and sides divisible by "
                         f"{8 * cfg.patch_size[1]} (VAE stride 8 x patch)")
    with torch.device("meta"):
        model = DiT(cfg)
    params = {k: p.numel() for k, p in model.named_parameters()}
    P, D, layers, fpc = sum(params.values()), cfg.dim, cfg.num_layers, cfg.frames_per_chunk
    # tokens: the VAE makes 1 + (frames - 1) / 4 latent frames of (height / 8) x (width / 8); patches of 2 x 2
    F_ = 1 + (frames - 1) // 4
    S = (height // 8 // cfg.patch_size[1]) * (width // 8 // cfg.patch_size[2])                # tokens per frame
    if F_ % fpc:
        raise ValueError(f"{F_} latent frames is not a multiple of frames_per_chunk={fpc}")
    L_train = (2 * F_ - fpc) * S                   # [history ; noisy]: the last history chunk is dropped
    GiB = 2 ** 30
    w16 = sum(n * (4 if keeps_fp32(k) else 2) for k, n in params.items())        # as load_wan(dtype=bf16) gives
    out = [f"Wan2.1 DiT memory estimate, {height}x{width}, {frames} frames, batch {batch} (GiB; the DiT only: the "
           f"text encoder and the VAE are not counted)",
           f"model      {P:,} parameters in {len(params)} tensors: D={D}, {layers} layers, {cfg.num_heads} heads, "
           f"ffn {cfg.ffn_dim} (built on the meta device, nothing allocated)",
           f"tokens     {F_} latent frames of {height // 8}x{width // 8} -> {S:,} tokens per frame; {F_ * S:,} per "
           f"video; training sequence [history ; noisy] = (2 x {F_} - {fpc}) x {S:,} = {L_train:,}",
           "key layouts"] + ["           " + line for line in check_key_layouts(model)]

    def row(label, nbytes, note=""):
        out.append(f"  {label:<58} {nbytes / GiB:>8.2f}  {note}".rstrip())
        return nbytes

    out.append("weights")
    row("fp32 (as in Wan's checkpoints)", 4 * P)
    row("bf16, the fp32 islands in fp32 (load_wan's default)", w16)

    out.append(f"sampling (no grad, bf16 weights, CFG: 2 branches per video, {fpc} latent frames per chunk)")
    branches = 2 * batch
    kv = row("KV cache", layers * 2 * F_ * S * D * 2 * branches,
             f"{layers} layers x K,V x {F_ * S:,} tokens x {D} x 2 B x {branches} branches")
    text_kv = row("text K/V (cross-attention, computed once per prompt)", layers * 2 * cfg.text_len * D * 2 * branches)
    T = fpc * S * branches
    # no grad: a block's tensors die as it goes; the live set is ~ the fp32 residual stream, a few D-wide
    # temporaries and the FFN's hidden layer (a guess, small next to the cache)
    act = row("activations of one chunk forward (transient)", T * (4 * 4 * D + 2 * 2 * cfg.ffn_dim),
              f"{T:,} tokens x (4 fp32 x D + 2 bf16 x ffn_dim)")
    row("total", w16 + kv + text_kv + act)

    out.append("training (AdamW; fp32 weights under bf16 autocast, as train.py; activation checkpointing optional)")
    # NOTE(choice): train.py keeps fp32 weights (the master copy) and runs bf16 autocast. bf16 weights + an fp32
    # master copy would cost the same 16 bytes per parameter (2 + 4 master + 8 moments + 2 grad).
    state = row("weights fp32", 4 * P)
    state += row("gradients fp32", 4 * P)
    state += row("AdamW exp_avg + exp_avg_sq fp32", 8 * P)
    state += row("EMA copy fp32 (train.py's --ema)", 4 * P)
    per_layer = batch * L_train * saved_bytes_per_token(cfg)
    head = row("embeddings and head", batch * F_ * S * 3 * 4 * D, "3 fp32 x D per output token")
    full = row("activations, no checkpointing", layers * per_layer,
               f"{layers} layers x {batch * L_train:,} tokens x {saved_bytes_per_token(cfg) / 1024:.0f} KiB")
    ckpt = row("activations, checkpointing every block", layers * batch * L_train * 4 * D + per_layer,
               "each block's fp32 input + one block recomputed")
    resample = row("self-resampling KV cache (no grad, freed before the loss)",
                   layers * 2 * (F_ - fpc) * S * D * 2 * batch, f"{F_ - fpc} history frames")
    row("total, no checkpointing", state + max(head + full, resample))
    row("total, checkpointing", state + max(head + ckpt, resample), "+ backward transients: keep a few GiB free")
    return "\n".join(out)
