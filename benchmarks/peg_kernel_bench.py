"""Time the PEG kernel (libmvlm_peg_kernel.so) against torch on the same CUDA GPU.

    y = x + bias + depthwise_conv3x3(x, weight)
    torch: F.conv2d(x, weight, bias, padding=1, groups=C) + x   (cuDNN depthwise conv + an add)

Shapes: the PEG of the MobileVLM V2 projector, 12x12 tokens with C = 2048 (1.7B), 2560 (3B) and
4096 (7B), batch 1 and 8, FP32 and FP16. Each case is checked against torch once, then timed.

Timing: CUDA events around `--launches` back-to-back launches, repeated `--repeats` times; the
median per launch is reported. Before each timed run the stream is held by torch.cuda._sleep so
that the host queues every launch before the GPU reaches them: the events then measure GPU
execution, not Python/ctypes launch overhead. Both versions reuse their buffers, so both run
with the data warm in L2 where it fits, as it would be after the preceding projector layer.

Usage (on a machine with a CUDA GPU and torch with CUDA):
    cmake -S plugins/peg -B plugins/peg/build && cmake --build plugins/peg/build -j
    python benchmarks/peg_kernel_bench.py [--lib PATH] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from mvlm_compile.peg_op import (
    PluginLibraryError,
    find_kernel_library,
    load_kernel_library,
    peg_forward_gpu,
)

MODELS = {"1.7B": 2048, "3B": 2560, "7B": 4096}
BATCHES = (1, 8)
DTYPES = ("float32", "float16")
SIDE = 12  # 144 image tokens as a 12x12 grid


def _time_per_launch(torch, launch, launches: int, repeats: int) -> float:
    """Median GPU time of one launch, in microseconds."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(10):  # warm-up: first-launch costs, cuDNN algorithm choice, clocks
        launch()
    samples = []
    for _ in range(repeats):
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU spin while the host enqueues the launches
        start.record()
        for _ in range(launches):
            launch()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1000.0 / launches)
    return statistics.median(samples)


def run_case(torch, lib, model: str, batch: int, dtype: str, launches: int, repeats: int) -> dict:
    import torch.nn.functional as F

    channels = MODELS[model]
    shape = (batch, channels, SIDE, SIDE)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, generator=gen, device="cuda").to(torch_dtype)
    weight = (0.3 * torch.randn(channels, 1, 3, 3, generator=gen, device="cuda")).to(torch_dtype)
    bias = torch.randn(channels, generator=gen, device="cuda").to(torch_dtype)
    y = torch.empty_like(x)
    stream = torch.cuda.current_stream().cuda_stream

    def kernel():
        peg_forward_gpu(lib, x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), shape, dtype, stream)

    def reference():
        return F.conv2d(x, weight, bias, padding=1, groups=channels) + x

    kernel()
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=1, groups=channels) + x.double()
    max_error = (y.double() - expected).abs().max().item()
    torch_error = (reference().double() - expected).abs().max().item()

    kernel_us = _time_per_launch(torch, kernel, launches, repeats)
    torch_us = _time_per_launch(torch, reference, launches, repeats)
    moved = 2 * x.numel() * x.element_size()  # x read once, y written once
    return {
        "model": model,
        "shape": list(shape),
        "dtype": dtype,
        "kernel_us": round(kernel_us, 3),
        "torch_us": round(torch_us, 3),
        "speedup": round(torch_us / kernel_us, 3),
        "kernel_gb_per_s": round(moved / kernel_us / 1e3, 1),
        "kernel_max_abs_error": max_error,
        "torch_max_abs_error": torch_error,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", type=Path, help="libmvlm_peg_kernel.so (default: $MVLM_PEG_KERNEL, plugins/peg/build)")
    parser.add_argument("--launches", type=int, default=100, help="back-to-back launches per timed run")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per case (the median is reported)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    try:
        import torch
    except ImportError:
        print("error: this benchmark needs torch with CUDA (pip install torch)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print(
            "error: no CUDA GPU (torch.cuda.is_available() is False): this benchmark times the PEG kernel on a GPU",
            file=sys.stderr,
        )
        return 2
    try:
        lib = load_kernel_library(args.lib if args.lib is not None else find_kernel_library())
    except (PluginLibraryError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    results = [
        run_case(torch, lib, model, batch, dtype, args.launches, args.repeats)
        for model in MODELS
        for batch in BATCHES
        for dtype in DTYPES
    ]

    device = torch.cuda.get_device_name()
    print(f"PEG kernel vs torch conv2d+add on {device} (torch {torch.__version__}), median us per launch")
    header = ("model", "shape", "dtype", "kernel", "torch", "speedup", "GB/s", "max err")
    print(" ".join(f"{h:>{w}}" for h, w in zip(header, (5, 18, 8, 9, 9, 8, 7, 9), strict=True)))
    for r in results:
        shape = "x".join(map(str, r["shape"]))
        print(
            f"{r['model']:>5} {shape:>18} {r['dtype']:>8} {r['kernel_us']:>9.2f} {r['torch_us']:>9.2f} "
            f"{r['speedup']:>7.2f}x {r['kernel_gb_per_s']:>7.0f} {r['kernel_max_abs_error']:>9.2e}"
        )
    report = {
        "device": device,
        "torch": torch.__version__,
        "launches": args.launches,
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(report, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
