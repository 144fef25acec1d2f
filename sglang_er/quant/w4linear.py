"""``W4Linear``: a 4-bit grouped weight linear layer; the one place a W4 kernel is chosen.

Kernels (``W4Linear.kernel`` names the one in use, ``kernel_reason`` says why):

``"cpu_int4pack"``
    torch's tinygemm on the CPU (:mod:`sglang_er.quant.int4pack`: layouts, shape rules, and the float
    zero ``(8 - z) * scale`` our integer zero point becomes). Chosen automatically for bf16 / fp16
    activations; fp32 only on request (``kernel="cpu_int4pack"``), because ``(q-8)*s + (8-z)*s`` is
    not bit-identical to ``(q-z)*s`` and float32 models are our exactness reference.
``"marlin"``  (CUDA, fp16 / bf16; NOT exercised by the CPU test-suite)
    SGLang's AWQ-Marlin: ``awq_marlin_repack`` + ``marlin_permute_scales`` +
    ``awq_to_marlin_zero_points`` at build time, ``gptq_marlin_gemm(..., scalar_types.uint4)`` at
    run time, exactly as ``AWQMarlinLinearKernel`` does. The kernel's own thread tiles
    (``gptq_marlin.cuh``: (k, n) in {(128, 128), (64, 128), (128, 64), (64, 256)}) need
    N % 64 == 0 and either K % 128 == 0 or (K % 64 == 0 and N % 128 == 0); SGLang's Python
    check (K % 128) is stricter than the kernel. Where only N is off we pad N with zero rows and
    slice the output (SmolLM2's K=576 layers), otherwise fall back.
``"cuda_int4pack"``  (CUDA sm80+, bf16; NOT exercised by the CPU test-suite)
    torch's tinygemm on CUDA (``_weight_int4pack_mm``, same module, same zero trick): chosen where
    Marlin is not (SGLang absent, or Marlin refuses the shape), so a W4 drafter needs only torch.
``"torch"``
    Dequantize (exactly :meth:`QuantizedTensor.dequantize`) then ``F.linear``. Used for float32
    activations and for shapes / devices no kernel takes. Dequantizing on every call costs far
    more than the matmul (~60x for a 1-token step), so by default this path keeps the
    dequantized weight in ``act_dtype`` (``cache_dequantized``): as fast as the float layer and
    as large, but numerically the W4 weight. Inputs whose dtype or device does not match the
    buffers also take this path, dequantizing on the fly.

The module keeps a compact copy of the quantized weight (two nibbles per byte, fp32 scales,
uint8 zeros) next to the kernel's packed copy: it is the source of truth for
:meth:`dequantize` and the fallback. :meth:`requantize_` rewrites every buffer in place so that
captured CUDA graphs keep pointing at valid data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sglang_er.engine import kernels
from sglang_er.quant import int4pack
from sglang_er.quant.quantizer import QuantizedTensor, choose_group_size, pack_awq, quantize_rtn

logger = logging.getLogger(__name__)

__all__ = ["W4Linear", "select_kernel", "marlin_padded_n", "cpu_int4pack_supports", "SLOW_KERNELS"]

# Kernels that run exactly but make no fast drafter, and what to do about it (logged at start).
SLOW_KERNELS = {
    "cuda_int4pack": "torch's int4 CUDA kernel is at most 10 % faster than bf16 below 7B-sized layers on an H200 "
    "(eval/results/gpu-check-h200.md), so speculation will rarely pay; install SGLang with its CUDA "
    "kernels (sgl_kernel) so that AWQ-Marlin is used",
    "torch": "the drafter runs dequantized weights, as large and slow as the target's, so speculation "
    "will rarely pay; a bf16 or fp16 model on a CPU or an sm80+ GPU gets a 4-bit kernel",
}

KERNELS = ("cpu_int4pack", "cuda_int4pack", "marlin", "torch")

_MARLIN_GROUPS = (32, 64, 128)
cpu_int4pack_supports = int4pack.cpu_supports


def marlin_padded_n(n: int, k: int, group_size: int) -> int | None:
    """Smallest N' >= n Marlin accepts for this K and group, or None if K itself is refused."""
    if group_size not in _MARLIN_GROUPS or k % group_size != 0:
        return None
    if k % 128 == 0:
        return -(-n // 64) * 64
    if k % 64 == 0:
        return -(-n // 128) * 128
    return None


def _marlin_available() -> bool:
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    if torch.cuda.get_device_capability()[0] < 8:
        return False
    return kernels.marlin_importable()


def select_kernel(device: torch.device, act_dtype: torch.dtype, n: int, k: int, group_size: int) -> tuple[str, str]:
    """``(kernel, reason)`` for a weight [n, k] living on ``device`` fed ``act_dtype`` inputs."""
    if device.type == "cpu":
        if act_dtype not in (torch.bfloat16, torch.float16):
            return "torch", f"{act_dtype} activations use the exact dequantize+matmul path"
        if not cpu_int4pack_supports(n, k, group_size):
            return "torch", f"int4pack_mm_for_cpu refuses N={n}, K={k}, group={group_size}"
        return "cpu_int4pack", "CPU bf16/fp16"
    if device.type == "cuda":
        if act_dtype not in (torch.bfloat16, torch.float16):
            return "torch", f"the W4 CUDA kernels need fp16/bf16 activations, got {act_dtype}"
        if marlin_padded_n(n, k, group_size) is None:
            no_marlin = f"Marlin refuses K={k} with group={group_size}"
        elif not _marlin_available():
            no_marlin = "SGLang's Marlin unavailable (no sm80+ CUDA or its import failed)"
        else:
            return "marlin", "CUDA fp16/bf16: SGLang's Marlin"
        if act_dtype != torch.bfloat16:
            return "torch", f"{no_marlin}; torch's int4 CUDA kernel takes bf16 only"
        if not int4pack.cuda_device_ok():
            return "torch", f"{no_marlin}; torch's int4 CUDA kernel needs NVIDIA sm80+"
        if not int4pack.cuda_supports(n, k, group_size):
            return "torch", f"{no_marlin}; torch's int4 CUDA kernel refuses N={n}, K={k}, group={group_size}"
        return "cuda_int4pack", f"{no_marlin}: torch's int4 CUDA kernel (tinygemm)"
    return "torch", f"no W4 kernel for device {device.type}"


def _pack_rows_u4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] (0..15) -> uint8 [N, K // 2]; even column in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack_rows_u4(p: torch.Tensor) -> torch.Tensor:
    n, k2 = p.shape
    return torch.stack((p & 0xF, p >> 4), dim=-1).reshape(n, k2 * 2)


class W4Linear(nn.Module):
    """``y = x @ dequant(Q).T + b`` with Q a grouped 4-bit weight [N, K].

    With an ``input_scale`` s [K] (AWQ), Q quantizes ``W · diag(s)`` and the layer computes
    ``(x / s) @ dequant(Q).T + b``.

    Build with :meth:`from_float`; ``act_dtype`` is the activation dtype the kernel buffers are
    prepared for (other dtypes take the torch path).
    """

    def __init__(
        self,
        qt: QuantizedTensor,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        act_dtype: torch.dtype = torch.bfloat16,
        kernel: str | None = None,
        quantizer: Callable[[torch.Tensor, int], QuantizedTensor] = quantize_rtn,
        validate: bool = True,
        cache_dequantized: bool | None = None,
    ):
        super().__init__()
        n, k = qt.shape
        self.in_features, self.out_features = k, n
        self.group_size = qt.group_size
        self.act_dtype = act_dtype
        self.quantizer = quantizer
        device = qt.q.device

        self.register_buffer("q_u4", _pack_rows_u4(qt.q))
        self.register_buffer("scales", qt.scales.to(torch.float32).clone())
        self.register_buffer("zeros", qt.zeros.to(torch.uint8).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().to(device, act_dtype).clone())
        self.register_buffer(
            "input_scale",
            None if input_scale is None else input_scale.detach().to(device, torch.float32).clone(),
        )

        self.register_buffer("w_dequant", None)
        if kernel is None:
            kernel, reason = select_kernel(device, act_dtype, n, k, self.group_size)
        else:
            if kernel not in KERNELS:
                raise ValueError(f"unknown kernel {kernel!r}; expected one of {KERNELS}")
            reason = "requested"
            if kernel == "cpu_int4pack" and not (device.type == "cpu" and cpu_int4pack_supports(n, k, self.group_size)):
                raise ValueError(f"cpu_int4pack cannot run N={n}, K={k}, group={self.group_size} on {device}")
            if kernel == "cuda_int4pack" and not (
                device.type == "cuda" and int4pack.cuda_supports(n, k, self.group_size)
            ):
                raise ValueError(f"cuda_int4pack cannot run N={n}, K={k}, group={self.group_size} on {device}")
            if kernel == "marlin" and marlin_padded_n(n, k, self.group_size) is None:
                raise ValueError(f"marlin cannot run K={k}, group={self.group_size}")
        self.kernel = kernel
        self.kernel_reason = reason
        self._n_pad = n

        if kernel != "torch":
            try:
                for name, t in self._kernel_buffers(qt).items():
                    self.register_buffer(name, t)
                if validate:
                    self._validate_kernel()
            except Exception as e:  # a kernel that cannot build or disagrees must not be used
                logger.warning("W4Linear [%d, %d]: %s unusable (%s); using torch", n, k, kernel, e)
                for name in list(self._buffers):
                    if name.startswith(("int4_", "marlin_")):
                        del self._buffers[name]
                self.kernel, self.kernel_reason = "torch", f"{kernel} failed: {e}"
                self._n_pad = n
        if cache_dequantized is None:
            cache_dequantized = self.kernel == "torch"
        if cache_dequantized:
            self.w_dequant = qt.dequantize(torch.float32).to(act_dtype)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int | None = None,
        input_scale: torch.Tensor | None = None,
        *,
        act_dtype: torch.dtype | None = None,
        kernel: str | None = None,
        quantizer: Callable[[torch.Tensor, int], QuantizedTensor] = quantize_rtn,
        validate: bool = True,
        cache_dequantized: bool | None = None,
    ) -> W4Linear:
        """Quantize ``weight [N, K]`` (bias [N], input_scale [K]) on ``weight.device``.

        ``group_size`` defaults to :func:`choose_group_size` (K); ``act_dtype`` to the weight's
        dtype (bf16/fp16/fp32) -- i.e. the dtype the model runs in.
        """
        weight = weight.detach()
        g = choose_group_size(weight.shape[1]) if group_size is None else group_size
        if act_dtype is None:
            act_dtype = (
                weight.dtype if weight.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32
            )
        qt = quantizer(cls._scaled(weight, input_scale), g)
        return cls(qt, bias, input_scale, act_dtype, kernel, quantizer, validate, cache_dequantized)

    @staticmethod
    def _scaled(weight: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
        if input_scale is None:
            return weight
        return weight.to(torch.float32) * input_scale.to(weight.device, torch.float32)[None, :]

    def _kernel_buffers(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
        """Kernel-specific packed tensors for ``qt``; same shapes every call (for in-place reloads)."""
        if self.kernel in ("cpu_int4pack", "cuda_int4pack"):
            pack = int4pack.pack_cpu if self.kernel == "cpu_int4pack" else int4pack.pack_cuda
            return {"int4_packed": pack(qt.q), "int4_scale_zeros": int4pack.scale_zeros(qt, self.act_dtype)}
        if self.kernel == "marlin":  # pragma: no cover - CUDA only
            return self._marlin_buffers(qt)
        return {}

    def _marlin_buffers(self, qt: QuantizedTensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        # CUDA only, untested on the CPU CI: mirrors AWQMarlinLinearKernel.process_weights_after_loading.
        awq_marlin_repack, awq_to_marlin_zero_points, marlin_make_workspace, marlin_permute_scales = (
            kernels.marlin_repack_ops()
        )

        n, k, g = self.out_features, self.in_features, self.group_size
        n_pad = marlin_padded_n(n, k, g)
        if n_pad != n:
            # Zero rows (q = z = 0) contribute exactly 0; the output is sliced back to N.
            pad = n_pad - n
            qt = QuantizedTensor(
                F.pad(qt.q, (0, 0, 0, pad)),
                F.pad(qt.scales, (0, 0, 0, pad), value=1.0),
                F.pad(qt.zeros, (0, 0, 0, pad)),
                g,
            )
        self._n_pad = n_pad
        qweight, qzeros, scales = pack_awq(qt, scale_dtype=self.act_dtype)
        dev = qweight.device
        out = {
            "marlin_qweight": awq_marlin_repack(qweight, size_k=k, size_n=n_pad, num_bits=4),
            "marlin_scales": marlin_permute_scales(scales, size_k=k, size_n=n_pad, group_size=g),
            "marlin_zp": awq_to_marlin_zero_points(qzeros, size_k=k // g, size_n=n_pad, num_bits=4),
        }
        if not hasattr(self, "marlin_workspace"):
            out["marlin_workspace"] = marlin_make_workspace(dev)
            out["marlin_g_idx"] = torch.empty(0, dtype=torch.int32, device=dev)
            out["marlin_perm"] = torch.empty(0, dtype=torch.int32, device=dev)
        return out

    @torch.no_grad()
    def _validate_kernel(self) -> None:
        """Run the kernel once against dequantize+matmul; raise if it errors or disagrees."""
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(3, self.in_features, generator=gen).to(self.q_u4.device, self.act_dtype)
        y = self._forward_kernel(x)
        ref = self._forward_torch(x.float())
        err = (y.float() - ref).norm() / ref.norm().clamp_min(1e-6)
        if not torch.isfinite(err) or err > 2e-2:
            raise RuntimeError(f"kernel output differs from dequantized reference (rel err {float(err):.3g})")

    # ------------------------------------------------------------------ in-place reload
    @torch.no_grad()
    def requantize_(
        self,
        weight: torch.Tensor,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        weight_scale: torch.Tensor | None = None,
    ) -> None:
        """Re-quantize from ``weight [N, K]`` with this layer's quantizer, in place.

        ``weight_scale`` s [K]: quantize ``W · diag(s)`` with no run-time division (AWQ with
        ``1/s`` folded into the preceding norm). Every buffer keeps its storage (captured graphs stay
        valid). A layer built without an input scale cannot gain one (the graph would not contain the
        division): build it with ``input_scale=torch.ones(K)`` to reserve one. ``input_scale=None`` on a layer that has
        one resets it to ones. Buffers created under ``torch.inference_mode`` can only be
        updated under it too (torch forbids in-place updates of inference tensors outside).
        """
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != {(self.out_features, self.in_features)}")
        if input_scale is not None and self.input_scale is None:
            raise ValueError("this W4Linear was built without input_scale; rebuild it with input_scale=ones(K)")
        if input_scale is None and self.input_scale is not None:
            input_scale = torch.ones_like(self.input_scale)
        if input_scale is not None and weight_scale is not None:
            raise ValueError("pass input_scale (divided at run time) or weight_scale (folded elsewhere), not both")
        w = weight.detach().to(self.q_u4.device)
        col = input_scale if input_scale is not None else weight_scale
        if self.quantizer is quantize_rtn:
            qt = quantize_rtn(w, self.group_size, col_scale=col)
        else:
            qt = self.quantizer(self._scaled(w, col), self.group_size)
        self.load_quantized_(qt, input_scale, bias)

    @torch.no_grad()
    def load_quantized_(
        self,
        qt: QuantizedTensor,
        input_scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """Copy an already-quantized weight into the existing buffers (same rules as requantize_)."""
        if qt.shape != (self.out_features, self.in_features) or qt.group_size != self.group_size:
            raise ValueError(
                f"quantized weight {qt.shape} group {qt.group_size} does not match "
                f"{(self.out_features, self.in_features)} group {self.group_size}"
            )
        if input_scale is not None:
            if self.input_scale is None:
                raise ValueError("this W4Linear was built without input_scale")
            self.input_scale.copy_(input_scale)
        elif self.input_scale is not None:
            self.input_scale.fill_(1.0)
        qt = qt.to(self.q_u4.device)
        self.q_u4.copy_(_pack_rows_u4(qt.q))
        self.scales.copy_(qt.scales)
        self.zeros.copy_(qt.zeros)
        if bias is not None:
            if self.bias is None:
                raise ValueError("this W4Linear has no bias")
            self.bias.copy_(bias)
        for name, t in self._kernel_buffers(qt).items():
            if name in ("marlin_workspace", "marlin_g_idx", "marlin_perm"):
                continue
            getattr(self, name).copy_(t)
        if self.w_dequant is not None:
            self.w_dequant.copy_(qt.dequantize(torch.float32))

    # ------------------------------------------------------------------ compute
    def quantized(self) -> QuantizedTensor:
        """The stored weight as a :class:`QuantizedTensor` (unpacked; [N, K])."""
        return QuantizedTensor(_unpack_rows_u4(self.q_u4), self.scales, self.zeros, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized weight [N, K] (of ``W · diag(input_scale)`` when an input scale is set)."""
        return self.quantized().dequantize(dtype)

    def _forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w_dequant
        if w is None or w.dtype != x.dtype or w.device != x.device:
            w = self.dequantize(torch.float32).to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w, b)

    def _forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        k, n = self.in_features, self.out_features
        x2 = x if x.dim() == 2 else x.reshape(-1, k)
        if not x2.is_contiguous():  # the kernels read a dense row-major [M, K]
            x2 = x2.contiguous()
        if self.kernel == "cpu_int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.int4_packed, self.group_size, self.int4_scale_zeros)
        elif self.kernel == "cuda_int4pack":  # pragma: no cover - CUDA only
            if x2.shape[0] == 0:  # an empty grid is not a valid launch
                return x.new_empty(*x.shape[:-1], n)
            y = torch.ops.aten._weight_int4pack_mm(x2, self.int4_packed, self.group_size, self.int4_scale_zeros)
        else:  # pragma: no cover - CUDA only
            y = self._marlin_mm(x2)
        if self.bias is not None:
            y.add_(self.bias)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)

    def _marlin_mm(self, x2: torch.Tensor) -> torch.Tensor:  # pragma: no cover - CUDA only
        gptq_marlin_gemm, uint4 = kernels.marlin_gemm_and_uint4()
        y = gptq_marlin_gemm(
            x2,
            None,
            self.marlin_qweight,
            self.marlin_scales,
            None,
            self.marlin_zp,
            self.marlin_g_idx,
            self.marlin_perm,
            self.marlin_workspace,
            uint4,
            size_m=x2.shape[0],
            size_n=self._n_pad,
            size_k=self.in_features,
            is_k_full=True,
            use_atomic_add=False,
            use_fp32_reduce=True,
            is_zp_float=False,
        )
        if self._n_pad != self.out_features:
            y = y[:, : self.out_features].contiguous()
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] in x's dtype."""
        if self.input_scale is not None:
            x = (x / self.input_scale).to(x.dtype)
        if (
            self.kernel != "torch"
            and x.dtype == self.act_dtype
            and x.device.type == ("cpu" if self.kernel == "cpu_int4pack" else "cuda")
        ):
            return self._forward_kernel(x)
        return self._forward_torch(x)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, "
            f"input_scale={self.input_scale is not None}, act_dtype={self.act_dtype}, "
            f"kernel={self.kernel}"
        )
