"""The GGUF types deepred writes: a table module that imports nothing (like gguf-py's constants.py).

The settings offer their names (config.py), export makes each one (its `convert` and `check`), and the model cards
and the parity check name a file's type from its header (FILE_TYPE_NAMES).
"""

QUANT_TYPES = {
    "f32": "32-bit float, no loss, largest (4 bytes/weight); for parity checks",
    "f16": "16-bit float, practically lossless, half of f32",
    "bf16": "bfloat16, lossless for bf16-trained models, half of f32",
    "q8_0": "8-bit, near-lossless, about 1/4 of f32",
    "q6_k": "6-bit k-quant, very close to f16 quality",
    "q5_k_m": "5-bit k-quant (medium), high quality, good default for larger disks",
    "q5_k_s": "5-bit k-quant (small), slightly smaller and lower quality than q5_k_m",
    "q4_k_m": "4-bit k-quant (medium), best size/quality balance; the default",
    "q4_k_s": "4-bit k-quant (small), a little smaller, a little worse than q4_k_m",
    "q3_k_m": "3-bit k-quant (medium), small, noticeable quality loss",
    "q3_k_s": "3-bit k-quant (small), smaller still, more loss",
    "q2_k": "2-bit k-quant, smallest, large quality loss; last resort",
}

# Written directly by llama.cpp's converter (its --outtype): the float types.
CONVERTER_TYPES = ("f32", "f16", "bf16")

# Quantised by llama.cpp from a lossless intermediate GGUF; values are llama_cpp constant names.
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


def quant_type_list() -> str:
    """One line per GGUF type, for --help."""
    width = max(map(len, QUANT_TYPES))
    lines = [f"  {name:<{width}}  {text}" for name, text in QUANT_TYPES.items()]
    return "GGUF types (--quant_type):\n" + "\n".join(lines)
