"""What every replaced vLLM layer shares: the activation log line, the conv activations our kernels
fuse, the conv taps in our kernels' form and the speculative-decoding conv step."""

from __future__ import annotations

import torch

from vllm.forward_context import get_forward_context
from vllm.logger import init_logger
from vllm.utils.torch_utils import _resolve_layer_name
from vllm.v1.attention.backends.utils import NULL_BLOCK_ID

from vllm_gdn_cpu import ops

# Under vLLM's logger namespace so the line goes through vLLM's handlers and format (vLLM configures
# only the "vllm" logger tree).
logger = init_logger("vllm.plugins.vllm_gdn_cpu")

# Conv activations our causal conv1d kernels apply (value: fused SiLU).
CONV_ACTIVATIONS = {"silu": True, "swish": True, None: False}

_logged_classes: set[str] = set()


def op_slots(indices: torch.Tensor) -> torch.Tensor:
    """vLLM's state indices (a metadata column) as every family's ops take them: int32, contiguous,
    padding as -1. vLLM pads with NULL_BLOCK_ID (block 0, never a request's; its kernels skip it) or
    PAD_SLOT_ID (-1); ours skip negative slots: zero output, no state read or written."""
    indices = indices.to(torch.int32)
    return torch.where(indices == NULL_BLOCK_ID, -1, indices).contiguous()


def log_activation(vllm_class: str, **fields: str) -> None:
    """Logs, once per process and replaced vLLM layer class, the line naming that class and the
    kernels' ISA, GEMM path and threads, then ``fields`` (e.g. which projections run on our
    small-batch engine). Called from the layer's ``__init__``: vLLM loads plugins before it
    configures its logging, so a line from ``register()`` would be dropped, and the layer is where
    our kernels really run."""
    if vllm_class not in _logged_classes:
        _logged_classes.add(vllm_class)
        logger.info(activation_message(vllm_class, **fields))


def activation_message(vllm_class: str, **fields: str) -> str:
    info = _runtime_info()
    described = [f"{key}={info.get(key, 'unknown')}" for key in ("isa", "gemm", "threads")]
    described += [f"{key}={value}" for key, value in fields.items()]
    return f"vllm_gdn_cpu: CPU kernels for {vllm_class} ({', '.join(described)})"


def _runtime_info() -> dict:
    from vllm_gdn_cpu import ops

    try:
        return dict(ops.runtime_info())
    except Exception:  # a log line must never take the engine down: its fields then say "unknown"
        return {}


class CPUConvWeights:
    """For layers with a depthwise ``conv1d`` (vLLM's GDN and Mamba2 layers): its taps in the form
    our causal conv1d kernels read."""

    def _plain_conv_weight(self) -> torch.Tensor:
        """The conv taps as [D, W]. On CPUs with AVX512-BF16 (or Arm bf16) vLLM repacks a bf16
        width-4 conv1d weight in place at load time for its own conv kernel and keeps the plain copy
        as ``_cpu_unpacked_conv_weight`` (model_executor/layers/utils.py:
        dispatch_cpu_unquantized_gemm)."""
        unpacked = getattr(self.conv1d, "_cpu_unpacked_conv_weight", None)
        if unpacked is not None:
            return unpacked
        weight = self.conv1d.weight
        if weight.dim() != 3 or weight.shape[1] != 1:
            raise RuntimeError(
                f"vllm_gdn_cpu: unexpected conv1d weight layout {tuple(weight.shape)} in {self.prefix}"
            )
        return weight.squeeze(1)

    def _conv_weight_for_ops(self) -> torch.Tensor:
        """The conv taps as a [D, W] view of a tap-major ([W, D]) float32 copy, the form our conv
        kernels read: passing it makes the ops' conversion a no-op (converting and transposing the
        bf16 taps cost ~70 us per layer and step, a sixth of a batch-16 GDN decode step's core).
        Rebuilt whenever the weight tensor changes."""
        weight = self._plain_conv_weight()
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        cached = getattr(self, "_tap_major_conv_weight", None)
        if cached is None or cached[0] != key:
            cached = (key, weight.detach().float().t().contiguous())
            self._tap_major_conv_weight = cached
        return cached[1].t()


def spec_decode_conv(conv_buffer, x, weight, bias, silu, cu, base_slot, accepted, where: str) -> torch.Tensor:
    """The causal conv1d of speculative-decoding rows over vLLM's rolling conv buffer, for every
    family (semantics of vLLM's ``causal_conv1d_update`` with ``num_accepted_tokens``).

    conv_buffer [slots, W-1+S, D]: row i's buffer is slot ``base_slot[i]`` (< 0: padding, left
    alone); x [T, D] the rows' tokens back to back (``cu`` [N+1], q_i = 1 + drafts tokens each);
    ``accepted[i]`` = a tokens of row i's previous step were accepted, so the W-1 inputs before this
    step's first token are ``B[a-1 : a-1+W-1]``. Afterwards ``B[0 : W-2+q_i] = prior[1:] ++ x``: the
    history ending at token t is ``B[t : t+W-1]`` and the next step again reads at its a-1 (for
    q_i = S+1 exactly vLLM's layout; still right when a row has fewer drafts). Returns the conv
    output [T, D] (our conv op over the gathered priors)."""
    num_seqs = cu.numel() - 1
    lengths = cu.diff()
    num_tokens, dim = x.shape
    history = weight.shape[1] - 1
    q_max = int(lengths.max())
    if history - 1 + q_max > conv_buffer.shape[1]:
        raise RuntimeError(
            f"vllm_gdn_cpu: {q_max} speculative tokens do not fit a conv buffer of {conv_buffer.shape[1]} "
            f"columns in {where}"
        )
    real = base_slot >= 0
    slot0 = base_slot.clamp(min=0)
    cols = (accepted - 1).clamp(min=0)[:, None] + torch.arange(history)  # [N, W-1]
    prior = conv_buffer[slot0[:, None], cols]  # [N, W-1, D] (a copy)
    prior = torch.where(real[:, None, None], prior, 0).contiguous()
    conv_out = ops.causal_conv1d(
        x, weight, bias, prior.clone(), torch.where(real, torch.arange(num_seqs), -1).to(torch.int32),
        cu.to(torch.int32), silu=silu,
    )
    # Roll: B[0 : W-2+q_max] = (prior[1:] ++ x padded with zeros); columns past W-2+q_i are unused.
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), lengths, output_size=num_tokens)
    pos_in_seq = torch.arange(num_tokens) - cu[seq_of_token]
    padded = torch.zeros(num_seqs, q_max, dim, dtype=conv_buffer.dtype)
    padded[seq_of_token, pos_in_seq] = x.to(conv_buffer.dtype)
    rolled = torch.cat([prior[:, 1:].to(conv_buffer.dtype), padded], dim=1)
    conv_buffer[slot0[real], : rolled.shape[1]] = rolled[real]
    return conv_out


def spec_decode_states(ssm_state, spec_idx, accepted, cu, out, step) -> None:
    """The state part of speculative decoding, for every family: row i starts from slot
    ``spec_idx[i, a-1]`` (a = ``accepted[i]``, the state after the last accepted token of its
    previous step) and the state after its token t is kept in slot ``spec_idx[i, t]``. One call of
    ``step(rows, slots)`` per draft position (at most S+1; never a loop over sequences or prompt
    tokens), each after copying the previous position's slot into this one's: ``rows`` [N] are the
    token rows of position t, ``slots`` [N] int32 the slots to update (-1 where row i has no token
    t, or is padding); ``step`` returns the [N, ...] outputs, of which the real ones go to ``out``."""
    lengths = cu.diff()
    num_tokens = out.shape[0]
    real = spec_idx[:, 0] >= 0
    src = spec_idx.gather(1, (accepted - 1).clamp(min=0)[:, None]).squeeze(1)
    for t in range(int(lengths.max())):
        active = (lengths > t) & real
        dst = spec_idx[:, t]
        copy = active & (src != dst)
        if bool(copy.any()):
            ssm_state[dst[copy]] = ssm_state[src[copy]]
        rows = (cu[:-1] + t).clamp(max=max(num_tokens - 1, 0))
        step_out = step(rows, torch.where(active, dst, -1).to(torch.int32))
        out[rows[active]] = step_out[active]
        src = torch.where(active, dst, src)


def step_layer_and_metadata(layer_name):
    """For a layer's core custom op: (the layer, its attention metadata in this step), or None when
    there is nothing to do (profile / dummy runs bind no state and leave the output zero; a step
    without metadata for this layer, as vLLM's own mamba layers skip it)."""
    forward_context = get_forward_context()
    layer = forward_context.no_compile_layers[_resolve_layer_name(layer_name)]
    attn_metadata = forward_context.attn_metadata
    if attn_metadata is None:
        return None
    if not isinstance(attn_metadata, dict):
        raise TypeError(
            f"vllm_gdn_cpu: expected per-layer attention metadata (a dict), got {type(attn_metadata)}"
        )
    metadata = attn_metadata.get(layer.prefix)
    return None if metadata is None else (layer, metadata)

