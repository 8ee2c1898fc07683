"""The device side: uint8 patches in, embeddings out. Conversion, resize and normalization run on
the device so the loader ships compact uint8 and the CPU stays free for decoding."""

from __future__ import annotations

import contextlib
import logging
import time

import torch
import torch.nn.functional as F

from .errors import InvalidOption

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DeviceClock:
    """Time the device spends in encoder calls: CUDA events on a GPU (read once, at the end, so
    no batch waits for them), wall time on the CPU, where the calls are synchronous."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._events: list = []
        self._cpu_s = 0.0
        self._t0 = 0.0

    def __enter__(self) -> "DeviceClock":
        if self._cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self._cuda:
            self._events[-1][1].record()
        else:
            self._cpu_s += time.perf_counter() - self._t0

    def seconds(self) -> float:
        if self._cuda and self._events:
            self._events[-1][1].synchronize()
        return self._cpu_s + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0


def select_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidOption(f"--device {spec}: CUDA is not available here; use --device cpu or auto")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidOption(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) visible")
        return device
    raise InvalidOption(f"unknown --device {spec!r}; use auto, cpu, cuda or cuda:N")


def select_precision(spec: str, device: torch.device) -> str:
    if spec not in PRECISIONS:
        raise InvalidOption(f"unknown --precision {spec!r}; use one of {', '.join(PRECISIONS)}")
    if spec == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"  # CPU autocast is slower than fp32 on most CPUs
    return spec


def resizes_uint8(device_type: str) -> bool:
    return device_type == "cpu"


def resize_method(device_type: str) -> str:
    """How :meth:`EncoderRunner.preprocess` resizes patches on this device (recorded in the store)."""
    return f"antialiased bilinear on {'uint8' if resizes_uint8(device_type) else 'float32'} ({device_type})"


class EncoderRunner:
    """Runs one encoder on uint8 NHWC batches already on the device."""

    def __init__(self, encoder, device: torch.device, precision: str, *, compile: bool = False):
        self.encoder = encoder
        self.device = device
        self.precision = precision
        cfg = encoder.config
        self.input_size = int(cfg.input_size)
        self.mean255 = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std255 = 1.0 / (torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255.0)
        module = encoder.module.to(device).eval()
        self.channels_last = _is_cnn(module)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module) if compile else module

    def _autocast(self):
        if self.precision in _AUTOCAST:
            return torch.autocast(self.device.type, dtype=_AUTOCAST[self.precision])
        return contextlib.nullcontext()

    def preprocess(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 3, S, S) normalized float32 at the encoder's input size."""
        # NHWC uint8 viewed as NCHW is already channels_last; /255 is folded into mean and std
        x = patches.permute(0, 3, 1, 2)
        size = (self.input_size, self.input_size)
        if tuple(x.shape[-2:]) != size:
            # on a CPU the resize runs on uint8, as PIL's and torchvision's do (rounded to whole
            # levels): 3-4x faster than in float; CUDA has no uint8 antialiased kernel
            x = x if resizes_uint8(x.device.type) else x.float()
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = x.float().sub_(self.mean255).mul_(self.inv_std255)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.inference_mode()
    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(patches)
        with self._autocast():
            out = self.module(x)
        return out.float()


def _is_cnn(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Conv2d) for m in module.modules()) and not any(
        "Attention" in type(m).__name__ for m in module.modules())
