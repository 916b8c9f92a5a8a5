"""
Host memory of wan.load_wan at the full 1.3B size (the target: peak host memory stays near one copy of the
weights).

Writes a random Wan2.1-T2V-1.3B checkpoint in the original layout (one fp32 safetensors file, 5.7 GB), then loads
it in a fresh process per dtype and reports the peak resident memory of that process, split in two:
  anonymous  memory the process allocated (the model's tensors live here, unless they are views of the file);
  file       pages of the checkpoint that safetensors maps: page cache, which the kernel can drop at any time.

    python benchmarks/wan_load.py                          # CPU: fp32 and bf16
    python benchmarks/wan_load.py --device cuda            # host memory while loading onto the GPU
    python benchmarks/wan_load.py --dir /big/disk --keep   # where the 5.7 GB file goes; keep it for the next run
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import rf  # noqa: E402
import wan  # noqa: E402

GiB = 2**30


def write_checkpoint(path):
    """Random weights with the real keys and shapes (Wan's names), fp32, in one safetensors file."""
    from safetensors.torch import save_file
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in rf.DiT(rf.preset("wan2.1-t2v-1.3b")).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    save_file({k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, str(path))


def resident():
    """(anonymous, file-backed) resident bytes of this process, from /proc/self/status."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return tuple(int(fields[name].split()[0]) * 1024 for name in ("RssAnon", "RssFile"))


def child(path, dtype, device):
    """Load once, sampling the resident memory every 10 ms; print one JSON line."""
    peak, done = [0, 0, 0], threading.Event()                  # anonymous, file, both together

    def watch():
        while not done.is_set():
            anon, file = resident()
            peak[:] = max(peak[0], anon), max(peak[1], file), max(peak[2], anon + file)
            time.sleep(0.01)

    base = resident()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    start = time.perf_counter()
    model = wan.load_wan(path, dtype=getattr(torch, dtype), device=device)
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps(dict(dtype=dtype, device=device, seconds=seconds, weights=weights, base_anon=base[0],
                          peak_anon=peak[0], peak_file=peak[1], peak_total=peak[2])))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="folder for the 5.7 GB checkpoint (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (and reuse one already there)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    folder = Path(args.dir or tempfile.mkdtemp(prefix="wan_load_"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "diffusion_pytorch_model.safetensors"
    if not (args.keep and path.is_file()):
        print(f"writing a random full-size checkpoint to {path} ...", flush=True)
        write_checkpoint(path)
    print(f"checkpoint: {path.stat().st_size / GiB:.2f} GiB (fp32); torch {torch.__version__}; device {args.device}")
    print(f"{'load as':>9} {'weights':>9} {'peak anonymous':>15} {'peak file':>10} {'time':>7}")
    try:
        for dtype in args.dtypes:
            out = subprocess.run([sys.executable, __file__, "--child", str(path), dtype, args.device],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{dtype:>9} {r['weights'] / GiB:7.2f} G {(r['peak_anon'] - r['base_anon']) / GiB:13.2f} G "
                  f"{r['peak_file'] / GiB:8.2f} G {r['seconds']:6.1f}s")
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
    print("peak anonymous: at its peak, minus what the process held before load_wan")


if __name__ == "__main__":
    main()
