"""Upstream bug report: heap corruption in the CPU backward of a narrow ResNet on channels_last input.

Title: [CPU] "corrupted double-linked list" / "corrupted size vs. prev_size" / SIGSEGV in
``loss.backward()`` of a width-8 ResNet-18 on a channels_last 96x96 input (torch 2.14.1)

What happens: ten SGD steps of torchvision's ResNet-18, with the CIFAR stem (3x3 conv, stride 1,
no max-pool) and every stage scaled to 1/8 of its width (8-16-32-64 channels), on a float32
batch ``torch.randn(64, 3, 96, 96)`` made ``channels_last``, abort the process inside
``loss.backward()`` with a glibc heap-corruption message or a segmentation fault. Seen on a
2-core x86_64 Linux machine, torch 2.14.1 (the CPU kernels of the CUDA 13.0 wheel), in 3 of 3
runs with ``OMP_NUM_THREADS=1`` and in about 2 of 5 with the default threads.

What does not crash, same script: a contiguous (NCHW) input (``--layout contiguous``); the full
width 64 (``--width 64``); 32x32 inputs. So it looks like an out-of-bounds write in a
channels_last convolution backward kernel (mkldnn / the native NHWC path) for small channel
counts at larger spatial sizes.

Run (exit code 0 = clean; -6 / 134 = abort, -11 / 139 = segfault)::

    OMP_NUM_THREADS=1 python benchmarks/repro_channels_last_cpu_crash.py
    OMP_NUM_THREADS=1 python benchmarks/repro_channels_last_cpu_crash.py --layout contiguous   # clean
    python benchmarks/repro_channels_last_cpu_crash.py --runs 5    # each run in its own process

Needs only torch and torchvision; sslflow is not imported. sslflow's workaround
(`sslflow.ssl_models.augment.model_layout`): channels_last only on CUDA, where cuDNN's NHWC
kernels pay; contiguous NCHW tensors (and weights) on the CPU.

Not filed from the machine this was found on (no network access to GitHub); file it at
https://github.com/pytorch/pytorch/issues with this script and the output of
``python -m torch.utils.collect_env``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def train(width: int, size: int, layout: str, steps: int, batch: int) -> None:
    import torch
    from torch import nn
    from torchvision.models.resnet import BasicBlock, ResNet

    class NarrowResNet18(ResNet):
        """torchvision's ResNet-18 with every stage at width / 64 of its channels, CIFAR stem."""

        def __init__(self, width: int) -> None:
            self.scale = width / 64
            super().__init__(BasicBlock, [2, 2, 2, 2])
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.maxpool = nn.Identity()
            self.fc = nn.Linear(int(512 * self.scale), 10)

        def _make_layer(self, block, planes, blocks, stride=1, dilate=False):  # type: ignore[override]
            if planes == 64:
                self.inplanes = int(64 * self.scale)
            return super()._make_layer(block, int(planes * self.scale), blocks, stride, dilate)

    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    model = NarrowResNet18(width)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x = torch.randn(batch, 3, size, size).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (batch,))
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}", flush=True)
    print(f"ok: torch {torch.__version__}, width {width}, {size}px, {layout}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--runs", type=int, default=0, help="run N times, each in a fresh process, and count crashes")
    args = p.parse_args()
    if not args.runs:
        train(args.width, args.size, args.layout, args.steps, args.batch)
        return 0
    crashes = 0
    for i in range(args.runs):
        cmd = [sys.executable, __file__, "--width", str(args.width), "--size", str(args.size),
               "--layout", args.layout, "--steps", str(args.steps), "--batch", str(args.batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        last = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or [""])[-1]
        crashes += proc.returncode != 0
        print(f"run {i}: exit {proc.returncode}  {last}", flush=True)
    print(f"{crashes} of {args.runs} runs crashed", flush=True)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
