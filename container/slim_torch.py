"""CPU image only: drop the CUDA files that PyPI's torch wheel pulls in but a CPU process never loads.

PyPI has one torch 2.14.1 build for Linux x86_64, the CUDA one: it depends on ~3.4 GB of nvidia-* / cuda-toolkit
wheels and on triton (~0.9 GB, used only by torch.compile's GPU code generation). torch's extension modules
link against part of the CUDA libraries (cudart, cublas, cudnn, nccl, ...), so those must stay for
`import torch` to work; the rest (cuDNN engine libraries, cusolver, static archives, NVRTC builtins, headers,
...) is only ever dlopen()ed for GPU work.

This script imports torch and torchvision, runs a CPU forward pass, and keeps exactly the files under
site-packages/nvidia that the process has mapped, deleting every other file there, then removes triton.
The build then re-runs the checks (`import torch`, a timm forward, `tagger --help`) on the result.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}


def main() -> int:
    import torch
    import torchvision  # noqa: F401  (its _C extension links torch's libraries too)

    torch.nn.functional.conv2d(torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)).sum().item()
    torch.cuda.is_available()  # loads what the device check loads
    site = Path(sysconfig.get_paths()["purelib"])
    keep = {os.path.realpath(p) for p in mapped_files()}
    removed = kept = 0
    nvidia = site / "nvidia"
    for path in sorted(nvidia.rglob("*")) if nvidia.is_dir() else []:
        if path.is_file() and not path.is_symlink():
            size = path.stat().st_size
            if os.path.realpath(path) in keep:
                kept += size
            else:
                path.unlink()
                removed += size
    triton = site / "triton"
    if triton.is_dir():
        removed += sum(p.stat().st_size for p in triton.rglob("*") if p.is_file())
        shutil.rmtree(triton)
    print(f"slim_torch: kept {kept / 1e9:.2f} GB of CUDA libraries that torch links, removed {removed / 1e9:.2f} GB",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
