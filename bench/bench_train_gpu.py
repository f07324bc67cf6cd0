"""Training throughput of the ResNet50 age model: synthetic tensors vs generated JPEGs through the real loader.

GPU run (the figures the issue asks for):  python bench/bench_train_gpu.py
CPU smoke run:  python bench/bench_train_gpu.py --device cpu --batch-size 8 --img-size 64 --steps 3 --images 24 --workers 0
Prints images/s for each input, their ratio (the input pipeline's cost), peak GPU memory and the GPU name.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import torch

    from agecam.training import model as M
    from agecam.training.data import FaceDataset, Preprocessing, make_loader
    from agecam.training.synth import make_utkface_like
    from agecam.training.train import amp_dtype_for, make_optimizer, train_step

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per input kind")
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto")
    ap.add_argument("--images", type=int, default=2048, help="generated JPEGs for the loader run")
    ap.add_argument("--data", default=None, help="use this folder of UTKFace-named JPEGs instead of generating")
    ap.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1))
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    dev = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                       else "cpu")
    cuda = dev.type == "cuda"
    torch.backends.cudnn.benchmark = True
    amp_dtype = amp_dtype_for(dev, args.amp)
    prep = Preprocessing(args.img_size, tuple(M.MEAN_PX), tuple(M.STD_PX))
    bins = torch.tensor(M.BINS_YEARS, device=dev)
    net = M.build_model(weights=None, log=lambda *_: None).to(dev)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
    net.train()
    opt = make_optimizer(net, 1e-3, 0.05, dev)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype == torch.float16)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(batches) -> tuple[float, float]:
        """(images/s, peak GiB) over args.steps steps after args.warmup_steps."""
        it = iter(batches)
        for _ in range(args.warmup_steps):
            x, a = next(it)
            train_step(net, x, a, prep, bins, opt, scaler, amp_dtype, cuda)
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0, n = time.perf_counter(), 0
        for _ in range(args.steps):
            x, a = next(it)
            train_step(net, x, a, prep, bins, opt, scaler, amp_dtype, cuda)
            n += len(a)
        sync()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        return n / dt, peak

    # 1) synthetic uint8 tensors already on the device: the model's own speed
    g = torch.Generator(device="cpu").manual_seed(0)
    xs = torch.randint(0, 256, (args.batch_size, 3, args.img_size, args.img_size), dtype=torch.uint8, generator=g)
    xs = xs.to(dev)
    ages = (torch.rand(args.batch_size, generator=g) * 80 + 1).to(dev)

    def synthetic():
        while True:
            yield xs, ages

    syn_ips, syn_peak = timed(synthetic())

    # 2) JPEGs decoded, resized, augmented by the training dataset in DataLoader workers
    tmp = None
    if args.data:
        data = Path(args.data)
        paths = sorted(p for p in data.iterdir() if p.name.endswith(".jpg"))
        age_list = [float(p.name.split("_")[0]) for p in paths]
    else:
        tmp = tempfile.TemporaryDirectory(prefix="agecam_bench_")
        t0 = time.perf_counter()
        info = make_utkface_like(tmp.name, args.images, seed=0, anomalies=False)
        print(f"generated {args.images} JPEGs in {time.perf_counter() - t0:.1f} s")
        paths = [Path(tmp.name) / n for n in info["clean"]]
        age_list = [float(info["ages"][n]) for n in info["clean"]]
    ds = FaceDataset(paths, age_list, prep, train=True)
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=10**9)
    loader = make_loader(ds, args.batch_size, workers=args.workers, sampler=sampler, pin_memory=cuda, drop_last=True)

    def from_loader():
        for x, a, _ in loader:
            yield x, a

    jpg_ips, jpg_peak = timed(from_loader())
    del loader
    if tmp is not None:
        tmp.cleanup()

    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    figures = {
        "device": name, "torch": str(torch.__version__), "batch_size": args.batch_size, "img_size": args.img_size,
        "amp": str(amp_dtype), "channels_last": cuda, "steps": args.steps, "workers": args.workers,
        "cpu_count": os.cpu_count(), "synthetic_img_per_s": round(syn_ips, 1), "jpeg_loader_img_per_s": round(jpg_ips, 1),
        "loader_over_synthetic": round(jpg_ips / syn_ips, 3), "peak_gpu_mem_gib_synthetic": round(syn_peak, 2),
        "peak_gpu_mem_gib_loader": round(jpg_peak, 2),
    }
    print(f"device: {name} | torch {torch.__version__} | batch {args.batch_size} | {args.img_size} px | AMP {amp_dtype}"
          f" | channels_last {cuda} | {args.workers} workers on {os.cpu_count()} CPUs")
    print(f"synthetic tensors : {syn_ips:9.1f} images/s  (peak GPU memory {syn_peak:.2f} GiB)")
    print(f"JPEGs via loader  : {jpg_ips:9.1f} images/s  (peak GPU memory {jpg_peak:.2f} GiB)")
    print(f"loader / synthetic: {jpg_ips / syn_ips:.3f}  (below 1: the input pipeline limits training)")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
