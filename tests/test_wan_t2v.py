"""Wan2.1 text-to-video and fine-tuning end to end, with tiny random models in the diffusers layout of the Wan repo.

A folder written here holds what Wan-AI/Wan2.1-T2V-1.3B-Diffusers holds, at a tiny size: transformer/ (diffusers'
WanTransformer3DModel), text_encoder/ (transformers' UMT5EncoderModel), tokenizer/ (a word-level tokenizer built with
`tokenizers`, appending EOS as umT5's does) and vae/ (diffusers' AutoencoderKLWan, 4 latent channels, Wan2.1's
strides 4 x 8 x 8). sample.py and train.py run on it as they would on the real repo. No downloads.
"""

import json
import re

import numpy as np
import pytest
import torch

import rf
import wan
import sample
import train
from conftest import TINY_WAN_T2V, one_line

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TINY_WAN_T2V_ARGS = [a for k, v in TINY_WAN_T2V.items()                  # the same, as train.py / sample.py flags
                     for a in (f"--{k}", *map(str, v if isinstance(v, tuple) else [v]))]
WORDS = "<pad> </s> <unk> a red cat dog walks runs on the beach grass blue".split()
MEAN, STD = [0.5, -0.25, 0.1, 0.0], [2.0, 0.5, 1.5, 1.0]


@pytest.fixture(scope="module")
def wan_root(tmp_path_factory):
    """A tiny Wan2.1 repo in the diffusers layout."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    root = tmp_path_factory.mktemp("wan_tiny")
    torch.manual_seed(0)
    dit = diffusers.WanTransformer3DModel(**wan.diffusers_wan_config(rf.preset("wan2.1-t2v-1.3b", **TINY_WAN_T2V)))
    with torch.no_grad():
        dit.proj_out.weight.normal_(0, 0.1)     # a non-zero head, so the video depends on every part
    dit.save_pretrained(root / "transformer")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(root / "tokenizer")
    t5 = transformers.UMT5Config(vocab_size=len(WORDS), d_model=TINY_WAN_T2V["text_dim"], d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.UMT5EncoderModel(t5).save_pretrained(root / "text_encoder")
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=TINY_WAN_T2V["in_dim"], dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               latents_mean=MEAN, latents_std=STD).save_pretrained(root / "vae")
    return root


def read_mp4(path):
    import imageio.v2 as imageio
    return np.stack(imageio.mimread(path, memtest=False))


# --- the pieces --------------------------------------------------------------------------------------------------

def test_text_features_are_trimmed_and_zero_padded(wan_root):
    tokenizer, encoder = wan.load_wan_text_encoder(wan_root)
    prompts = ["a red cat", "  blue dog &amp; walks   on the beach "]      # Wan tidies spaces and HTML entities
    context, length = wan.encode_prompts(tokenizer, encoder, prompts, TINY_WAN_T2V["text_len"])
    assert context.shape == (2, TINY_WAN_T2V["text_len"], TINY_WAN_T2V["text_dim"]) and context.dtype == torch.float32
    assert length.tolist() == [4, 8]                                      # the words + EOS (& is an unknown word)
    for row, n in zip(context, length):
        assert (row[n:] == 0).all() and (row[:n].abs().sum(-1) > 0).all()
    alone, _ = wan.encode_prompts(tokenizer, encoder, ["a red cat"], 4)     # no padding at all: the same features
    torch.testing.assert_close(context[0, :4], alone[0], rtol=1e-5, atol=1e-6)


def test_vae_latents_use_wan_mean_and_std(wan_root):
    vae = wan.load_wan_vae(wan_root)
    video = torch.rand(1, 9, 3, 32, 32) * 2 - 1                                        # (B, T, 3, H, W)
    z = wan.vae_encode(vae, video)
    assert z.shape == (1, 3, 4, 4, 4)                                                   # 1 + 8/4 latent frames
    mu = vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mean.permute(0, 2, 1, 3, 4)
    want = (mu - torch.tensor(MEAN).view(1, 1, 4, 1, 1)) / torch.tensor(STD).view(1, 1, 4, 1, 1)
    torch.testing.assert_close(z, want)


def test_chunked_decode_equals_whole_decode(wan_root):
    vae = wan.load_wan_vae(wan_root)
    latents = torch.randn(2, 6, 4, 4, 4)                                               # 6 latent frames
    pieces = list(wan.vae_decode_chunks(vae, latents))
    assert [p.shape[1] for p in pieces] == [1, 4, 4, 4, 4, 4]                           # 1 + 4k video frames
    z = latents * torch.tensor(STD).view(1, 1, 4, 1, 1) + torch.tensor(MEAN).view(1, 1, 4, 1, 1)
    with torch.no_grad():
        whole = vae.decode(z.permute(0, 2, 1, 3, 4)).sample.permute(0, 2, 1, 3, 4)    # (B, 21, 3, 32, 32)
    assert whole.shape == (2, 21, 3, 32, 32)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=0, atol=1e-6)


def test_frame_counts_are_1_plus_4k_in_whole_chunks():
    assert wan.latent_frames(81, 3) == 21 and wan.latent_frames(9, 3) == 3 and wan.latent_frames(5, 1) == 2
    for frames, near in [(80, 81), (13, 9), (1, 9)]:
        with pytest.raises(ValueError) as e:
            wan.latent_frames(frames, 3)
        assert "1 + 4k" in one_line(e.value) and f"use {near}" in str(e.value)


def test_missing_parts_are_one_line_errors(wan_root, tmp_path, monkeypatch):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        wan.wan_part(tmp_path, "vae")
    assert "no vae/ folder" in one_line(e.value) and wan.WAN_PARTS_REPO in str(e.value)
    assert wan.wan_part(wan_root / "vae", "vae") == wan_root / "vae"                    # the part's own folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pytest.importorskip("huggingface_hub")
    with pytest.raises(ConnectionError) as e:
        wan.wan_part("rf-tests/no-such-wan", "text_encoder")
    msg = one_line(e.value)                 # one command for the whole model folder, and the option that takes it
    assert "hf download rf-tests/no-such-wan --local-dir no-such-wan" in msg and "--wan no-such-wan" in msg
    assert "--include" not in msg and msg.count("pass that folder") == 1


# --- sample.py: prompt in, MP4 out ------------------------------------------------------------------------------

@pytest.mark.slow
def test_prompt_to_mp4(wan_root, tmp_path, capsys):
    base = ["--preset", "wan2.1-t2v-1.3b", "--wan", str(wan_root), "--prompt", "a red cat walks on the beach",
            "--steps", "2", "--out", str(tmp_path), *TINY_WAN_T2V_ARGS]
    sample.main(base + ["--frames", "21"])                                 # 6 latent frames: 2 chunks of 3
    video = read_mp4(tmp_path / "wan_seed0_0.mp4")
    assert video.shape == (21, 32, 32, 3) and video.std() > 0
    # the latents were saved before decoding: --latents decodes them again without the text encoder or the DiT
    again = tmp_path / "again"
    again.mkdir()
    sample.main(["--latents", str(tmp_path / "wan_seed0_latents.safetensors"), "--vae", str(wan_root),
                 "--out", str(again)])
    assert np.array_equal(read_mp4(again / "wan_seed0_0.mp4"), video)
    with pytest.raises(SystemExit) as e:
        sample.main(["--latents", str(tmp_path / "wan_seed0_0.mp4"), "--vae", str(wan_root)])
    assert "cannot read latents" in one_line(e.value.code)
    sample.main(base + ["--frames", "9", "--height", "16", "--width", "48", "--num", "2", "--seed", "3",
                        "--top_k", "1"])                                   # a smaller size; routing passes through
    printed = capsys.readouterr().out
    assert "routing top_k=1" in printed and "seed 3" in printed
    for i in range(2):
        assert read_mp4(tmp_path / f"wan_seed3_{i}.mp4").shape == (9, 16, 48, 3)
    for extra, expected in [(["--frames", "10"], "1 + 4k"), (["--height", "40"], "multiples of 16"),
                            (["--prompt", ""], "--prompt")]:
        with pytest.raises(SystemExit) as e:
            sample.main(base + extra)
        assert expected in one_line(e.value.code), (extra, e.value.code)


# --- train.py: cache the videos, fine-tune, then sample the fine-tuned model ------------------------------------

def write_videos(folder):
    import imageio.v2 as imageio
    folder.mkdir()
    g = np.random.default_rng(0)
    for name, frames, caption in [("a", 24, "a red cat"), ("b", 21, "a blue dog runs"), ("c", 45, "the cat walks"),
                                  ("short", 17, "a cat"), ("nocap", 24, None)]:
        video = [np.clip(g.normal(128, 40, (40, 56, 3)) + 5 * i, 0, 255).astype(np.uint8) for i in range(frames)]
        imageio.mimsave(folder / f"{name}.mp4", video, fps=16, macro_block_size=8)  # 40x56: resized and cropped
        if caption:
            (folder / f"{name}.txt").write_text(caption)


@pytest.mark.slow
def test_cache_then_finetune_then_sample(wan_root, tmp_path, capsys):
    data = tmp_path / "videos"
    write_videos(data)
    args = ["--preset", "wan2.1-t2v-1.3b", "--wan", str(wan_root), "--data", str(data), "--clip_frames", "21",
            "--steps", "3", "--warmup_steps", "1", "--batch_size", "2", "--grad_accum", "2", "--log_every", "1",
            *TINY_WAN_T2V_ARGS]
    train.main(args + ["--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    # c.mp4 holds two windows of 21 frames; 6 latent frames = 2 chunks, so the history is really resampled
    assert "0 videos reused, 4 encoded now -> 4 clips of 21 frames (6 latent frames of 4x4)" in printed, printed
    assert "skipping bad clip short.mp4: 17 frames at 16 fps, fewer than --clip_frames 21" in printed
    assert "skipping bad clip nocap.mp4: no caption file nocap.txt" in printed
    cache = sorted(p.name for p in (data / ".rf_cache" / "32x32_21f").iterdir())
    assert cache == ["_empty_prompt.safetensors", "a.mp4.safetensors", "b.mp4.safetensors", "c.mp4.safetensors",
                     "short.mp4.safetensors"]
    meta = json.loads((tmp_path / "run" / "latest" / "meta.json").read_text())
    assert meta["step"] == 3 and meta["stage"] == "resampling_forcing" and meta["train"]["lr"] == 5e-5
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["mode"] for r in rows] == ["none", "autoregressive", "autoregressive"]
    assert all(np.isfinite([x for x in r["bucket_loss"] if x is not None]).all() for r in rows)

    train.main(args + ["--out", str(tmp_path / "run2"), "--steps", "1"])          # the cache is reused
    assert "4 videos reused, 0 encoded now" in capsys.readouterr().out
    (data / "a.txt").write_text("a red dog")                                      # a new caption: encoded again
    train.main(args + ["--out", str(tmp_path / "run3"), "--steps", "1"])
    assert "3 videos reused, 1 encoded now" in capsys.readouterr().out

    sample.main(["--ckpt", str(tmp_path / "run" / "latest"), "--prompt", "a red cat", "--frames", "9", "--steps", "2"])
    printed = capsys.readouterr().out
    path = re.search(r"wrote (\S+\.mp4)", printed).group(1)
    assert read_mp4(path).shape == (9, 32, 32, 3)


def test_wan_training_needs_a_video_folder(wan_root, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "wan2.1-t2v-1.3b", "--wan", str(wan_root), "--out", str(tmp_path / "r"),
                    *TINY_WAN_T2V_ARGS])
    assert "--data" in one_line(e.value.code)
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "wan2.1-t2v-1.3b", "--data", str(tmp_path), "--clip_frames", "8",
                    "--out", str(tmp_path / "r"), *TINY_WAN_T2V_ARGS])
    assert "--clip_frames 8 frames" in one_line(e.value.code) and "use 9" in e.value.code
