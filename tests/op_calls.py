"""One small, valid call of every op that writes a state pool or an output, built from a recipe, so
the hostile-input tests (test_hostile_inputs.py) can corrupt one argument at a time.

``build(op, decays)`` returns an ``OpCall``: the public wrapper, its keyword arguments (fp32, an
explicit ``out``), which arguments are state pools and which tensors the op writes with arithmetic
(outputs and recurrent states; a conv state is only shifted, so copies of its values are not counted).

decays:
  "strong"  per-token log-decays of -2 to -20 nats, as trained checkpoints' fast heads reach
  "neutral" decay exactly 1 and nothing added to the state (k = 0 or dt = 0), states filled with
            denormals: every value the op computes from them is a denormal unless the op flushes
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_gdn_cpu import ops

SLOTS = 4
IDX = [2, 0]  # slots 1 and 3 are never named
SEQLENS = [5, 4]
DENORMAL = 1e-39
SENTINEL = 7.25


@dataclass
class OpCall:
    name: str
    fn: object
    kwargs: dict
    pools: list[str]
    written: list[str]
    scalars: dict = field(default_factory=dict)  # float arguments the math needs finite: name -> bad-value kwargs

    def __call__(self, **over):
        args = dict(self.kwargs)
        args.update(over)
        return self.fn(**args)

    def clone(self) -> "OpCall":
        kw = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in self.kwargs.items()}
        return OpCall(self.name, self.fn, kw, self.pools, self.written, self.scalars)


def _idx(n=len(IDX)):
    return torch.tensor(IDX[:n], dtype=torch.int32)


def _cu(seqlens=SEQLENS):
    return torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)


def _pool(shape, decays, gen):
    """A state pool: the named slots hold denormals (neutral) or values of scale 0.1; the others a
    sentinel."""
    s = torch.full((SLOTS, *shape), SENTINEL)
    for slot in IDX:
        s[slot] = DENORMAL if decays == "neutral" else 0.1 * torch.randn(shape, generator=gen)
    return s


def build(op: str, decays: str = "strong", seed: int = 0) -> OpCall:
    gen = torch.Generator().manual_seed(seed)
    neutral = decays == "neutral"

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    T, N = sum(SEQLENS), len(IDX)
    if op in ("chunk_gated_delta_rule", "chunk_kda"):
        Hk, Hv, K, V = (1, 2, 16, 16) if op == "chunk_gated_delta_rule" else (2, 2, 16, 16)
        k = torch.zeros(T, Hk, K) if neutral else randn(T, Hk, K)
        if op == "chunk_gated_delta_rule":
            g = torch.zeros(T, Hv) if neutral else -torch.linspace(2.0, 20.0, Hv).expand(T, Hv).contiguous()
        else:
            g = torch.zeros(T, Hv, K) if neutral else -torch.linspace(2.0, 20.0, K).expand(T, Hv, K).contiguous()
        kw = dict(q=randn(T, Hk, K), k=k, v=randn(T, Hv, V), g=g, beta=torch.sigmoid(randn(T, Hv)),
                  state=_pool((Hv, K, V), decays, gen), state_indices=_idx(), cu_seqlens=_cu(),
                  out=torch.empty(T, Hv, V))
        fn = getattr(ops, op)
        return OpCall(op, fn, kw, ["state"], ["out", "state"], {"scale": [float("inf"), float("nan")]})
    if op == "fused_recurrent_gated_delta_rule":
        Hk, Hv, K, V = 1, 2, 16, 16
        kw = dict(q=randn(N, Hk, K), k=torch.zeros(N, Hk, K) if neutral else randn(N, Hk, K), v=randn(N, Hv, V),
                  A_log=torch.full((Hv,), -100.0) if neutral else torch.linspace(0.7, 1.6, Hv),
                  dt_bias=torch.zeros(Hv), a=torch.full((N, Hv), 4.0), b=randn(N, Hv),
                  state=_pool((Hv, K, V), decays, gen), state_indices=_idx(), out=torch.empty(N, Hv, V))
        return OpCall(op, ops.fused_recurrent_gated_delta_rule, kw, ["state"], ["out", "state"],
                      {"scale": [float("inf"), float("nan")], "softplus_beta": [float("nan"), float("inf")]})
    if op == "fused_recurrent_kda":
        H, K, V = 2, 16, 16
        kw = dict(q=randn(N, H, K), k=torch.zeros(N, H, K) if neutral else randn(N, H, K), v=randn(N, H, V),
                  A_log=torch.full((H,), -100.0) if neutral else torch.linspace(0.7, 1.6, H),
                  dt_bias=torch.zeros(H * K), f=torch.full((N, H, K), 4.0), b=randn(N, H),
                  state=_pool((H, K, V), decays, gen), state_indices=_idx(), out=torch.empty(N, H, V))
        return OpCall(op, ops.fused_recurrent_kda, kw, ["state"], ["out", "state"],
                      {"scale": [float("inf"), float("nan")], "lower_bound": [float("nan"), float("-inf")]})
    if op == "gdn_decode_step":
        Hk, Hv, K, V, W = 1, 2, 16, 16, 4
        D = 2 * Hk * K + Hv * V
        kw = dict(mixed_qkv=torch.zeros(N, D) if neutral else randn(N, D), conv_weight=randn(D, W), conv_bias=None,
                  conv_state=torch.zeros(SLOTS, W - 1, D) if neutral else _pool((W - 1, D), decays, gen),
                  A_log=torch.full((Hv,), -100.0) if neutral else torch.linspace(0.7, 1.6, Hv),
                  dt_bias=torch.zeros(Hv), a=torch.full((N, Hv), 4.0), b=randn(N, Hv),
                  ssm_state=_pool((Hv, K, V), decays, gen), state_indices=_idx(), num_k_heads=Hk, head_k_dim=K,
                  head_v_dim=V, out=torch.empty(N, Hv, V))
        return OpCall(op, ops.gdn_decode_step, kw, ["conv_state", "ssm_state"], ["out", "ssm_state"],
                      {"scale": [float("inf"), float("nan")]})
    if op == "causal_conv1d":
        D, W = 24, 4
        kw = dict(x=torch.zeros(T, D) if neutral else randn(T, D),
                  weight=torch.ones(D, W) if neutral else randn(D, W), bias=None,
                  conv_state=_pool((W - 1, D), decays, gen), state_indices=_idx(), cu_seqlens=_cu(),
                  out=torch.empty(T, D))
        return OpCall(op, ops.causal_conv1d, kw, ["conv_state"], ["out"])
    if op in ("mamba2_chunk_scan", "mamba2_state_update"):
        H, P, G, Nst = 2, 8, 1, 16
        rows = T if op == "mamba2_chunk_scan" else N
        kw = dict(x=randn(rows, H, P), dt=torch.zeros(rows, H) if neutral else torch.full((rows, H), 2.0),
                  A=-torch.linspace(1.0, 10.0, H), B=randn(rows, G, Nst), C=randn(rows, G, Nst), D=None, dt_bias=None,
                  state=_pool((H, P, Nst), decays, gen), state_indices=_idx(), dt_softplus=not neutral,
                  out=torch.empty(rows, H, P))
        if op == "mamba2_chunk_scan":
            kw["cu_seqlens"] = _cu()
        return OpCall(op, getattr(ops, op), kw, ["state"], ["out", "state"],
                      {"dt_limit": [(float("nan"), 1.0), (float("inf"), float("inf")), (0.0, float("nan"))]})
    if op in ("selective_scan", "selective_state_update"):
        Dm, Nst = 24, 16
        rows = T if op == "selective_scan" else N
        kw = dict(x=randn(rows, Dm), dt=torch.zeros(rows, Dm) if neutral else torch.full((rows, Dm), 2.0),
                  A=-torch.linspace(1.0, 10.0, Nst).expand(Dm, Nst).contiguous(), B=randn(rows, Nst),
                  C=randn(rows, Nst), D=None, z=None, dt_bias=None, state=_pool((Dm, Nst), decays, gen),
                  state_indices=_idx(), dt_softplus=not neutral, out=torch.empty(rows, Dm))
        if op == "selective_scan":
            kw["cu_seqlens"] = _cu()
        return OpCall(op, getattr(ops, op), kw, ["state"], ["out", "state"])
    raise KeyError(op)


STATE_OPS = ["chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule", "gdn_decode_step", "causal_conv1d",
             "mamba2_chunk_scan", "mamba2_state_update", "selective_scan", "selective_state_update", "chunk_kda",
             "fused_recurrent_kda"]


def caller_flushes() -> bool:
    """Whether the calling thread flushes denormals now (torch.set_flush_denormal's setting)."""
    return (torch.tensor([DENORMAL]) * 1.0).item() == 0.0
