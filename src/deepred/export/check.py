"""Is this GGUF the model it came from? llama.cpp (f32 KV cache) against transformers (float32) on a few chat
prompts: token ids identical, logits within the bound of the GGUF's float type, and the metadata a chat runner relies
on (pre-tokenizer, chat template, end-of-turn token, BOS flag)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..chat_template import template_messages
from ..errors import DeepRedError
from ..llama_runtime import load_llama
from ..models.registry import resolve_base_model
from ..quant_types import FILE_TYPE_NAMES
from .source import check_model_dir, is_qwen

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

# Test inputs for tokenizer and logits, not questions to the persona: a plain prompt, a multi-turn one with numbers,
# accents, CJK, a symbol, markup, tabs, newlines and doubled spaces, and one without a system prompt.
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


def render_conversations(tokenizer) -> list[str]:
    return [tokenizer.apply_chat_template(template_messages(tokenizer, messages), tokenize=False,
                                          add_generation_prompt=True)
            for messages in CHECK_CONVERSATIONS]


def hf_tokenizer_view(model_dir: Path) -> tuple[list[str], list[list[int]], dict]:
    """The check conversations rendered with the HF chat template, their token ids, and tokenizer facts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:  # nothing to render the check conversations with, nor for the GGUF to carry
        raise DeepRedError(f"{model_dir} has no chat template (chat_template.jinja, or chat_template in "
                           "tokenizer_config.json); LM Studio would fall back to a wrong prompt format: copy the base "
                           "model's chat_template.jinja into the folder and convert again")
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
    if not all(np.isfinite(d) for d in diffs):  # max() keeps the first of [1e-6, nan]: a NaN must never pass
        diffs = [float("inf")]
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
