"""The extension, the run-time report and the benchmarks' machine probes."""

from __future__ import annotations

import functools
import inspect

import torch

from vllm_gdn_cpu import _C  # noqa: F401  (loads the extension, registers torch.ops.vllm_gdn_cpu)

_ops = torch.ops.vllm_gdn_cpu

ISA_ENV = "VLLM_GDN_CPU_ISA"
GEMM_ENV = "VLLM_GDN_CPU_GEMM"
# Caps what the CPU is taken to support (tests emulating an older CPU), see kernels/common/runtime.h.
MAX_ISA_ENV = "VLLM_GDN_CPU_MAX_ISA"


def runtime_info() -> dict:
    """What the kernels run on now (honouring VLLM_GDN_CPU_ISA / VLLM_GDN_CPU_GEMM).

    isa: vector ISA of all kernels; gemm: GEMM engine of the chunked prefill ("-fp32" when it does
    not use bf16 products); available_*: what this build and CPU can run, best first.
    """
    fields = dict(item.split("=", 1) for item in _ops.runtime_info().split(";"))
    return {
        "isa": fields["isa"],
        "gemm": fields["gemm"],
        "available_isas": fields["available"].split(","),
        "available_gemms": fields["gemms"].split(","),
        "threads": int(fields["threads"]),
    }


def register_fake(name: str):
    """``torch.library.register_fake`` for op ``vllm_gdn_cpu::name``, refusing real tensors off the CPU.

    The fake implementation is what torch.compile's FakeTensors (CPU tensors) trace through; torch
    also serves it for the ``meta`` device, where a call would otherwise return uninitialised memory
    and write nothing. Such a call raises ValueError naming the argument instead.
    """

    def decorate(fn):
        names = list(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def fake(*args, **kwargs):
            for arg, value in [*zip(names, args), *kwargs.items()]:
                if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                    raise ValueError(f"{name}: argument '{arg}' must be a CPU tensor, got one on {value.device}")
            return fn(*args, **kwargs)

        torch.library.register_fake(f"vllm_gdn_cpu::{name}")(fake)
        return fn

    return decorate


def tensor_arguments(fn):
    """For the ops' Python wrappers: when a call fails, an argument that is not a tensor (None for a
    required one, a number, a list) is named in a TypeError instead of the error it caused deeper
    down ("tensor does not have a device", an AttributeError...). Costs nothing on calls that work."""
    sig = inspect.signature(fn)
    required = [n for n, p in sig.parameters.items() if p.annotation == "torch.Tensor"]
    optional = [n for n, p in sig.parameters.items() if p.annotation == "Optional[torch.Tensor]"]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (TypeError, AttributeError, RuntimeError, ValueError) as exc:
            try:
                given = sig.bind(*args, **kwargs).arguments
            except TypeError:
                raise exc from None
            for name in required + optional:
                if name not in given or isinstance(given[name], torch.Tensor):
                    continue
                if name in optional and given[name] is None:
                    continue
                what = "a torch.Tensor" + (" or None" if name in optional else "")
                raise TypeError(f"{fn.__name__}: argument '{name}' must be {what}, got "
                                f"{type(given[name]).__name__}") from exc
            raise

    return wrapper


def default_scale(K: int, scale) -> float:
    """The attention scale: ``scale``, or K^-1/2 for heads of K channels (K = 0 is left to the op's
    check, which names the argument)."""
    if scale is not None:
        return float(scale)
    return float(K) ** -0.5 if K > 0 else 1.0


# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor tracing.
@register_fake("stream_scale")
def _stream_scale_fake(x, factor):
    return None


@torch.library.register_fake("vllm_gdn_cpu::gemm_probe")
def _gemm_probe_fake(bf16, seconds):
    return torch.empty(torch.get_num_threads(), dtype=torch.float64)


def stream_scale_(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x *= factor in place (float32, contiguous), streamed like the decode kernel streams states.
    Not a GDN op: the benchmarks' probe of in-place memory bandwidth. Returns x."""
    _ops.stream_scale(x, float(factor))
    return x


def gemm_probe(bf16: bool = True, seconds: float = 0.5) -> torch.Tensor:
    """GFLOP/s of each of torch's threads running the prefill's GEMM engine (the active
    VLLM_GDN_CPU_GEMM path, in bf16 mode where it has one when bf16) on its own L2-resident
    chunk-sized operands, all threads at once, for `seconds`. Not a GDN op: the benchmarks' probe of
    per-core compute alone (one thread) and with every core busy. Returns float64 [threads]."""
    return _ops.gemm_probe(bool(bf16), float(seconds))
