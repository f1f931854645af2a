"""Build a tiny, randomly initialised Llama model that `transformers serve` can load offline.

Nothing here touches the network: the tokenizer is one of the Hugging Face tokenizer files that
litellm ships inside its wheel, and the weights come from a seeded random initialisation. The
model's output is gibberish, which is all a load test needs: a real server doing real (if cheap)
forward passes and streaming real tokens.

torch and transformers are imported inside the functions, so importing this module is free and
works without the `integration` extra. The fixtures build in a child process
(`build_tiny_model_in_subprocess`), which keeps torch, its threads and its global RNG out of the
test process; the cost (~4 s, nearly all of it importing torch and transformers) is the same.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A byte-level BPE file of 65,000 tokens whose first ids are special tokens (<EOT>=0, <META>=1,
# <META_START>=2, <META_END>=3, <SOS>=4). At hidden size 64 the embedding and the (untied) LM
# head are 4.2 M parameters each: a 17 MB safetensors file.
DEFAULT_TOKENIZER = "anthropic_tokenizer.json"
EOS_TOKEN = "<EOT>"
BOS_TOKEN = "<SOS>"
PAD_TOKEN = "<META>"

# Role markers are plain text: the tokenizer has no chat tokens and the model understands nothing
# anyway. What matters is that apply_chat_template works and the prompt length grows with the
# messages, as it does for a real model.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# The shape asked for: small enough that one decode step costs a few milliseconds on one CPU core.
MODEL_SHAPE: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
    "max_position_embeddings": 2048,
}


@dataclass(frozen=True)
class Variant:
    """What differs between the servers' tiny models.

    `transformers serve` takes the small shape; its generation config suppresses EOS. vLLM's CPU
    attention kernels reject a head size of 16 (hidden 64 over 4 heads) and accept 64 (hidden 128
    over 2 heads), and vLLM does not read `suppress_tokens`: its model has no EOS token at all, so
    the engine has no token to stop at and every request runs to `max_tokens` there too.
    """

    shape: dict[str, Any]
    eos: bool


VARIANTS: dict[str, Variant] = {
    "transformers": Variant(shape=MODEL_SHAPE, eos=True),
    "vllm": Variant(
        shape={
            **MODEL_SHAPE,
            "hidden_size": 128,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
        },
        eos=False,
    ),
}


class TokenizerNotFound(FileNotFoundError):
    """litellm, or the tokenizer file it used to ship, is not installed."""


def litellm_tokenizer_file(name: str = DEFAULT_TOKENIZER) -> Path:
    """Path of a tokenizer JSON shipped by litellm, found without importing litellm (slow)."""
    spec = importlib.util.find_spec("litellm")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / "litellm_core_utils" / "tokenizers" / name
        if path.is_file():
            return path
    raise TokenizerNotFound(
        f"litellm's tokenizer file {name!r} was not found under {locations!r}; "
        "the tiny integration model needs it (is litellm installed?)."
    )


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token (got id {token_id!r})")
    return token_id


def build_tiny_model(
    dest: Path,
    *,
    seed: int = 0,
    tokenizer_file: Path | None = None,
    variant: str = "transformers",
) -> Path:
    """Write a random tiny LlamaForCausalLM and its tokenizer to `dest`; return `dest`.

    The same seed gives the same weights, so greedy outputs repeat from run to run.
    Generation never stops on its own (EOS suppressed in the saved generation config, or, for the
    "vllm" variant, no EOS token at all), so a request always produces exactly `max_tokens` tokens
    (finish_reason "length"). That keeps token counts in load tests exact instead of hostage to a
    random model's chance of sampling EOS.
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    spec = VARIANTS[variant]
    tokenizer_path = tokenizer_file if tokenizer_file is not None else litellm_tokenizer_file()
    tokenizer = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_file=str(tokenizer_path),
        eos_token=EOS_TOKEN if spec.eos else None,
        bos_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    eos_id, bos_id, pad_id = (_token_id(tokenizer, t) for t in (EOS_TOKEN, BOS_TOKEN, PAD_TOKEN))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        # Untied: with tied 0.02-scale embeddings the logits mirror the input embedding and the
        # greedy model repeats the prompt's last token ("\n" forever); untied it says varied nonsense.
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id if spec.eos else None,
        pad_token_id=pad_id,
        **spec.shape,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)

    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=bos_id,
        eos_token_id=eos_id if spec.eos else None,
        pad_token_id=pad_id,
        do_sample=False,
        suppress_tokens=[eos_id] if spec.eos else None,
    )

    dest.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


class BuildError(RuntimeError):
    """The child process that builds the model failed; the message carries its output."""


def build_tiny_model_in_subprocess(
    dest: Path, *, seed: int = 0, variant: str = "transformers", timeout: float = 300.0
) -> Path:
    """`build_tiny_model` in a fresh interpreter (this file run as a script); return `dest`."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny-model variant {variant!r}; known: {sorted(VARIANTS)}")
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    cmd = [sys.executable, str(Path(__file__).resolve()), str(dest), "--seed", str(seed)]
    cmd += ["--variant", variant]
    try:
        proc = subprocess.run(
            cmd,
            check=False,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"building the tiny model took over {timeout:.0f} s: {cmd!r}") from exc
    if proc.returncode != 0 or not (dest / "config.json").is_file():
        output = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise BuildError(
            f"building the tiny model failed (exit code {proc.returncode}): {cmd!r}\n{output}"
        )
    return dest


def main(argv: list[str] | None = None) -> None:
    """`python tiny_model.py DEST [--seed N]`: build in a child process, away from the test one."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-file", type=Path, default=None)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="transformers")
    args = parser.parse_args(argv)
    build_tiny_model(
        args.dest, seed=args.seed, tokenizer_file=args.tokenizer_file, variant=args.variant
    )


if __name__ == "__main__":
    main()
