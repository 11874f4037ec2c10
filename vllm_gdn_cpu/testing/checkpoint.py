"""What the config-table builders (tiny_mamba1, tiny_mamba2) share: a seeded random model of a
transformers config, an idempotent save with its generation config, and the command line."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Union

import torch


def seeded_model(config, seed: int, spread_decays: Callable, dtype: torch.dtype):
    """transformers' class of ``config.architectures[0]``, drawn in float32 after seeding with
    ``seed``, its decays spread by ``spread_decays(model)``, cast to ``dtype``, in eval mode."""
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).to(torch.float32)
    spread_decays(model)
    return model.to(dtype).eval()


def save_once(directory: Union[str, Path], make_model: Callable, eos: int, pad: int, bos: int) -> Path:
    """Saves ``make_model()`` and a generation config into ``directory`` unless a checkpoint is there."""
    from transformers import GenerationConfig

    directory = Path(directory)
    if (directory / "config.json").is_file() and (directory / "model.safetensors").is_file():
        return directory
    make_model().save_pretrained(directory)
    GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos).save_pretrained(directory)
    return directory


def builder_main(description: str, kinds, build: Callable, argv=None) -> None:
    """`python -m vllm_gdn_cpu.testing.<module> KIND DIRECTORY [--dtype ...]`: prints the directory."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("kind", choices=sorted(kinds))
    parser.add_argument("directory")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    print(build(args.kind, args.directory, getattr(torch, args.dtype)))
