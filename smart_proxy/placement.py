"""Where a llama-server's model goes among the GPUs: one GPU, a split, a partial offload, or nowhere.

Theory of operation: the inventory is a list of :class:`Gpu` (an index as ``nvidia-smi``
numbers it, and the bytes free for models on it), read from ``nvidia-smi`` or declared
(``[pool] gpus = 0:24GiB, 1:24GiB``: :func:`parse_inventory`). :func:`place` takes what the
model needs on a GPU (its memory estimate less what stays in host memory), its layer count
and the free bytes per GPU now (the inventory less what the pool's live servers hold
there), and answers a :class:`Placement`:

* **one GPU** when it fits whole on one: the one with the least free memory that still
  fits (best fit: the large GPUs stay free for the large models), lowest index on a tie;
* **a split** across the fewest GPUs whose free memory together holds it, the largest
  first, in proportion to their free memory (llama.cpp's ``--tensor-split``);
* **a partial offload** when it fits nowhere whole and the model allows it
  (``allow_partial``): as many whole layers as the GPUs' free memory holds
  (``--n-gpu-layers K``, the rest on the CPU), split over the GPUs that take any;
* otherwise :class:`~smart_proxy.errors.ModelTooLarge`, like a model larger than the
  memory budget.

A placement becomes llama-server's environment and flags (:meth:`Placement.env`,
:meth:`Placement.args`): ``CUDA_VISIBLE_DEVICES`` lists the chosen GPUs (and
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so CUDA numbers them as ``nvidia-smi`` does), so inside
the process they are ``CUDA0``, ``CUDA1`` ... in that order, which ``--device`` names; then
``--split-mode`` (``none`` for one GPU, ``layer`` for a split), ``--tensor-split``,
``--n-gpu-layers`` (``all``, or K) and ``--fit off`` (llama-server would otherwise shrink
what it was not told to fit what it finds free). Flag names as llama-server 11434's
``--help`` gives them. A model whose own ``args`` set any of :data:`GPU_FLAGS` is not
placed (:func:`sets_gpu_flags`): its flags win, and the pool starts it as configured.
Everything here is pure but :func:`read_nvidia_smi`, which runs ``nvidia-smi`` (blocking:
call it through ``trio.to_thread.run_sync``).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence

import attrs

from .config import parse_gpu_list
from .errors import ModelTooLarge

__all__ = [
    "GPU_FLAGS",
    "Gpu",
    "Placement",
    "parse_inventory",
    "parse_nvidia_smi",
    "place",
    "read_nvidia_smi",
    "sets_gpu_flags",
]

MIB = 1024**2
#: ``nvidia-smi``'s query for the inventory (memory in MiB, no header, no units).
NVIDIA_SMI = ["nvidia-smi", "--query-gpu=index,memory.total,memory.used", "--format=csv,noheader,nounits"]
#: llama-server's flags that say where a model goes: a model's ``args`` with any of them is not placed.
GPU_FLAGS = frozenset(
    {"-ngl", "--gpu-layers", "--n-gpu-layers", "-dev", "--device", "-sm", "--split-mode", "-ts", "--tensor-split",
     "-mg", "--main-gpu", "-fit", "--fit"}
)  # fmt: skip


def sets_gpu_flags(args: Sequence[str]) -> bool:
    """The arguments set where the model goes themselves (any of :data:`GPU_FLAGS`, also as ``--flag=value``)."""
    return any(arg.partition("=")[0] in GPU_FLAGS for arg in args)


@attrs.frozen
class Gpu:
    #: The GPU's index as nvidia-smi (and CUDA_VISIBLE_DEVICES) numbers it.
    index: int
    #: Bytes available for models on it.
    memory: int


@attrs.frozen
class Placement:
    """Where one llama-server's model goes: GPU indexes and the bytes on each, and how many layers."""

    #: The GPUs used, in the order CUDA will number them inside the process.
    gpus: tuple[int, ...] = ()
    #: Bytes put on each of ``gpus`` (the same order).
    shares: tuple[int, ...] = ()
    #: Layers offloaded: None for all of them, K for a partial offload.
    gpu_layers: int | None = None

    @property
    def partial(self) -> bool:
        return self.gpu_layers is not None

    @property
    def vram(self) -> int:
        """Bytes it puts on GPUs, all of them together."""
        return sum(self.shares)

    def on(self, index: int) -> int:
        """Bytes it puts on GPU ``index``."""
        return sum(share for gpu, share in zip(self.gpus, self.shares, strict=True) if gpu == index)

    def describe(self) -> str:
        """For logs: ``GPU 1`` / ``GPUs 1,0 (split)`` / ``GPU 0, 20 layers (partial)`` / ``no GPU``."""
        if not self.gpus:
            return "no GPU"
        where = f"GPU {self.gpus[0]}" if len(self.gpus) == 1 else f"GPUs {','.join(map(str, self.gpus))}"
        if self.partial:
            return f"{where}, {self.gpu_layers} layers (partial)"
        return where if len(self.gpus) == 1 else f"{where} (split)"

    def env(self) -> dict[str, str]:
        """The environment llama-server needs: the chosen GPUs only (none: no GPU is seen), numbered as nvidia-smi does."""
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in self.gpus)}

    def args(self) -> tuple[str, ...]:
        """llama-server's flags for this placement (after the model's own ``args``, so they win)."""
        if not self.gpus:
            return ("--device", "none", "--n-gpu-layers", "0")
        devices = ",".join(f"CUDA{i}" for i in range(len(self.gpus)))
        layers = "all" if self.gpu_layers is None else str(self.gpu_layers)
        if len(self.gpus) == 1:
            return ("--device", devices, "--split-mode", "none", "--n-gpu-layers", layers, "--fit", "off")
        split = ",".join(str(max(1, share // MIB)) for share in self.shares)
        return (
            "--device", devices, "--split-mode", "layer", "--tensor-split", split, "--n-gpu-layers", layers, "--fit", "off",
        )  # fmt: skip


def parse_inventory(text: str) -> tuple[Gpu, ...]:
    """A declared inventory: ``"0:24GiB, 1:24GiB"`` (index:size, sizes as elsewhere in proxy.ini).

    Raises:
        ValueError: an entry is not ``INDEX:SIZE``, an index repeats or is negative, or a size is not one.
    """
    return tuple(Gpu(index, size) for index, size in parse_gpu_list(text))


def parse_nvidia_smi(text: str) -> tuple[Gpu, ...]:
    """``nvidia-smi`` :data:`NVIDIA_SMI` output (``0, 24576, 310`` per line, MiB) as GPUs with their free memory.

    Lines that are not three numbers (a GPU that reports ``[N/A]``) are left out.
    """
    gpus = []
    for line in text.splitlines():
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 3 or not all(field.isdigit() for field in fields):
            continue
        index, total, used = (int(field) for field in fields)
        gpus.append(Gpu(index, max(0, total - used) * MIB))
    return tuple(gpus)


def read_nvidia_smi() -> tuple[Gpu, ...]:
    """The GPUs ``nvidia-smi`` reports, with their free memory now; none if it is absent or fails (blocking)."""
    if shutil.which(NVIDIA_SMI[0]) is None:
        return ()
    try:
        done = subprocess.run(NVIDIA_SMI, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return parse_nvidia_smi(done.stdout) if done.returncode == 0 else ()


def _proportional(need: int, free: Sequence[int]) -> tuple[int, ...]:
    """``need`` bytes spread over GPUs in proportion to their free bytes (each share within its GPU's)."""
    total = sum(free)
    return tuple(need * f // total for f in free)


def place(
    name: str, need: int, layers: int, free: Mapping[int, int], *, allow_partial: bool = False
) -> Placement:
    """Where a model that needs ``need`` bytes on a GPU, in ``layers`` layers, goes (see the module docstring).

    Args:
        name: the model, for the refusal's message.
        need: bytes it holds on the GPU if every layer is offloaded.
        layers: its layer count (GGUF ``block_count``), for a partial offload.
        free: bytes free now on each GPU, by index.
        allow_partial: the model may run with only some layers on GPUs.

    Raises:
        ModelTooLarge: it fits on no GPU and no set of them, and a partial offload is not
            allowed or could not take a single layer.
    """
    fitting = [index for index, bytes_ in free.items() if bytes_ >= need]
    if fitting:
        best = min(fitting, key=lambda index: (free[index], index))
        return Placement((best,), (need,))
    largest = sorted((index for index, bytes_ in free.items() if bytes_ > 0), key=lambda index: (-free[index], index))
    chosen: list[int] = []
    for index in largest:
        chosen.append(index)
        if sum(free[i] for i in chosen) >= need:
            return Placement(tuple(chosen), _proportional(need, [free[i] for i in chosen]))
    available = sum(free[i] for i in largest)
    if allow_partial and layers > 0 and need > 0:
        per_layer = -(-need // layers)
        count = min(layers - 1, available // per_layer)
        if count > 0:
            on_gpu = count * per_layer
            # the fewest GPUs, largest first, that take those layers
            used: list[int] = []
            for index in largest:
                used.append(index)
                if sum(free[i] for i in used) >= on_gpu:
                    break
            return Placement(tuple(used), _proportional(on_gpu, [free[i] for i in used]), count)
    gib = 1024**3
    where = ", ".join(f"GPU {i}: {free[i] / gib:.1f} GiB" for i in sorted(free)) or "no GPU"
    if not allow_partial:
        hint = f"; allow_partial = true ([pool] or [model:{name}]) would offload only some layers"
    elif layers <= 0:
        hint = f"; a partial offload needs its layer count ([model:{name}] layers)"
    else:
        hint = "; not even one layer fits"
    raise ModelTooLarge(
        f"model {name!r} needs {need / gib:.1f} GiB of GPU memory and fits on no GPU nor across them "
        f"(free: {where}){hint}"
    )
