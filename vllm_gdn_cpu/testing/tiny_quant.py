"""Quantized copies of the tiny checkpoints, in the on-disk formats vLLM reads (no hub, no quantizer
package): the random weights of a saved checkpoint are quantized here and written as

* ``compressed-tensors`` (llm-compressor's format), one checkpoint that may give different layers
  different schemes (``config_groups`` with regex targets, global format ``mixed-precision``):

  - ``w8a8``: int8 weight, one scale per output channel (``weight`` int8 [N, K], ``weight_scale``
    [N, 1]), int8 activations quantized per token at run time (format ``int-quantized``);
  - ``w4a16-g128`` / ``w4a16-channel``: symmetric 4-bit weight (uint4b8: q + 8 in a nibble), one
    scale per 128 inputs of a row or per row (``weight_packed`` int32 [N, K/8] packed along K,
    ``weight_scale`` [N, K/g], ``weight_shape``; format ``pack-quantized``), activations unquantized;

* ``gptq`` (AutoGPTQ): symmetric 4-bit, ``qweight`` int32 [K/8, N] packed along K (q + 8),
  ``qzeros`` [G, N/8] (7s: GPTQ's zero - 1), fp16 ``scales`` [G, N], ``g_idx`` [K];
* ``awq`` (AutoAWQ GEMM): asymmetric 4-bit, ``qweight`` int32 [K, N/8] packed along N in AWQ's
  nibble order (0 2 4 6 1 3 5 7), ``qzeros`` [G, N/8] likewise, fp16 ``scales`` [G, N];
* ``fp8-block`` (as Qwen publishes FP8 models): ``weight`` float8_e4m3fn [N, K], float32
  ``weight_scale_inv`` [ceil(N/128), ceil(K/128)] (the dequantization factor per 128x128 block),
  ``quant_method: fp8``, ``weight_block_size: [128, 128]``, dynamic activations.

Each writer also returns the dequantized weights (float32; the stored scales rounded to their stored
dtype first), which the tests load into Hugging Face's model for the reference forward: vLLM's
quantized model and HF's are then the same function up to activation rounding.

Which weights are quantized: ``rules``, a list of (regex over the module name, scheme), first match
wins; unmatched weights stay as they are (compressed-tensors then serves them unquantized; GPTQ
finds its quantized modules by dtype; AWQ and FP8 list the rest in ``modules_to_not_convert``).

CLI: ``python -m vllm_gdn_cpu.testing.tiny_quant SRC DST FORMAT [--rule REGEX=SCHEME ...]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import torch

FORMATS = ("compressed-tensors", "gptq", "awq", "fp8-block")
CT_SCHEMES = ("w8a8", "w4a16-g128", "w4a16-channel")
GROUP = 128
FP8_BLOCK = 128
FP8_MAX = 448.0  # float8_e4m3fn
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ nibble j holds column AWQ_ORDER[j] of its 8
_CHECKPOINT = "model.safetensors"


@dataclass
class QuantizedCheckpoint:
    directory: Path
    # module name -> scheme ("w8a8", "w4a16-g128", "gptq-g128", "awq-g128", "fp8-block", ...)
    schemes: dict[str, str] = field(default_factory=dict)
    # "<module>.weight" -> the dequantized float32 weight (what the quantized model computes with)
    dequantized: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------------------- quantizers


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).to(torch.float32)


def quantize_int8_channel(w: torch.Tensor, scale_dtype: torch.dtype = torch.float32):
    """Symmetric int8 per output row: (q int8 [N, K], scale [N, 1], dequantized fp32)."""
    w = w.to(torch.float32)
    scale = _round_to(w.abs().amax(dim=1, keepdim=True).clamp_min(1e-8) / 127.0, scale_dtype)
    q = torch.round(w / scale).clamp(-128, 127)
    return q.to(torch.int8), scale.to(scale_dtype), q * scale


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if k % g:
        raise ValueError(f"tiny_quant: K={k} is not a multiple of the group size {g}")
    return w.reshape(n, k // g, g)


def quantize_int4_symmetric(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype):
    """Symmetric 4-bit in [-8, 7] per group of ``group_size`` inputs (-1: per row):
    (q int32 [N, K] in -8..7, scale [N, G], dequantized fp32 [N, K])."""
    grouped = _groups(w.to(torch.float32), group_size)
    scale = _round_to(grouped.abs().amax(dim=2, keepdim=True).clamp_min(1e-8) / 7.0, scale_dtype)
    q = torch.round(grouped / scale).clamp(-8, 7)
    return (q.reshape(w.shape).to(torch.int32), scale.squeeze(2).to(scale_dtype),
            (q * scale).reshape(w.shape))


def quantize_int4_asymmetric(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype):
    """Asymmetric 4-bit (AWQ): q in 0..15, zero in 0..15 per group, w ~ (q - zero) * scale:
    (q int32 [N, K], scale [N, G], zero int32 [N, G], dequantized fp32 [N, K])."""
    grouped = _groups(w.to(torch.float32), group_size)
    lo = grouped.amin(dim=2, keepdim=True).clamp(max=0.0)
    hi = grouped.amax(dim=2, keepdim=True).clamp(min=0.0)
    scale = _round_to(((hi - lo) / 15.0).clamp_min(1e-8), scale_dtype)
    zero = torch.round(-lo / scale).clamp(0, 15)
    q = (torch.round(grouped / scale) + zero).clamp(0, 15)
    return (q.reshape(w.shape).to(torch.int32), scale.squeeze(2).to(scale_dtype),
            zero.squeeze(2).to(torch.int32), ((q - zero) * scale).reshape(w.shape))


def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK):
    """float8_e4m3fn with one float32 scale per block x block tile (edges partial):
    (q [N, K] float8_e4m3fn, scale_inv [ceil(N/b), ceil(K/b)] float32, dequantized fp32)."""
    w = w.to(torch.float32)
    n, k = w.shape
    bn, bk = -(-n // block), -(-k // block)
    padded = torch.zeros(bn * block, bk * block)
    padded[:n, :k] = w
    tiles = padded.reshape(bn, block, bk, block)
    scale = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8) / FP8_MAX  # [bn, bk]
    full = scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:n, :k]
    q = (w / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale, q.to(torch.float32) * full


# ------------------------------------------------------------------------------------- packing


def pack_int4(values: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Packs nibbles (int 0..15) 8 to an int32 along ``dim``: nibble j (bits 4j..4j+3) of each
    word holds element ``order[j]`` of its 8."""
    moved = values.movedim(dim, -1).to(torch.int64)
    if moved.shape[-1] % 8:
        raise ValueError(f"tiny_quant: {moved.shape[-1]} values along dim {dim}: not a multiple of 8")
    words = moved.reshape(*moved.shape[:-1], -1, 8)[..., list(order)]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (words << shifts).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed.movedim(-1, dim).contiguous()


def unpack_int4(packed: torch.Tensor, dim: int, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """Inverse of ``pack_int4`` (int32 nibbles 0..15)."""
    moved = packed.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (moved.unsqueeze(-1) >> shifts) & 0xF
    values = torch.empty_like(nibbles)
    values[..., list(order)] = nibbles
    return values.reshape(*moved.shape[:-1], -1).to(torch.int32).movedim(-1, dim).contiguous()


# ------------------------------------------------------------------------------------- writers


def _ct_scheme_config(scheme: str, targets: list[str]) -> dict:
    if scheme == "w8a8":
        return {
            "targets": targets, "format": "int-quantized",
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel",
                        "dynamic": False, "group_size": None, "observer": "minmax"},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                                  "dynamic": True, "group_size": None, "observer": None},
            "output_activations": None,
        }
    group = scheme == "w4a16-g128"
    return {
        "targets": targets, "format": "pack-quantized",
        "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                    "strategy": "group" if group else "channel", "group_size": GROUP if group else None,
                    "dynamic": False, "observer": "minmax", "actorder": None},
        "input_activations": None, "output_activations": None,
    }


def _ct_tensors(module: str, w: torch.Tensor, scheme: str, scale_dtype: torch.dtype):
    if scheme == "w8a8":
        q, scale, deq = quantize_int8_channel(w, scale_dtype)
        return {f"{module}.weight": q, f"{module}.weight_scale": scale}, deq
    q, scale, deq = quantize_int4_symmetric(w, GROUP if scheme == "w4a16-g128" else -1, scale_dtype)
    return {
        f"{module}.weight_packed": pack_int4(q + 8, dim=1),
        f"{module}.weight_scale": scale,
        f"{module}.weight_shape": torch.tensor(list(w.shape), dtype=torch.int64),
    }, deq


def _gptq_tensors(module: str, w: torch.Tensor, group_size: int):
    # Scales rounded to bf16 and stored as fp16 (exact): vLLM casts them to the model dtype.
    q, scale, deq = quantize_int4_symmetric(w, group_size, torch.bfloat16)  # [N, K], [N, G]
    n, k = w.shape
    g = k if group_size == -1 else group_size
    return {
        f"{module}.qweight": pack_int4((q + 8).t(), dim=0),  # [K/8, N]
        f"{module}.qzeros": pack_int4(torch.full((k // g, n), 7, dtype=torch.int32), dim=1),
        f"{module}.scales": scale.t().to(torch.float16).contiguous(),  # [G, N]
        f"{module}.g_idx": torch.arange(k, dtype=torch.int32) // g,
    }, deq


def _awq_tensors(module: str, w: torch.Tensor, group_size: int):
    q, scale, zero, deq = quantize_int4_asymmetric(w, group_size, torch.bfloat16)
    return {
        f"{module}.qweight": pack_int4(q.t(), dim=1, order=AWQ_ORDER),  # [K, N/8]
        f"{module}.qzeros": pack_int4(zero.t(), dim=1, order=AWQ_ORDER),  # [G, N/8]
        f"{module}.scales": scale.t().to(torch.float16).contiguous(),  # [G, N]
    }, deq


def _fp8_tensors(module: str, w: torch.Tensor):
    q, scale_inv, deq = quantize_fp8_block(w)
    return {f"{module}.weight": q, f"{module}.weight_scale_inv": scale_inv}, deq


def _scheme_for(module: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, scheme in rules:
        if re.fullmatch(pattern, module):
            return scheme
    return None


def quantize_checkpoint(
    src: Union[str, Path],
    dst: Union[str, Path],
    fmt: str,
    rules: list[tuple[str, str]],
    *,
    group_size: int = GROUP,
    scale_dtype: torch.dtype = torch.bfloat16,
    not_convert: list[str] | None = None,
) -> QuantizedCheckpoint:
    """Writes ``dst``: ``src`` (a saved checkpoint: config.json + model.safetensors, tokenizer and
    generation config copied along) with the 2-D ``.weight`` tensors of the modules ``rules``
    select quantized in ``fmt`` (one of FORMATS). For compressed-tensors a rule's scheme is one of
    CT_SCHEMES; for the other formats it is ignored (the format is the scheme; ``group_size`` -1
    is per-channel for gptq/awq). ``scale_dtype``: compressed-tensors' stored scale dtype (vLLM
    casts it to the model dtype; bf16 for bf16 engines keeps the reference exact). ``not_convert``
    (AWQ / FP8): the ``modules_to_not_convert`` substrings instead of the unselected modules' full
    names (vLLM matches them against its own module names, which its weight mapper may rename)."""
    from safetensors.torch import load_file, save_file

    if fmt not in FORMATS:
        raise ValueError(f"tiny_quant: fmt={fmt!r}: expected one of {', '.join(FORMATS)}")
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():
        if path.is_file() and path.name != _CHECKPOINT:
            shutil.copy(path, dst / path.name)
    tensors = load_file(src / _CHECKPOINT)
    result = QuantizedCheckpoint(dst)
    out: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for name, tensor in tensors.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        scheme = _scheme_for(module, rules) if module and tensor.dim() == 2 else None
        if scheme is None:
            out[name] = tensor
            if module and tensor.dim() == 2 and "embed" not in module:
                skipped.append(module)
            continue
        if fmt == "compressed-tensors":
            if scheme not in CT_SCHEMES:
                raise ValueError(f"tiny_quant: scheme {scheme!r} for {module}: expected one of {CT_SCHEMES}")
            written, deq = _ct_tensors(module, tensor, scheme, scale_dtype)
        elif fmt == "gptq":
            written, deq = _gptq_tensors(module, tensor, group_size)
            scheme = f"gptq-{'channel' if group_size == -1 else f'g{group_size}'}"
        elif fmt == "awq":
            written, deq = _awq_tensors(module, tensor, group_size)
            scheme = f"awq-{'channel' if group_size == -1 else f'g{group_size}'}"
        else:
            written, deq = _fp8_tensors(module, tensor)
            scheme = "fp8-block"
        out.update(written)
        result.schemes[module] = scheme
        result.dequantized[name] = deq
    if not result.schemes:
        raise ValueError(f"tiny_quant: no weight of {src} matches the rules {rules}")
    save_file(out, dst / _CHECKPOINT, metadata={"format": "pt"})

    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = _quant_config(fmt, rules, result, skipped if not_convert is None else not_convert,
                                                  group_size)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return result


def _quant_config(fmt: str, rules, result: QuantizedCheckpoint, skipped: list[str], group_size: int) -> dict:
    if fmt == "compressed-tensors":
        # One group per rule that selected something, in rule order: vLLM takes the first target
        # that matches a module (over all groups in order), as the rules' first match here.
        used = [(pattern, scheme) for pattern, scheme in rules
                if any(_scheme_for(m, rules) == scheme and re.fullmatch(pattern, m) for m in result.schemes)]
        return {
            "quant_method": "compressed-tensors", "format": "mixed-precision",
            "quantization_status": "compressed", "ignore": ["lm_head"],
            "config_groups": {f"group_{i}": _ct_scheme_config(scheme, [f"re:{pattern}"])
                              for i, (pattern, scheme) in enumerate(used)},
        }
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                "sym": True, "lm_head": False, "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": sorted(skipped) + ["lm_head"]}
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "modules_to_not_convert": sorted(skipped) + ["lm_head"]}


def load_dequantized(model: torch.nn.Module, checkpoint: QuantizedCheckpoint) -> torch.nn.Module:
    """Copies the dequantized weights into a Hugging Face model of the source checkpoint; every one
    must land. Names as in the checkpoint, or (checkpoints written in a model's original naming,
    e.g. Kimi-Linear's ``self_attn.f_a_proj`` for HF's ``self_attn.forget_gate.f_a_proj``) the one
    parameter under the same parent module with the same last two name components."""
    params = dict(model.named_parameters())

    def target(name: str) -> str | None:
        if name in params:
            return name
        parent, tail = name.rsplit(".", 2)[0] + ".", "." + ".".join(name.split(".")[-2:])
        found = [p for p in params if p.startswith(parent) and p.endswith(tail)]
        return found[0] if len(found) == 1 else None

    targets = {name: target(name) for name in checkpoint.dequantized}
    missing = [name for name, t in targets.items() if t is None]
    if missing:
        raise KeyError(f"tiny_quant: the model has no parameters {missing}")
    with torch.no_grad():
        for name, weight in checkpoint.dequantized.items():
            params[targets[name]].copy_(weight.to(params[targets[name]].dtype))
    return model


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("format", choices=FORMATS)
    parser.add_argument("--rule", action="append", default=[],
                        help="REGEX=SCHEME over module names (default: every 2-D weight but lm_head, w8a8)")
    parser.add_argument("--group-size", type=int, default=GROUP)
    args = parser.parse_args(argv)
    rules = [tuple(r.rsplit("=", 1)) for r in args.rule] or [(r"(?!lm_head).*", "w8a8")]
    result = quantize_checkpoint(args.src, args.dst, args.format, rules, group_size=args.group_size)
    for module, scheme in result.schemes.items():
        print(f"{module}: {scheme}")


if __name__ == "__main__":
    main()


__all__ = ["CT_SCHEMES", "FORMATS", "QuantizedCheckpoint", "load_dequantized", "pack_int4",
           "quantize_checkpoint", "unpack_int4"]
