"""Tiny Qwen3-Next checkpoints and tokenizers, built locally (no network) for tests and the demo.

The weights are random (fixed seed) but scaled so that greedy decoding is not degenerate, and the
GDN decay rates are kept small enough that the recurrent state carries information across many
tokens (with the Hugging Face default init, most heads forget everything within a few tokens, which
would hide state-handling bugs).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Union

import torch

SEED = 1234
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
EOS_TOKEN = "<|im_end|>"
# Upper bound for BPE training; the corpus below yields about 830 entries, and the model's
# vocab_size is set to the tokenizer's actual size.
TOKENIZER_VOCAB_SIZE = 1024
# ChatML, as the Qwen family uses, so /v1/chat/completions works with the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gain on the random init (std 0.02 in HF): large enough that the logits of a random model are
# spread out, so greedy argmax has clear winners and does not collapse onto one token.
INIT_GAIN = 4.0

_WORDS = (
    "the of and to in is was that for on as with by at from his her they this which have not "
    "are but be had one all were their there an been has more when who will would no if out so "
    "said what up its about into than them can only other new some could time these two may then "
    "do first any my now such like our over man me even most made after also did many before must "
    "through back years where much your way well down should because each just those people how "
    "too little state good very make world still own see men work long get here between both life "
    "being under never day same another know while last might us great old year off come since "
    "against go came right used take three state linear attention delta rule gate kernel cache "
    "token model layer vector matrix chunk decode prefill memory thread core fast slow value key "
    "query head state update recurrent convolution batch sequence python server request reply"
).split()


def _corpus(num_sentences: int = 4000) -> list[str]:
    """Deterministic pseudo-English text to train the tokenizer on."""
    rng = random.Random(SEED)
    sentences = []
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        sentences.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ",", ";"]))
    return sentences


def _is_saved(directory: Path, marker: str) -> bool:
    return (directory / marker).is_file()


def build_tokenizer(directory: Union[str, Path]) -> Path:
    """Trains a byte-level BPE tokenizer with ``tokenizers`` and saves it with a chat template.

    Idempotent: does nothing if ``directory`` already holds a tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    directory = Path(directory)
    if _is_saved(directory, "tokenizer.json"):
        return directory
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(directory)
    return directory


def tiny_qwen3_next_config(
    vocab_size: int, eos_token_id: int, pad_token_id: int, dtype: torch.dtype
):
    """Qwen3-Next with 4 layers: 3 GDN (linear attention) + 1 full attention; layer 0 is MoE
    (vLLM's Qwen3-Next needs at least one), the others dense."""
    from transformers import Qwen3NextConfig

    return Qwen3NextConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=64,
        linear_value_head_dim=64,
        linear_conv_kernel_dim=4,
        full_attention_interval=4,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=128,
        shared_expert_intermediate_size=128,
        mlp_only_layers=[1, 2, 3],
        max_position_embeddings=4096,
        initializer_range=0.02 * INIT_GAIN,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        dtype=dtype,
    )


def _moderate_gdn_decay(model) -> None:
    """A = exp(A_log) in [0.01, 1] (HF draws up to 16): per-token decay exp(-A * softplus(.)) then
    ranges from nearly 1 (long memory) to about 0.27, so the state matters over long prompts."""
    generator = torch.Generator().manual_seed(SEED)
    for module in model.modules():
        if hasattr(module, "A_log") and hasattr(module, "dt_bias"):
            a = torch.empty(module.A_log.shape).uniform_(0.01, 1.0, generator=generator)
            with torch.no_grad():
                module.A_log.copy_(a.log())


def build_tiny_qwen3_next(
    directory: Union[str, Path], dtype: torch.dtype = torch.float32
) -> Path:
    """Builds a tiny random Qwen3-Next checkpoint plus tokenizer into ``directory`` (idempotent).

    The weights are drawn in float32 with a fixed seed and then cast, so checkpoints of different
    dtypes hold the same model up to rounding.
    """
    from transformers import Qwen3NextForCausalLM

    directory = Path(directory)
    if _is_saved(directory, "config.json") and _is_saved(directory, "tokenizer.json"):
        return directory
    _, model = random_model(directory, tiny_qwen3_next_config, Qwen3NextForCausalLM, dtype)
    model.save_pretrained(directory)
    return directory


def random_model(directory: Path, make_config, model_class, dtype: torch.dtype):
    """Builds the tokenizer into ``directory``, then a seeded random ``model_class`` from
    ``make_config(vocab_size, eos_token_id, pad_token_id, dtype)``, initialised in float32 (so every
    dtype holds the same model up to rounding) with moderated GDN decay, cast to ``dtype``.
    Returns (config, model); saving is the caller's."""
    from transformers import AutoTokenizer

    build_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = make_config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=dtype,
    )
    torch.manual_seed(SEED)
    model = model_class(config).to(torch.float32)
    _moderate_gdn_decay(model)
    return config, model.to(dtype)


__all__ = ["build_tokenizer", "build_tiny_qwen3_next", "tiny_qwen3_next_config"]
