"""Inference engine: runs UniverSeg for batches of target slices that share one support set.

The pipeline only talks to :class:`InferenceEngine` (``batch_size`` and ``logits``), so the way
the network is evaluated (reference forward pass or the fast path, dtype, memory layout, batch
sizing) is decided here.

Fast path (``mode="fast"``, the default). v1 has no nonlinearity after a CrossBlock's cross
convolution, so for target ``u`` and support item ``v_i``

    conv([u || v_i]) = W_u * u + W_v * v_i + b                                   (exact)

and everything linear that follows before the next nonlinearity can be split the same way:

* encoder block 0: ``W_v * v_i`` depends only on the support set, and so does the support
  stream's convolution of it: ``W_s * z_i = W_s * (W_u*u + b) + W_s * (W_v*v_i)``; both support
  terms are computed once per support set (and cached across calls). Per target only
  ``W_s * (W_u * u)`` and ``W_t * (W_u * u)`` remain, computed as one composed 5x5 convolution
  of the 1-channel target (the 1-pixel border ring, where zero padding breaks the composition,
  is computed exactly from 3-pixel strips). The pairs then only need ``leaky(P_b + Q_i)``
  (elementwise), its mean over i (a decoder skip) and its 2x2 max-pool;
* blocks 1..5: the target half once per target, the support half once per (target, item);
  ``mean_i z_i = W_u*u + mean_i(W_v*v_i) + b``;
* last decoder block: only ``mean_i z_i`` is used (its support stream feeds nothing), and by
  linearity ``mean_i W_v*[up(s_i) || skip_i] = W_v*[up(mean_i s_i) || mean_i skip_i]``: the
  128x128 cross convolution runs once per target instead of once per (target, item).

Per 128x128 slice this is ~1.9 GFLOP per support item + ~8 GFLOP per target (+1.3 GFLOP per
support item once per support set), against 9.2 GFLOP per item for the reference forward pass
(10.4 in the official code, which also computes the unused support conv). On top:
channels_last memory layout, means as matrix products, reused chunk buffers, fp16 on CUDA (fp32
retry if it overflows), bf16 on CPUs with AMX (the evaluation's Dice is unchanged to 0.0003
with the starter weights), fp32 elsewhere (:func:`resolve_precision`: a rule on what the machine
is, never a timing; ``UNIVERSEG_CPU_BF16=0/1`` or an explicit precision overrides), target
sub-batches sized from a memory budget, optional ``torch.compile`` for large calls.

Every target's logits are the same bit for bit whatever the batch it runs in and the number of
threads (checked in ``Testing/core/test_engine.py``): a lone target runs beside a copy of itself, and
the output layer is a fixed-order sum (:func:`_out_conv`), so cached re-runs equal fresh runs and
a cohort worker on one thread equals the CLI on two.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch.nn import functional as F

from ..errors import Cancelled, DeviceError, UsageError  # noqa: F401
from .model import LEAKY_SLOPE, TRAINED_SIZE, EmptySupportError, UniverSeg  # noqa: F401

MODES = ("fast", "reference")
PRECISIONS = ("auto", "fp32", "bf16", "fp16", "fp64")
_DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp64": torch.float64,
}
MIB = 1024 * 1024
#: most targets in one pass on the CPU: 8 ran as fast as 16 (16 targets at S=2, medians of 5 on
#: the shared 2-core AMD EPYC, 3.99 s vs 3.95 s) with 216 MiB of working memory instead of 336
CPU_MAX_BATCH = 8
#: targets per pass through the last decoder block on the CPU (bounds its working memory)
LAST_BLOCK_TARGETS = 4
#: opt-in torch.compile only for sub-batches with at least this many target-support pairs
COMPILE_MIN_PAIRS = 64


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda``, else ``mps``, else ``cpu``; validates explicit choices (the rule is
    :func:`UniverSegLogic.core.device.choose_device`)."""
    from .device import choose_device, torch_backends

    return choose_device(device, **torch_backends(torch))


# --------------------------------------------------------------------------- CPU capabilities
def _cpu_flags() -> Optional[set]:
    """CPU feature flags from /proc/cpuinfo (Linux); None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="ignore") as fh:
            for line in fh:
                if line.startswith("flags") or line.startswith("Features"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


#: Precisions a caller may ask for on the CPU (``PropagationOptions.precision``, ``--precision``).
CPU_PRECISIONS = ("auto", "fp32", "bf16")
#: The environment variable that says what ``auto`` means on the CPU: ``0`` fp32, ``1`` bf16.
BF16_ENV = "UNIVERSEG_CPU_BF16"

_BF16_CHOICE: Optional[Tuple[bool, str]] = None


def set_cpu_bf16_choice(use: bool, why: str) -> None:
    """Fix what ``auto`` means on the CPU in this process: processes that must compute
    identical results, such as the workers of one cohort run, take the client's decision."""
    global _BF16_CHOICE
    _BF16_CHOICE = (bool(use), str(why))


def cpu_bf16_rule(flags: Optional[set] = None) -> Tuple[bool, str]:
    """(bf16 for ``auto`` on a CPU with these feature flags?, why): the rule, from what the CPU
    *is*, never from a timing (a timing probe made the choice, and so the masks, change from run
    to run on a loaded machine).

    bf16 where the CPU computes it natively (:func:`has_native_bf16`: AMX-BF16 or AVX512-BF16),
    fp32 elsewhere. The evaluation's mean Dice moves by at most 0.0003 in bf16, on a CPU with AMX
    and on one with AVX512-BF16 alone (``docs/results/evaluation/bf16_decision.md``); the
    clinical benchmark's first run is 1.3x faster on a 2-core AMD EPYC with AVX512-BF16
    (``docs/results/benchmarks/clinical.md``); the engine alone is 2-2.4x faster with AMX."""
    flags = _cpu_flags() if flags is None else flags
    if flags is None:
        return False, "CPU features unknown: fp32"
    if "amx_bf16" in flags:
        return True, "CPU has AMX-BF16: bf16"
    if "avx512_bf16" in flags:
        return True, "CPU has AVX512-BF16: bf16"
    return False, "no native BF16 on this CPU: fp32"


def cpu_bf16_choice() -> Tuple[bool, str]:
    """(use bf16 for ``auto`` on this CPU?, why): a decision fixed for the process by
    :func:`set_cpu_bf16_choice`, else ``UNIVERSEG_CPU_BF16=0/1``, else :func:`cpu_bf16_rule`."""
    if _BF16_CHOICE is not None:
        return _BF16_CHOICE
    value = os.environ.get(BF16_ENV, "").strip()
    if value in ("0", "1"):
        return value == "1", f"{BF16_ENV}={value}"
    return cpu_bf16_rule()


def has_native_bf16(flags: Optional[set] = None) -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16)."""
    flags = _cpu_flags() if flags is None else flags
    return bool(flags) and bool({"avx512_bf16", "amx_bf16"} & flags)


def resolve_precision(precision: str, device: str) -> Tuple[str, str]:
    """(precision the engine computes in, why) for a requested ``precision`` on a resolved
    ``device``: ``auto`` is fp16 on CUDA, fp32 on other GPUs and on the CPU what
    :func:`cpu_bf16_choice` says; an explicit precision is used as asked. Depends only on the
    request, the device and the CPU's features, so the same input gives the same masks in every
    process on the same kind of machine."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    if precision != "auto":
        if precision == "bf16" and device == "cpu" and not has_native_bf16():
            return precision, "requested (this CPU has no native BF16: emulated, slow)"
        return precision, "requested"
    if device.startswith("cuda"):
        return "fp16", "CUDA: fp16 (fp32 retry on overflow)"
    if device != "cpu":
        return "fp32", f"{device}: fp32"
    use, why = cpu_bf16_choice()
    return ("bf16" if use else "fp32"), why


def has_cxx_compiler() -> bool:
    """True when a C++ compiler torch.compile (inductor) can use is on the PATH."""
    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return True
    names = ("cl",) if sys.platform == "win32" else ("g++", "c++", "clang++")
    return any(shutil.which(n) for n in names)


# --------------------------------------------------------------------------- memory
def available_ram_bytes() -> int:
    """Memory the OS can give this process now (MemAvailable); a conservative guess elsewhere."""
    try:
        import psutil  # type: ignore

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/meminfo", encoding="ascii", errors="ignore") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 * 1024 * MIB


def estimate_bytes_per_target(
    support: int,
    height: int = TRAINED_SIZE,
    width: int = TRAINED_SIZE,
    element_size: int = 4,
    mode: str = "fast",
    features: int = 64,
) -> int:
    """Peak working memory one target slice adds to a batch (bytes), for ``support`` items.

    Fast path: the support stream lives at <= H/2 x W/2 (its 128x128 level is only ever held as a
    per-item chunk); the worst moment is decoder block 1 (up-sampled stream, skip, their
    concatenation, the cross half and the new stream: ~6 maps of 64 x H/2 x W/2 per item), plus
    ~12 per-target maps of 64 x H x W. Reference path: the official pair tensors at full
    resolution (the 256-channel concatenation of the last decoder block and its inputs).
    Calibrated against measured peaks (``benchmark``) with a margin.
    """
    s = max(1, int(support))
    full = features * height * width
    if mode == "reference":
        per_item = 11 * full  # 4 (cat) + 4 (inputs) + ~3 (z, stream) maps of 64ch at HxW
        return int(element_size * (per_item * s + 8 * full) * 1.15)
    half = features * (height // 2) * (width // 2)
    return int(element_size * (6.5 * half * s + 14 * full))


# --------------------------------------------------------------------------- flop counts
def _conv_flops(cin: int, cout: int, pixels: int, k: int = 3) -> float:
    return 2.0 * k * k * cin * cout * pixels


def reference_flops(
    support: int,
    height: int = TRAINED_SIZE,
    width: int = TRAINED_SIZE,
    official: bool = True,
    features: int = 64,
) -> float:
    """FLOPs (2 per multiply-add) of the plain forward pass for one target slice.

    ``official=True`` counts as the released code does (its last support conv is computed and
    thrown away): 667.6 GFLOP at S=64, 169.3 at S=16 for 128x128."""
    f, s = features, support
    total = 0.0
    res = [(height >> i) * (width >> i) for i in range(4)]
    cins = [3, 2 * f, 2 * f, 2 * f]
    for lvl, cin in zip(res, cins):  # encoder
        total += s * _conv_flops(cin, f, lvl) + _conv_flops(f, f, lvl) + s * _conv_flops(f, f, lvl)
    for j, lvl in enumerate([res[2], res[1], res[0]]):  # decoder
        last = j == 2
        total += s * _conv_flops(4 * f, f, lvl) + _conv_flops(f, f, lvl)
        if official or not last:
            total += s * _conv_flops(f, f, lvl)
    total += _conv_flops(f, 1, res[0], k=1)
    return total


def engine_flops(
    support: int,
    batch: int = 1,
    height: int = TRAINED_SIZE,
    width: int = TRAINED_SIZE,
    features: int = 64,
) -> float:
    """FLOPs the fast path executes per target slice (support-set work shared by ``batch``)."""
    f, s = features, support
    res = [(height >> i) * (width >> i) for i in range(4)]
    per_set = s * (_conv_flops(2, f, res[0]) + _conv_flops(f, f, res[0]))
    per_set += 2 * _conv_flops(f, f, res[0])  # bias / mean-support constants of block 0
    # block 0 per target: two composed 5x5 convs 1 -> 64, plus the exact border ring
    per_target = 2 * _conv_flops(1, f, res[0], k=5)
    per_target += 2 * _conv_flops(1, f, 3 * (width + height)) + 2 * _conv_flops(
        f, 2 * f, width + height
    )
    for lvl in res[1:]:
        per_target += 2 * _conv_flops(f, f, lvl)
        per_target += s * 2 * _conv_flops(f, f, lvl)
    for lvl in (res[2], res[1]):
        per_target += _conv_flops(2 * f, f, lvl) + _conv_flops(f, f, lvl)
        per_target += s * (_conv_flops(2 * f, f, lvl) + _conv_flops(f, f, lvl))
    per_target += _conv_flops(4 * f, f, res[0]) + _conv_flops(f, f, res[0])
    per_target += _conv_flops(f, 1, res[0], k=1)
    return per_target + per_set / max(1, batch)


# --------------------------------------------------------------------------- weights
@dataclass
class _Split:
    """One CrossBlock's weights, cross conv split into target half and support half."""

    wu: torch.Tensor
    wv: torch.Tensor
    bc: torch.Tensor
    wt: torch.Tensor
    bt: torch.Tensor
    ws: torch.Tensor
    bs: torch.Tensor
    w_full: torch.Tensor


@dataclass
class _Weights:
    enc: List[_Split]
    dec: List[_Split]
    wo: torch.Tensor
    bo: torch.Tensor
    #: encoder block 0, target side: [W_s; W_t] composed with W_u as one 5x5 conv (1 -> 128)
    k5: torch.Tensor
    #: [W_s; W_t] (128, 64, 3, 3) for the exact border strips
    w2: torch.Tensor


def _compose(w2: torch.Tensor, wu: torch.Tensor) -> torch.Tensor:
    """5x5 kernel of conv(conv(u, wu), w2) (both 3x3 cross-correlations, no padding effects):
    K[o, 0, a + b] = sum_c w2[o, c, b] * wu[c, 0, a]. Computed in float64."""
    w2d, wud = w2.detach().cpu().double(), wu.detach().cpu().double()  # MPS has no float64
    k = torch.zeros(w2.shape[0], 1, 5, 5, dtype=torch.float64)
    for ay in range(3):
        for ax in range(3):
            for by in range(3):
                for bx in range(3):
                    k[:, 0, ay + by, ax + bx] += w2d[:, :, by, bx] @ wud[:, 0, ay, ax]
    return k


def _split_weights(
    model: UniverSeg, device: str, dtype: torch.dtype, channels_last: bool
) -> _Weights:
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def prep(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(device=device, dtype=dtype)
        return t.contiguous(memory_format=fmt) if t.dim() == 4 else t.contiguous()

    def split(block, ct: int) -> _Split:
        w = block.cross.cross_conv.weight
        return _Split(
            prep(w[:, :ct]),
            prep(w[:, ct:]),
            prep(block.cross.cross_conv.bias),
            prep(block.target.vmapped.conv.weight),
            prep(block.target.vmapped.conv.bias),
            prep(block.support.vmapped.conv.weight),
            prep(block.support.vmapped.conv.bias),
            prep(w),
        )

    f = model.enc_blocks[0].cross.cross_conv.out_channels
    enc = [split(b, 1 if i == 0 else f) for i, b in enumerate(model.enc_blocks)]
    dec = [split(b, 2 * f) for b in model.dec_blocks]
    b0 = model.enc_blocks[0]
    w2 = torch.cat([b0.support.vmapped.conv.weight, b0.target.vmapped.conv.weight]).detach()
    k5 = _compose(w2, b0.cross.cross_conv.weight.detach()[:, :1])
    return _Weights(
        enc,
        dec,
        prep(model.out_conv.conv.weight),
        prep(model.out_conv.conv.bias),
        prep(k5),
        prep(w2),
    )


def _leaky_(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_SLOPE, inplace=True)


def _up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def _conv(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


# --------------------------------------------------------------------------- engine
class InferenceEngine:
    """Evaluates a UniverSeg network for target batches sharing one support set.

    ``mode``: ``fast`` (split cross convolutions, default) or ``reference`` (the model's plain
    forward pass, fp32: the oracle). ``precision``: ``auto`` (:func:`resolve_precision`: fp16 on
    CUDA, bf16 on CPUs with AMX, else fp32), ``fp32``, ``bf16``, ``fp16`` or ``fp64``. ``batch_size`` is the
    chunk size callers use (progress granularity); inside :meth:`logits` targets are further
    split so that a sub-batch fits ``memory_budget_mb`` (default: a share of free RAM / free CUDA
    memory). ``compile``: ``True`` (or ``UNIVERSEG_COMPILE=1``) runs the fast path through
    ``torch.compile`` for large sub-batches (>= ``COMPILE_MIN_PAIRS`` target-support pairs) of
    the first such shape; other shapes and small jobs stay eager, so the compile cost (~45 s on
    2 CPU cores, for ~10-15 % there) is never paid for tiny jobs. It needs a C++ compiler on the
    CPU; any failure falls back to eager without an error. Default off.
    """

    def __init__(
        self,
        model: UniverSeg,
        device: str = "auto",
        batch_size: Optional[int] = None,
        *,
        mode: str = "fast",
        precision: str = "auto",
        memory_budget_mb: Optional[float] = None,
        channels_last: Optional[bool] = None,
        compile: Optional[bool] = None,
    ):
        if mode not in MODES:
            raise ValueError(f"unknown engine mode {mode!r}: use one of {MODES}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
        self.device = resolve_device(device)
        self.model = model.eval().to(self.device)
        self.mode = mode
        self.is_cuda = self.device.startswith("cuda")
        if mode == "reference":
            precision = "fp64" if precision == "fp64" else "fp32"
        precision, self.precision_reason = resolve_precision(precision, self.device)
        self.precision = precision
        self.dtype = _DTYPES[precision]
        self.channels_last = (precision != "fp64") if channels_last is None else channels_last
        self.memory_budget_mb = memory_budget_mb
        self.batch_size = batch_size or (128 if self.is_cuda else 16)
        if compile is None:
            compile = os.environ.get("UNIVERSEG_COMPILE") == "1"
        self.compile = bool(compile) and mode == "fast"
        self.compile_note = "for large calls (not compiled yet)"
        self._compile_tried = False
        self._compiled_fn = None
        self._compiled_shape = None
        self._weights: Dict[torch.dtype, _Weights] = {}
        self._weights_key = None
        self._support_cache = None
        self._ref_copy = None

    # ------------------------------------------------------------------ info
    def describe(self) -> str:
        extra = ", channels_last" if self.channels_last and self.mode == "fast" else ""
        if self.compile:
            extra += f", torch.compile: {self.compile_note}"
        return (
            f"{self.mode} path on {self.device}, {self.precision}{extra} ({self.precision_reason})"
        )

    def memory_budget_bytes(self) -> int:
        """Working-memory budget for one sub-batch (bytes)."""
        if self.memory_budget_mb:
            return int(self.memory_budget_mb * MIB)
        if self.is_cuda:
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            reusable = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(
                self.device
            )
            return int(0.6 * (free + reusable))
        return int(min(0.4 * available_ram_bytes(), 6 * 1024 * MIB))

    def bytes_per_target(
        self, support: int, height: int = TRAINED_SIZE, width: int = TRAINED_SIZE
    ) -> int:
        el = torch.tensor([], dtype=self.dtype).element_size()
        return estimate_bytes_per_target(support, height, width, el, self.mode)

    def max_batch(
        self,
        support: int,
        height: int = TRAINED_SIZE,
        width: int = TRAINED_SIZE,
        budget_bytes: Optional[int] = None,
    ) -> int:
        """Largest target sub-batch whose estimated working memory fits the budget (>= 1)."""
        budget = self.memory_budget_bytes() if budget_bytes is None else int(budget_bytes)
        n = budget // max(1, self.bytes_per_target(support, height, width))
        cap = 512 if self.is_cuda else CPU_MAX_BATCH
        return int(max(1, min(cap, n)))

    # ------------------------------------------------------------------ weights
    def _params_key(self):
        return tuple((id(p), p._version) for p in self.model.parameters())

    def _get_weights(self, dtype: torch.dtype) -> _Weights:
        key = self._params_key()
        if key != self._weights_key:
            self._weights.clear()
            self._support_cache = None
            self._weights_key = key
        if dtype not in self._weights:
            self._weights[dtype] = _split_weights(
                self.model, self.device, dtype, self.channels_last
            )
        return self._weights[dtype]

    def clear_support_cache(self) -> None:
        """Forget the cached per-support-set features (benchmarks time them too)."""
        self._support_cache = None

    def refresh(self) -> None:
        """Drop cached weights and support features (after editing the model in place)."""
        self._weights.clear()
        self._weights_key = None
        self._support_cache = None

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def logits(
        self, targets: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> torch.Tensor:
        """(B,1,H,W) targets, (S,1,H,W) support -> (B,1,H,W) float32 logits on the CPU."""
        return self.raw_logits(targets, support_images, support_labels).float().cpu()

    @torch.no_grad()
    def raw_logits(
        self, targets: torch.Tensor, support_images: torch.Tensor, support_labels: torch.Tensor
    ) -> torch.Tensor:
        """Like :meth:`logits` but left in the compute dtype on the engine's device."""
        UniverSeg._check(targets, support_images, support_labels, shared=True)
        b, s = targets.shape[0], support_images.shape[0]
        h, w = targets.shape[-2:]
        if b == 0:
            return torch.zeros(0, 1, h, w, dtype=self.dtype, device=self.device)
        # sub-batches of at least 2 targets: the CPU kernels take another code path for a batch
        # of one, whose result differs in the last bits, so a lone target runs beside a copy of
        # itself -- a target's logits then never depend on which targets share its call
        step = max(2, self.max_batch(s, h, w))
        outs = []
        for i in range(0, b, step):
            chunk = targets[i : i + step]
            lone = chunk.shape[0] == 1
            if lone:
                chunk = torch.cat([chunk, chunk])
            if self.mode == "reference":
                out = self._reference(chunk, support_images, support_labels)
            else:
                out = self._fast_checked(chunk, support_images, support_labels)
            outs.append(out[:1] if lone else out)
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    # ------------------------------------------------------------------ reference
    def _reference(self, t, si, sl) -> torch.Tensor:
        dt = self.dtype
        model = self.model
        if dt != torch.float32:
            key = (dt, self._params_key())
            if self._ref_copy is None or self._ref_copy[0] != key:
                self._ref_copy = (key, copy.deepcopy(self.model).to(dt))
            model = self._ref_copy[1]
        return model.forward_shared(
            t.to(self.device, dt), si.to(self.device, dt), sl.to(self.device, dt)
        )

    # ------------------------------------------------------------------ fast path
    def _maybe_compiled(self, t, si, dt):
        """The compiled fast path for this call's shape, or None (eager)."""
        if not self.compile or dt != self.dtype:
            return None
        shape = (tuple(t.shape), tuple(si.shape))
        if self._compiled_fn is not None:
            return self._compiled_fn if shape == self._compiled_shape else None
        if self._compile_tried:
            return None  # failed before
        if t.shape[0] * si.shape[0] < COMPILE_MIN_PAIRS:
            return None  # small job: not worth the compile time
        self._compile_tried = True
        if not self.is_cuda and not has_cxx_compiler():
            self.compile_note = "no C++ compiler: eager"
            return None
        try:
            self._compiled_fn = torch.compile(self._core, dynamic=False)
            self._compiled_shape = shape
            self.compile_note = f"compiled for targets {shape[0]}, support {shape[1]}"
        except Exception as exc:  # noqa: BLE001
            self.compile_note = f"torch.compile unavailable ({type(exc).__name__}): eager"
            return None
        return self._compiled_fn

    def _fast_checked(self, t, si, sl) -> torch.Tensor:
        fn = self._maybe_compiled(t, si, self.dtype)
        out = None
        if fn is not None:
            try:
                out = self._fast(t, si, sl, self.dtype, core=fn)
            except Exception as exc:  # noqa: BLE001 - compile errors surface at first call
                self._compiled_fn = None
                self.compile_note = f"torch.compile failed ({type(exc).__name__}): eager"
        if out is None:
            out = self._fast(t, si, sl, self.dtype)
        if self.dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(out).all():
            out = self._fast(t, si, sl, torch.float32)  # overflow in half precision: redo
        return out

    def _support_features(self, si, sl, wts: _Weights, dt: torch.dtype):
        """Per-support-set part of encoder block 0 (cached while the support set is the same)."""
        c = self._support_cache
        if (
            c is not None
            and c["dtype"] == dt
            and c["shape"] == tuple(si.shape)
            and c["src"][0] is si
            and c["src"][1] is sl
            and c["ver"] == (si._version, sl._version)
        ):
            return c["feat"]
        s_in = torch.cat([si, sl], dim=1).to(self.device, dt)
        if (
            c is not None
            and c["dtype"] == dt
            and c["shape"] == tuple(si.shape)
            and torch.equal(c["input"], s_in)
        ):
            feat = c["feat"]
        else:
            if self.channels_last:
                s_in_cl = s_in.contiguous(memory_format=torch.channels_last)
            else:
                s_in_cl = s_in
            e0 = wts.enc[0]
            n = s_in.shape[0]
            cs = _conv(s_in_cl, e0.wv)  # W_v * v_i              (S,64,H,W)
            q = _conv(cs, e0.ws, e0.bs)  # W_s * (W_v*v_i) + b_s
            # the target-independent constants of block 0: W_s * b_c (zero-padded map) goes
            # into every q_i; W_t * (b_c + mean_i W_v*v_i) + b_t into the target stream
            bmap = e0.bc.view(1, -1, 1, 1).expand(1, -1, *s_in.shape[-2:])
            bmap = bmap.contiguous(
                memory_format=torch.channels_last if self.channels_last else torch.contiguous_format
            )
            q.add_(_conv(bmap, e0.ws))
            c_mean = _item_mean(cs, 1, n)
            dt_map = _conv(bmap + c_mean, e0.wt, e0.bt)
            feat = (dt_map, q)
        self._support_cache = {
            "dtype": dt,
            "shape": tuple(si.shape),
            "src": (si, sl),
            "ver": (si._version, sl._version),
            "input": s_in,
            "feat": feat,
        }
        return feat

    def _fast(self, targets, si, sl, dt, core=None) -> torch.Tensor:
        wts = self._get_weights(dt)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        dt_map, q = self._support_features(si, sl, wts, dt)
        t = targets.to(self.device, dt).contiguous(memory_format=fmt)
        return (core or self._core)(t, dt_map, q, dt)

    def _core(self, t, dt_map, q, dt) -> torch.Tensor:
        """Everything per target: (B,1,H,W) targets + the support set's block-0 features."""
        wts = self._weights[dt]
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        b, s = t.shape[0], q.shape[0]
        e0 = wts.enc[0]

        # ---- encoder block 0 (support half shared by all targets): per target only
        # [W_s; W_t] * (W_u * u), as one 5x5 conv of the 1-channel target (exact borders)
        p, t0 = _enc0_target(t, e0.wu, wts.k5, wts.w2, fmt)  # p + q_i: support pre-act.
        t0 = _leaky_(t0.add_(dt_map))  # target stream
        s_mean0, s_cur = _pair_stage(p, q, (256 if self.is_cuda else 16) * MIB)
        del p
        t_skips = [t0]
        s_skips = []
        t_cur = _maxpool2(t0)
        # ---- encoder blocks 1..3
        for k in range(1, len(wts.enc)):
            t_new, s_new = _cross_block(t_cur, s_cur, wts.enc[k], b, s)
            del s_cur
            if k < len(wts.enc) - 1:
                t_skips.append(t_new)
                s_skips.append(s_new)
                t_cur, s_cur = _maxpool2(t_new), _maxpool2(s_new)
            else:
                t_cur, s_cur = t_new, s_new
        # ---- decoder blocks 0..1 (full pair work), then the last one on means only
        for j in range(len(wts.dec) - 1):
            t_in = _cat_channels([_up(t_cur), t_skips.pop()], fmt)
            s_up = _up(s_cur)
            del s_cur
            s_in = _cat_channels([s_up, s_skips.pop()], fmt)
            del s_up
            t_cur, s_cur = _cross_block(t_in, s_in, wts.dec[j], b, s)
            del s_in, t_in
        blk = wts.dec[-1]
        s_mean = _item_mean(s_cur, b, s)
        del s_cur
        t_skip = t_skips.pop()
        # the last block at full resolution, a few targets at a time: its 256-channel input is
        # the largest tensor of the network (16 MiB a target in fp32); a target's logits do not
        # depend on the targets beside it, so the result is the same
        step = b if self.is_cuda else LAST_BLOCK_TARGETS
        outs = []
        for i in range(0, b, step):
            part = slice(i, i + step)
            x = _cat_channels(
                [_up(t_cur[part]), t_skip[part], _up(s_mean[part]), s_mean0[part]], fmt
            )
            z = _conv(x, blk.w_full, blk.bc)
            del x
            t_last = _leaky_(_conv(z, blk.wt, blk.bt))
            del z
            outs.append(_out_conv(t_last, wts.wo, wts.bo))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


# --------------------------------------------------------------------------- helpers
def _enc0_target(
    u: torch.Tensor,
    wu: torch.Tensor,
    k5: torch.Tensor,
    w2: torch.Tensor,
    fmt=torch.contiguous_format,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """conv(conv(u, wu, pad 1), w2, pad 1) for a 1-channel u, exactly, split into the first and
    second half of w2's output channels.

    Inside, the two 3x3 convolutions compose into one 5x5 conv (``k5``); on the 1-pixel border
    ring the inner result's zero padding differs from the composition, so the ring is computed
    the long way from 3-pixel strips."""
    h, w = u.shape[-2:]
    f = w2.shape[0] // 2
    if h < 3 or w < 3:
        x = _conv(_conv(u, wu), w2)
        return x[:, :f].contiguous(memory_format=fmt), x[:, f:].contiguous(memory_format=fmt)
    if u.device.type == "cpu" and fmt == torch.channels_last and u.dtype == torch.float32:
        # as matrix products of the 5x5 patches: the result is channels_last as it comes (a
        # convolution of one channel returns NCHW, and converting it cost more than the
        # convolution itself); in fp32 the same sums in the same order (checked bit for bit;
        # not in bf16, where the convolution stays)
        n = u.shape[0]
        patches = F.unfold(u, 5, padding=2).transpose(1, 2).reshape(n * h * w, 25)
        kernel = k5.reshape(2 * f, 25)
        outs = tuple(
            torch.matmul(patches, kernel[sl].t()).view(n, h, w, f).permute(0, 3, 1, 2)
            for sl in (slice(0, f), slice(f, 2 * f))
        )
    else:
        outs = (
            F.conv2d(u, k5[:f], padding=2).contiguous(memory_format=fmt),
            F.conv2d(u, k5[f:], padding=2).contiguous(memory_format=fmt),
        )
    a = F.conv2d(u[:, :, 0:3], wu, padding=1)[:, :, 0:2]  # inner rows 0, 1
    top = F.conv2d(F.pad(a, (1, 1, 1, 0)), w2)
    a = F.conv2d(u[:, :, h - 3 : h], wu, padding=1)[:, :, 1:3]  # rows h-2, h-1
    bottom = F.conv2d(F.pad(a, (1, 1, 0, 1)), w2)
    a = F.conv2d(u[:, :, :, 0:3], wu, padding=1)[:, :, :, 0:2]  # cols 0, 1
    left = F.conv2d(F.pad(a, (1, 0, 1, 1)), w2)
    a = F.conv2d(u[:, :, :, w - 3 : w], wu, padding=1)[:, :, :, 1:3]  # cols w-2, w-1
    right = F.conv2d(F.pad(a, (0, 1, 1, 1)), w2)
    for x, sl in zip(outs, (slice(0, f), slice(f, 2 * f))):
        x[:, :, 0:1] = top[:, sl]
        x[:, :, h - 1 : h] = bottom[:, sl]
        x[:, :, :, 0:1] = left[:, sl]
        x[:, :, :, w - 1 : w] = right[:, sl]
    return outs


def _out_conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The output layer, a 1x1 convolution C -> 1, as a product and a sum over the channels in
    fp32 (fp64 for fp64; then rounded to ``x``'s dtype, as the convolution rounds).

    Not ``F.conv2d``: oneDNN picks its kernel for this shape from the batch size and the number
    of threads, and the kernels add the channels in different orders (measured on an AMD EPYC,
    fp32, one thread: a batch of 16 gave other last bits than a batch of 8). An elementwise
    product and a reduction over the contiguous channel axis add them in one fixed order for
    every pixel, so a target's logit does not depend on the batch or the thread count."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.permute(0, 2, 3, 1)  # (B, H, W, C): a view for channels_last
    y = xf.to(acc) * w.reshape(1, 1, 1, -1).to(acc)
    out = y.sum(dim=-1, keepdim=True).add_(b.to(acc).reshape(1, 1, 1, -1))
    return out.permute(0, 3, 1, 2).to(x.dtype)


def _cat_channels(parts: List[torch.Tensor], fmt) -> torch.Tensor:
    """Concatenate on channels into a tensor of memory format ``fmt`` (torch.cat falls back to
    NCHW when one input's layout differs, and the conversion afterwards costs a full pass)."""
    n, _, h, w = parts[0].shape
    c = sum(p.shape[1] for p in parts)
    out = torch.empty((n, c, h, w), dtype=parts[0].dtype, device=parts[0].device, memory_format=fmt)
    o = 0
    for p in parts:
        out[:, o : o + p.shape[1]] = p
        o += p.shape[1]
    return out


def _is_cl(x: torch.Tensor) -> bool:
    return (
        x.dim() == 4
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def _flat_items(x: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """(B*S, C, h, w) in memory order -> a (B, S, C*h*w) view (channels_last or contiguous)."""
    if _is_cl(x):
        return x.permute(0, 2, 3, 1).reshape(b, s, -1)
    return x.contiguous().view(b, s, -1)


def _unflat(y: torch.Tensor, like: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`_flat_items` for ``n`` items shaped like ``like``'s items."""
    c, h, w = like.shape[1:]
    if _is_cl(like):
        return y.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return y.reshape(n, c, h, w)


def _item_mean(x: torch.Tensor, b: int, s: int) -> torch.Tensor:
    """Mean over the S items of each target: (B*S, C, h, w) -> (B, C, h, w), same layout.
    A matrix product: far faster than a strided reduction over dim 1 on the CPU."""
    flat = _flat_items(x, b, s)
    ones = torch.full((1, s), 1.0, dtype=x.dtype, device=x.device)
    m = torch.matmul(ones, flat)  # (B, 1, M), accumulated in fp32 by the BLAS
    m.mul_(1.0 / s)
    return _unflat(m, x, b)


def _maxpool2(x: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """2x2 max-pool (no indices), written into ``out`` when given. (Maxima are exact: any way
    of computing them gives the same bits; on an AMD EPYC oneDNN's pooling was 3x faster than
    maxima of strided views.)"""
    if out is not None:
        out.copy_(F.max_pool2d(x, 2))
        return out
    return F.max_pool2d(x, 2)


def _cross_block(t_in, s_in, blk: _Split, b: int, s: int):
    """One CrossBlock with the cross conv split: t_in (B,C,h,w), s_in (B*S,C,h,w)."""
    a = _conv(t_in, blk.wu, blk.bc)  # target half + bias, once per target
    z = _conv(s_in, blk.wv)  # support half, per (target, item)
    zf = _flat_items(z, b, s)
    zf.add_(_flat_items(a, b, 1))
    t_new = _leaky_(_conv(_item_mean(z, b, s), blk.wt, blk.bt))
    s_new = _leaky_(_conv(z, blk.ws, blk.bs))
    return t_new, s_new


def _pair_stage(p: torch.Tensor, q: torch.Tensor, chunk_bytes: int = 16 * MIB):
    """s0[b,i] = leaky(p[b] + q[i]) for every pair: returns (mean_i s0 (B,C,H,W),
    maxpool2(s0) (B*S,C,H/2,W/2)) without holding all full-resolution pairs at once
    (one reused chunk buffer: fresh large allocations cost page faults on every call)."""
    b, c, h, w = p.shape
    s = q.shape[0]
    per_item = c * h * w * p.element_size()
    step = int(max(1, min(s, chunk_bytes // per_item)))
    fmt = torch.channels_last if _is_cl(q) else torch.contiguous_format
    buf = torch.empty((step, c, h, w), dtype=p.dtype, device=p.device, memory_format=fmt)
    pooled = torch.empty(
        (b * s, c, h // 2, w // 2), dtype=p.dtype, device=p.device, memory_format=fmt
    )
    acc_dt = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
    sums = torch.empty((b, 1, c * h * w), dtype=acc_dt, device=p.device)
    ones = torch.ones((1, step), dtype=p.dtype, device=p.device)
    pf = _flat_items(p, b, 1)
    for bi in range(b):
        for i in range(0, s, step):
            n = min(step, s - i)
            x = buf[:n]
            torch.add(q[i : i + n], p[bi : bi + 1], out=x)
            _leaky_(x)
            if i == 0 and sums.dtype == x.dtype:
                torch.matmul(ones[:, :n], _flat_items(x, 1, n)[0], out=sums[bi])
            else:
                part = torch.matmul(ones[:, :n], _flat_items(x, 1, n)[0])  # (1, M)
                if i == 0:
                    sums[bi].copy_(part)
                else:
                    sums[bi].add_(part)
            _maxpool2(x, out=pooled[bi * s + i : bi * s + i + n])
    del pf
    mean = _unflat((sums * (1.0 / s)).to(p.dtype), buf, b)  # sums are in buf's memory order
    return mean, pooled
