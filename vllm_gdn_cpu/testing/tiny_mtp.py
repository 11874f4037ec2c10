"""A tiny Qwen3-Next checkpoint WITH a multi-token-prediction (MTP) head, built locally.

The base model is the tiny random Qwen3-Next of ``tiny_models`` (same seed, same weights). Hugging
Face transformers ignores ``mtp.*`` weights, so the head is written here, beside the base weights in
``model.safetensors``, under the names vLLM's ``qwen3_next_mtp.py`` loads, and ``config.json``
gains ``num_nextn_predict_layers = 1`` (the field vLLM's speculative config reads).

The head computes what vLLM's ``Qwen3NextMultiTokenPredictor`` does: at position i it takes the
embedding of token i+1 (the base model's table, shared) and the base model's final (normed) hidden
state at i, computes ``fc([pre_fc_norm_embedding(e) | pre_fc_norm_hidden(h)])``, one full-attention
Qwen3-Next decoder layer (vLLM builds it as layer 0, so here an MoE layer: ``mlp_only_layers`` =
[1, 2, 3]), the final ``mtp.norm`` and the base model's ``lm_head`` (shared), and drafts token i+2.
vLLM's second draft (``num_speculative_tokens = 2``) runs the head again at position i+1 on the
first draft token and the head's own output at i, attending to the first pass's keys and values.
Built from Hugging Face's own Qwen3-Next modules (zero-centred RMSNorm, gated attention with q/k
norms and partial RoPE, sparse MoE with a gated shared expert), which compute what vLLM's do.

What the head is fitted to. The base model is a random network whose next token depends chaotically
on the whole context: measured on this model, the best a function of the current token alone gets
right is 0.4% (held-out, 32k positions), and a head fitted for a few hundred steps to greedy choices
on random text drafts no better than chance on new prompts (0.2%). So the head memorises: it is
fitted to the base model's greedy continuation of a few fixed prompts (``fit_prompts``), first and
second draft, for the first ``MEMORISED_TOKENS`` generated tokens only. Served those prompts, vLLM's
drafts of the first tokens are accepted when the drafter computes exactly what this module does from
the checkpoint (names, norms, shared embeddings, hidden state handed over, KV of the first pass),
and the later ones are mostly rejected, so the GDN rollback runs both ways. Seeded and
deterministic; about 20 s on one core. The fit's summary goes to ``mtp_fit.json`` (prompts,
memorised tokens, training accuracy).

CLI: ``python -m vllm_gdn_cpu.testing.tiny_mtp DIR [--steps N]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from vllm_gdn_cpu.testing.tiny_models import build_tiny_qwen3_next

SEED = 4321
NUM_MTP_LAYERS = 1
FIT_PROMPT_LENGTHS = (5, 17, 120, 250)  # 120 and 250: memorised drafts cross a 128-token block
MEMORISED_TOKENS = 12  # drafts of generated tokens 1..12 are fitted, later ones are not
FIT_STEPS = 150  # the fit's loss is ~1e-4 after 50 steps
LEARNING_RATE = 2e-3
INIT_STD = 0.02
MARKER = "mtp_fit.json"


def fit_prompts(vocab_size: int, lengths: Sequence[int] = FIT_PROMPT_LENGTHS) -> list[list[int]]:
    """The prompts the head is fitted on (seeded random token ids, ids 0-2 left out)."""
    rng = random.Random(SEED)
    return [[rng.randrange(3, vocab_size) for _ in range(n)] for n in lengths]


class Qwen3NextMTPHead(nn.Module):
    """vLLM's Qwen3NextMultiTokenPredictor (one layer) without the shared embed/lm_head."""

    def __init__(self, config):
        from transformers.models.qwen3_next import modeling_qwen3_next as hf

        super().__init__()
        # vLLM builds the MTP layer with layer index 0 and full attention: give HF's layer 0 that
        # type (its MLP is then chosen as vLLM chooses it, from mlp_only_layers / num_experts).
        layer_config = copy.deepcopy(config)
        layer_config.layer_types = ["full_attention"] + list(config.layer_types[1:])
        layer_config._attn_implementation = "eager"
        self.fc = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.layers = nn.ModuleList([hf.Qwen3NextDecoderLayer(layer_config, layer_idx=0)])
        self.norm = hf.Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_fc_norm_hidden = hf.Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.pre_fc_norm_embedding = hf.Qwen3NextRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = hf.Qwen3NextRotaryEmbedding(config)

    def forward(self, embeds, hidden, positions, mask) -> torch.Tensor:
        """embeds, hidden: [1, T, H] (each row: the next token's embedding, a hidden state);
        positions: [1, T]; mask: [T, T] additive attention mask. Returns the normed output."""
        x = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], -1)
        x = self.fc(x)
        rope = self.rotary_emb(x, positions)
        x = self.layers[0](
            x, position_embeddings=rope, attention_mask=mask[None, None], position_ids=positions
        )
        return self.norm(x[0] if isinstance(x, tuple) else x)

    def two_drafts(self, embeds, hidden):
        """Both draft passes over a sequence, as vLLM runs them. embeds [1, T, H] of tokens 0..T-1,
        hidden [1, T, H] the base model's. Pass 1 at i (position i): token i+1, base hidden i.
        Pass 2 at i (position i+1): token i+2, pass 1's output at i, attending to pass 1's keys at
        positions 0..i and to itself. Returns the outputs [T-1, H] and [T-2, H]."""
        n1 = embeds.shape[1] - 1
        causal = torch.full((n1, n1), float("-inf")).triu(1)
        pos1 = torch.arange(n1)[None]
        out1 = self(embeds[:, 1:], hidden[:, :-1], pos1, causal)
        n2 = n1 - 1
        # One call over [pass-1 rows ; pass-2 rows]; the pass-1 rows only give keys and values.
        mask = torch.full((n1 + n2, n1 + n2), float("-inf"))
        mask[:n1, :n1] = causal
        mask[n1:, :n2] = causal[:n2, :n2]
        mask[n1:, n1:].fill_diagonal_(0.0)
        out = self(
            torch.cat([embeds[:, 1:], embeds[:, 2:]], 1),
            torch.cat([hidden[:, :-1], out1[:, :-1]], 1),
            torch.cat([pos1, pos1[:, :n2] + 1], 1),
            mask,
        )
        return out1[0], out[0, n1:]

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The head's weights under the checkpoint names vLLM's Qwen3NextMTP loads (``mtp.*``;
        HF's fused expert tensors split back into per-expert gate/up/down projections)."""
        out = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("rotary_emb."):
                continue
            if name.endswith("mlp.experts.gate_up_proj"):
                prefix = "mtp." + name[: -len("gate_up_proj")]
                gate, up = tensor.chunk(2, dim=1)
                for e in range(tensor.shape[0]):
                    out[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                    out[f"{prefix}{e}.up_proj.weight"] = up[e]
            elif name.endswith("mlp.experts.down_proj"):
                prefix = "mtp." + name[: -len("down_proj")]
                for e in range(tensor.shape[0]):
                    out[f"{prefix}{e}.down_proj.weight"] = tensor[e]
            else:
                out["mtp." + name] = tensor
        return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in out.items()}


def fit_mtp_head(
    model, prompts: Sequence[Sequence[int]], memorised: int = MEMORISED_TOKENS,
    steps: int = FIT_STEPS, log=print,
) -> tuple[Qwen3NextMTPHead, dict]:
    """Fits a fresh head to ``model``'s (HF Qwen3NextForCausalLM, float32) greedy continuation of
    ``prompts``: both drafts of generated tokens 1..``memorised``. Returns (head, summary)."""
    embed, lm_head = model.get_input_embeddings(), model.get_output_embeddings()
    for p in model.parameters():
        p.requires_grad_(False)
    data = []  # per prompt: embeds, base hidden, targets of pass 1 and 2, and their loss rows
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([list(prompt)])
            seq = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=memorised + 1,
                do_sample=False, pad_token_id=0, eos_token_id=None,
            )
            assert seq.shape[1] == len(prompt) + memorised + 1, "generation stopped early"
            out = model(seq, output_hidden_states=True)
            greedy = out.logits[0].argmax(-1)  # base model's choice after each position
            p = len(prompt)
            # Pass 1 at i drafts token i+2 (greedy[i+1]); the first draft is at i = p-1.
            rows1 = torch.arange(p - 1, p - 1 + memorised)
            rows2 = torch.arange(p - 1, p - 2 + memorised)
            data.append((embed(seq), out.hidden_states[-1], greedy, rows1, rows2))

    torch.manual_seed(SEED)
    head = Qwen3NextMTPHead(model.config)
    with torch.no_grad():  # HF's init: matrices N(0, 0.02), zero-centred norms 0 (scale 1)
        for param in head.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, INIT_STD)
            else:
                param.zero_()
    optimizer = torch.optim.Adam(head.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(embeds, hidden, greedy, rows1, rows2):
        out1, out2 = head.two_drafts(embeds, hidden)
        logits1, logits2 = lm_head(out1[rows1]), lm_head(out2[rows2])
        return logits1, greedy[rows1 + 1], logits2, greedy[rows2 + 2]

    for step in range(steps):
        total = 0.0
        optimizer.zero_grad()
        for item in data:
            logits1, want1, logits2, want2 = evaluate(*item)
            loss = loss_fn(logits1, want1) + loss_fn(logits2, want2)
            loss.backward()
            total += loss.item()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"mtp fit step {step}: loss {total / len(data):.4f}")

    hits, count = [0, 0], [0, 0]
    with torch.no_grad():
        for item in data:
            logits1, want1, logits2, want2 = evaluate(*item)
            for k, (logits, want) in enumerate(((logits1, want1), (logits2, want2))):
                hits[k] += int((logits.argmax(-1) == want).sum())
                count[k] += want.numel()
    summary = {
        "seed": SEED, "steps": steps, "prompts": [list(p) for p in prompts],
        "memorised_tokens": memorised,
        "fit_accuracy_first_draft": hits[0] / count[0],
        "fit_accuracy_second_draft": hits[1] / count[1],
    }
    log(f"mtp fit: drafts right on the fitted tokens {hits[0]}/{count[0]} (first), "
        f"{hits[1]}/{count[1]} (second)")
    return head, summary


def build_tiny_qwen3_next_mtp(
    directory: Union[str, Path], prompts: Optional[Sequence[Sequence[int]]] = None,
    steps: int = FIT_STEPS, log=print,
) -> Path:
    """Builds the tiny float32 Qwen3-Next (with tokenizer) plus an MTP head fitted on ``prompts``
    (default ``fit_prompts``) into ``directory``. Idempotent: a finished build is kept."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen3NextForCausalLM

    directory = Path(directory)
    if (directory / MARKER).is_file():
        return directory
    base_dir = directory / "base"
    build_tiny_qwen3_next(base_dir, dtype=torch.float32)
    model = Qwen3NextForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    if prompts is None:
        prompts = fit_prompts(model.config.vocab_size)
    # One thread: these matrices are tiny, and on a busy 2-core machine two OpenMP threads spent
    # 5+ minutes spinning where one thread takes well under one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        head, summary = fit_mtp_head(model, prompts, steps=steps, log=log)
    finally:
        torch.set_num_threads(threads)

    for item in base_dir.iterdir():
        if item.is_file():
            shutil.copy2(item, directory / item.name)
    shutil.rmtree(base_dir)
    weights = load_file(directory / "model.safetensors")
    weights.update(head.checkpoint_tensors())
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((directory / "config.json").read_text())
    config["num_nextn_predict_layers"] = NUM_MTP_LAYERS
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / MARKER).write_text(json.dumps(summary) + "\n")
    return directory


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=FIT_STEPS)
    args = parser.parse_args(argv)
    print(build_tiny_qwen3_next_mtp(args.directory, steps=args.steps))


if __name__ == "__main__":
    main()


__all__ = ["Qwen3NextMTPHead", "build_tiny_qwen3_next_mtp", "fit_mtp_head", "fit_prompts"]
