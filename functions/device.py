"""The device a stage computes on: which ONNX Runtime providers a `--provider` asks for, the checks
that refuse a silent CPU fallback, the session options every stage session gets, memory copies on
the device (the KV store's primitive), and the GPU memory figures for the metrics. Nothing here
imports a CUDA library unless CUDA was asked for.

ONNX Runtime falls back to the CPU without an error when the CUDA provider cannot start (the
`onnxruntime` package has none, or the CUDA libraries are missing): a stage asked for CUDA checks
both what the package offers before it starts and what the session really uses once it is built.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Protocol

CUDA_EP = "CUDAExecutionProvider"
CPU_EP = "CPUExecutionProvider"
CUDA_INSTALL_HINT = "install requirements/cuda.txt (onnxruntime-gpu) instead of onnxruntime"
# the shared objects of the CUDA runtime, newest first (onnxruntime-gpu 1.31 links CUDA 13)
CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")
_DEVICE_TO_DEVICE = 3  # cudaMemcpyDeviceToDevice


class ProviderError(RuntimeError):
    """The provider asked for is not the one ONNX Runtime can use; the message is one line."""


def session_providers(provider: str) -> list[str]:
    """The execution providers an ONNX Runtime session gets for `--provider cpu|cuda`."""
    return [CUDA_EP, CPU_EP] if provider == "cuda" else [CPU_EP]


def require_available(provider: str) -> None:
    """Before anything loads: the installed onnxruntime offers the provider asked for."""
    if provider != "cuda":
        return
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA_EP not in available:
        raise ProviderError(
            f"--provider cuda: onnxruntime {ort.__version__} has no {CUDA_EP} "
            f"(available: {', '.join(available)}); {CUDA_INSTALL_HINT}"
        )


def require_in_session(provider: str, in_use: list[str]) -> None:
    """After the session is built: it really runs on the provider asked for (never a silent CPU
    fallback, which ONNX Runtime does when the CUDA libraries cannot be loaded)."""
    if provider == "cuda" and CUDA_EP not in in_use:
        raise ProviderError(
            f"--provider cuda: the ONNX Runtime session came up with {', '.join(in_use)} only "
            "(the CUDA or cuDNN libraries could not be loaded; see the ONNX Runtime warning above)"
        )


def preload_cuda_libraries() -> None:
    """onnxruntime-gpu finds the CUDA and cuDNN libraries of NVIDIA's pip packages only when asked
    to (a machine or image without a system CUDA)."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


class Copier(Protocol):
    """Copies between buffers of one device, by address (what a KV store moves rows with)."""

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        """`height` rows of `width` bytes; rows `spitch` bytes apart at src, `dpitch` at dst."""

    def zero(self, ptr: int, nbytes: int) -> None: ...


class HostCopier:
    """Copies in host memory: the device store's primitive on the CPU provider (and in tests)."""

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        if width == 0:
            return
        if dpitch == spitch == width:
            ctypes.memmove(dst, src, width * height)
            return
        for row in range(height):
            ctypes.memmove(dst + row * dpitch, src + row * spitch, width)

    def zero(self, ptr: int, nbytes: int) -> None:
        if nbytes:
            ctypes.memset(ptr, 0, nbytes)


class CudaCopier:
    """Device-to-device copies with the CUDA runtime (synchronous: ONNX Runtime has finished its
    run when the store copies, and the copy is done before the next run binds the result)."""

    def __init__(self) -> None:
        self.rt = cuda_runtime()
        if self.rt is None:
            raise ProviderError(f"the CUDA runtime ({', '.join(CUDART_NAMES)}) could not be loaded")

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            self.rt.cudaGetErrorString.restype = ctypes.c_char_p
            raise RuntimeError(f"{what}: {self.rt.cudaGetErrorString(code).decode()} (error {code})")

    def copy2d(self, dst: int, dpitch: int, src: int, spitch: int, width: int, height: int) -> None:
        if width == 0 or height == 0:
            return
        size = ctypes.c_size_t
        code = self.rt.cudaMemcpy2D(
            ctypes.c_void_p(dst),
            size(dpitch),
            ctypes.c_void_p(src),
            size(spitch),
            size(width),
            size(height),
            ctypes.c_int(_DEVICE_TO_DEVICE),
        )
        self._check(code, "cudaMemcpy2D")

    def zero(self, ptr: int, nbytes: int) -> None:
        if nbytes:
            self._check(
                self.rt.cudaMemset(ctypes.c_void_p(ptr), ctypes.c_int(0), ctypes.c_size_t(nbytes)),
                "cudaMemset",
            )


@functools.cache
def cuda_runtime() -> Any:
    """The CUDA runtime library (already in the process once onnxruntime-gpu loaded it), or None."""
    for name in CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def gpu_memory(device_id: int = 0) -> tuple[int, int] | None:
    """(used, total) bytes of the GPU, every process included; None without a CUDA runtime."""
    rt = cuda_runtime()
    if rt is None:
        return None
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if rt.cudaSetDevice(ctypes.c_int(device_id)) != 0:
        return None
    if rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        return None
    return total.value - free.value, total.value


def gpu_name(device_id: int = 0) -> str | None:
    """The GPU's name from the CUDA driver (no nvidia-smi), or None."""
    try:
        drv = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    dev, buf = ctypes.c_int(), ctypes.create_string_buffer(256)
    if drv.cuInit(0) != 0 or drv.cuDeviceGet(ctypes.byref(dev), device_id) != 0:
        return None
    if drv.cuDeviceGetName(buf, len(buf), dev) != 0:
        return None
    return buf.value.decode(errors="replace")


def session_options(threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # Several stage processes share few cores: spinning threads would steal them (findings s4).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts
