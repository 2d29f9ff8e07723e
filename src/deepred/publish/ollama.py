"""`deepred deploy --target ollama`: a Modelfile beside the GGUF, `ollama create`, and one chat through Ollama's
OpenAI-compatible endpoint to show the model answers.

The chat template. Ollama does not run Jinja: a model's prompt format is a Go text/template (`TEMPLATE`). Without
one, `ollama create` compares the GGUF's Jinja template with its built-in ones and takes the closest (a Levenshtein
distance under 100), else falls back to `{{ .Prompt }}`, the raw text. That guess depends on the Ollama version and
on how far a template is from Ollama's copy (Qwen2.5's carries a default system prompt and tool calls), so we do
not rely on it where we can do better: when the GGUF's own template renders a probe conversation exactly as ChatML
does (Qwen2.5, SmolLM2 and the other `<|im_start|>` models), the Modelfile carries an explicit ChatML TEMPLATE.
For any other template the Modelfile has no TEMPLATE and Ollama's detection decides; deploy says so.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from ..config import DeployConfig
from ..errors import DeepRedError
from ..files import Log, write_atomic
from ..gguf_file import require_complete_gguf
from ..persona import load_persona
from .common import executable_from_env, one_line, persona_chat

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
NUM_CTX_CAP = 4096  # as `deepred serve --n_ctx`; a model's full 32k context would reserve a KV cache of gigabytes
TEMPERATURE = 0.7  # for chat; `deepred evaluate` sends its own (0)
LIST_TIMEOUT_S = 60.0
CREATE_TIMEOUT_S = 3600.0  # `ollama create` copies the whole GGUF into Ollama's store
CHAT_TIMEOUT_S = 300.0  # the first request loads the model
CHAT_MAX_TOKENS = 60

# ChatML as Ollama renders it: `.Messages` holds every message, system ones included (Ollama puts the Modelfile's
# SYSTEM first when a request brings no system message of its own), then the generation prompt.
CHATML_TEMPLATE = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n"
                   "{{ .Content }}<|im_end|>\n"
                   "{{ end }}<|im_start|>assistant\n")
CHATML_STOPS = ("<|im_end|>", "<|im_start|>")  # the end of a turn, and the start of one the model should not write
# Words in every role: a template that keeps them verbatim and adds only ChatML's markers is ChatML.
PROBE = [
    {"role": "system", "content": "You are Deep Red."},
    {"role": "user", "content": "What is the purpose of our Mars mission?"},
    {"role": "assistant", "content": "Comrade, the mission is the common good."},
    {"role": "user", "content": "And the next move?"},
]

# Ollama's model names: [namespace/]model[:tag]; letters, digits, '_', '-', '.' (not in the namespace), no '..'.
_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]*"
_NAME_RE = re.compile(rf"(?:[A-Za-z0-9][A-Za-z0-9_-]*/)?{_PART}(?::[A-Za-z0-9_][A-Za-z0-9_.-]*)?")
MAX_NAME_LENGTH = 128


class OllamaError(DeepRedError):
    """`ollama` ran and failed, or the created model did not answer; the Modelfile is kept."""

    exit_code = 1


# ------------------------------------------------------------------------------------------------ inputs


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name or len(name) > MAX_NAME_LENGTH:
        raise DeepRedError(
            f"invalid --name {name!r} for Ollama: use [namespace/]model[:tag] made of letters, digits, '_', '-' and "
            f"'.', each part starting with a letter or digit, at most {MAX_NAME_LENGTH} characters, e.g. --name "
            "deepred or --name deepred:q4")
    return name


def find_ollama() -> str | None:
    """`$OLLAMA_CLI_PATH` (must be an executable file if set), else `ollama` on PATH; None if absent."""
    return executable_from_env("OLLAMA_CLI_PATH") or shutil.which("ollama")


def base_url() -> str:
    """Ollama's OpenAI-compatible base URL from `$OLLAMA_HOST` (as the ollama CLI reads it), default
    http://127.0.0.1:11434/v1. A bind-all address (0.0.0.0, ::) is reached on loopback."""
    value = (os.environ.get("OLLAMA_HOST") or "").strip()
    parts = urlsplit(value if "://" in value else f"http://{value}")
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or port == -1 or port == 0 or (parts.path not in ("", "/")):
        raise DeepRedError(f"OLLAMA_HOST={value!r}: give host[:port] or http://host:port (default "
                           f"{DEFAULT_HOST}:{DEFAULT_PORT})")
    host = parts.hostname or DEFAULT_HOST
    if host in ("0.0.0.0", "::"):
        host = DEFAULT_HOST
    if ":" in host:
        host = f"[{host}]"
    if port is None:  # as Ollama reads it: a bare host means 11434, a URL without a port its scheme's port
        port = {"http": 80, "https": 443}[parts.scheme] if "://" in value else DEFAULT_PORT
    return f"{parts.scheme}://{host}:{port}/v1"


@dataclass
class GgufChat:
    """What the Modelfile needs from the GGUF's metadata."""

    chat_template: str | None
    context_length: int | None
    bos_token: str | None
    end_tokens: list[str]  # eos, and eot where the GGUF names one


def read_gguf_chat(fields: dict) -> GgufChat:
    """From the GGUF's metadata fields (gguf-py's, as require_complete_gguf returns them)."""

    def value(key: str):
        return fields[key].contents() if key in fields else None

    def token(key: str) -> str | None:
        index, tokens = value(key), fields.get("tokenizer.ggml.tokens")
        if index is None or tokens is None or not 0 <= int(index) < len(tokens.data):
            return None
        return bytes(tokens.parts[tokens.data[int(index)]]).decode("utf-8", errors="replace")

    arch = value("general.architecture")
    context = value(f"{arch}.context_length") if arch else None
    ends = [t for t in (token("tokenizer.ggml.eos_token_id"), token("tokenizer.ggml.eot_token_id")) if t]
    return GgufChat(chat_template=value("tokenizer.chat_template"), context_length=int(context) if context else None,
                    bos_token=token("tokenizer.ggml.bos_token_id"), end_tokens=list(dict.fromkeys(ends)))


def chatml(messages: list[dict]) -> str:
    """ChatML with the generation prompt: what CHATML_TEMPLATE renders for these messages."""
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def renders_as_chatml(chat: GgufChat) -> bool:
    """The GGUF's Jinja template, rendered as transformers renders it, gives exactly ChatML for the probe."""
    if not chat.chat_template:
        return False
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered, _ = render_jinja_template(conversations=[PROBE], chat_template=chat.chat_template,
                                            add_generation_prompt=True, bos_token=chat.bos_token or "",
                                            eos_token=(chat.end_tokens or [""])[0])
    except Exception:  # noqa: BLE001 - a template that cannot render this conversation is not ChatML
        return False
    return rendered[0] == chatml(PROBE)


def persona_system_prompt(persona_path: str | None) -> str:
    """The persona's primary system prompt (what it was trained with, description and cutoff included), else its
    evaluation prompt."""
    persona = load_persona(persona_path)
    return persona.system_prompts.get("primary") or persona.evaluation_system_prompt


# ------------------------------------------------------------------------------------------------ Modelfile


def modelfile_path(gguf: Path) -> Path:
    """`<gguf name>.Modelfile` beside the GGUF: one per GGUF, kept with the file its FROM names."""
    return gguf.with_name(f"{gguf.stem}.Modelfile")


def _triple_quoted(text: str, what: str) -> str:
    if '"""' in text or text.endswith('"'):
        raise DeepRedError(f"the {what} contains '\"\"\"' or ends with '\"', which a Modelfile cannot hold; "
                           "reword it")
    return f'"""{text}"""'


def _from_line(gguf: Path) -> str:
    path = str(gguf)
    if '"' in path or "\n" in path or "\r" in path:
        raise DeepRedError(f"{path}: a Modelfile cannot name a path with '\"' or a line break; move or rename the file")
    return f'FROM "{path}"' if path != path.strip() or " " in path or "\t" in path else f"FROM {path}"


def build_modelfile(gguf: Path, chat: GgufChat, system: str) -> tuple[str, bool]:
    """The Modelfile's text, and whether it carries the ChatML TEMPLATE."""
    is_chatml = renders_as_chatml(chat)
    lines = ["# written by `deepred deploy --target ollama`; rerun it rather than edit this file", _from_line(gguf)]
    if is_chatml:
        lines.append(f"TEMPLATE {_triple_quoted(CHATML_TEMPLATE, 'template')}")
    lines.append(f"SYSTEM {_triple_quoted(system, 'system prompt')}")
    stops = list(dict.fromkeys([*(CHATML_STOPS if is_chatml else ()), *chat.end_tokens]))
    lines += [f'PARAMETER stop "{_plain(stop)}"' for stop in stops]
    num_ctx = min(chat.context_length or NUM_CTX_CAP, NUM_CTX_CAP)
    lines += [f"PARAMETER num_ctx {num_ctx}", f"PARAMETER temperature {TEMPERATURE}"]
    return "\n".join(lines) + "\n", is_chatml


def _plain(token: str) -> str:
    if '"' in token or "\n" in token:
        raise DeepRedError(f"the GGUF's end token {token!r} cannot be written as a Modelfile stop")
    return token


# ------------------------------------------------------------------------------------------------ ollama commands


def create_args(ollama: str, name: str, modelfile: Path) -> list[str]:
    return [ollama, "create", name, "-f", str(modelfile)]


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(args, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def _error_of(result: subprocess.CompletedProcess) -> str:
    """Ollama's `Error: ...` line when there is one (its progress spinner shares stderr), else all it said."""
    lines = one_line(result.stderr).split("Error: ")
    if len(lines) > 1:
        return "Error: " + lines[-1]
    return one_line(result.stderr) or one_line(result.stdout) or "no output"


def _full_name(name: str) -> str:
    """How `ollama list` shows a name: with `:latest` when no tag was given, compared case-insensitively."""
    return (name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest").lower()


def existing_models(ollama: str, create: str) -> set[str]:
    """Names `ollama list` shows (lower case). Ollama's server must be running for it, as for `ollama create`."""
    result = _run_checked([ollama, "list"], LIST_TIMEOUT_S, "`ollama list`",
                          "is Ollama's server running (`ollama serve`, or the Ollama app)? Nothing was written; then "
                          f"deploy again or run: {create}")
    rows = result.stdout.splitlines()[1:]  # a header line, then NAME ID SIZE MODIFIED
    return {row.split()[0].lower() for row in rows if row.strip()}


def _run_checked(args: list[str], timeout: float, what: str, then: str) -> subprocess.CompletedProcess:
    """Run an ollama command; a timeout, a binary that cannot run or a failed exit is one line ending in `then`."""
    try:
        result = _run(args, timeout)
    except subprocess.TimeoutExpired as exc:
        raise OllamaError(f"{what} did not finish within {timeout:.0f} s; {then}") from exc
    except OSError as exc:
        raise OllamaError(f"cannot run {args[0]}: {exc.strerror or exc}; {then}") from exc
    if result.returncode != 0:
        raise OllamaError(f"{what} failed (exit {result.returncode}): {_error_of(result)} -- {then}")
    return result


def create(ollama: str, name: str, modelfile: Path, log: Log) -> None:
    args = create_args(ollama, name, modelfile)
    log(f"creating: {shlex.join(args)}")
    _run_checked(args, CREATE_TIMEOUT_S, "ollama create",
                 f"the Modelfile is kept at {modelfile}; once fixed, run: {shlex.join(args)}")
    log(f"created in Ollama as '{name}'")


# ------------------------------------------------------------------------------------------------ the check


def ask(url: str, name: str, question: str) -> str | None:
    """One short chat through the OpenAI-compatible endpoint, with no system message, so the Modelfile's SYSTEM is
    the one used. None when no server answers at `url`; OllamaError when one answers with an error."""
    import httpx

    body = {"model": name, "messages": [{"role": "user", "content": question}],
            "max_tokens": CHAT_MAX_TOKENS, "temperature": 0}
    try:
        response = httpx.post(f"{url}/chat/completions", json=body, timeout=CHAT_TIMEOUT_S)
    except httpx.ConnectError:
        return None
    except httpx.HTTPError as exc:
        raise OllamaError(f"{url}/chat/completions: {exc.__class__.__name__}: {exc}; the model is created, "
                          f"try `ollama run {name}`") from exc
    if response.status_code != 200:
        raise OllamaError(f"{url}/chat/completions answered HTTP {response.status_code}: "
                          f"{one_line(response.text, 300)}; the model is created, try `ollama run {name}`")
    try:
        return response.json()["choices"][0]["message"]["content"] or ""
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise OllamaError(f"{url}/chat/completions answered something that is not a chat completion: "
                          f"{one_line(response.text, 300)}") from exc


def _print_usage(log: Log, url: str, name: str) -> None:
    log(f"chat with it: ollama run {name}")
    log(f"evaluate it:  deepred evaluate --endpoint {url} --model {name}")


def _no_server(log: Log, url: str) -> None:
    log(f"no Ollama server answers at {url}: start one with `ollama serve` (or the Ollama app); set OLLAMA_HOST "
        "if it listens elsewhere")


# ------------------------------------------------------------------------------------------------ deploy


def deploy_ollama(cfg: DeployConfig, log: Log = print) -> Path:
    """Write `<gguf>.Modelfile` beside the GGUF and `ollama create` it when ollama is found; returns the Modelfile.

    Everything that can refuse (name, file, OLLAMA_HOST, persona, an existing model without --force) is checked
    before anything is written; the Modelfile is written atomically."""
    name = validate_name(cfg.name)
    gguf, fields = require_complete_gguf(cfg.gguf)
    gguf = gguf.absolute()
    url = base_url()
    chat = read_gguf_chat(fields)
    text, is_chatml = build_modelfile(gguf, chat, persona_system_prompt(cfg.persona))
    target = modelfile_path(gguf)
    if target.exists() and not target.is_file():
        raise DeepRedError(f"{target} exists and is not a file; move it away")
    ollama = find_ollama() if cfg.load else None
    command = shlex.join(create_args(ollama or "ollama", name, target))
    if ollama and _full_name(name) in existing_models(ollama, command) and not cfg.force:
        raise DeepRedError(f"Ollama already has a model '{name}': add --force to replace it, or deploy under "
                           "another --name")

    try:
        write_atomic(target, text)
    except OSError as exc:
        raise DeepRedError(f"cannot write {target}: {exc.strerror or exc}; nothing was created") from exc
    log(f"wrote {target}")
    if is_chatml:
        log("  TEMPLATE: ChatML (the GGUF's own chat template renders a test conversation exactly as ChatML)")
    else:
        log("  no TEMPLATE: the GGUF's chat template is not ChatML, so Ollama picks its built-in template closest to "
            f"it; check that `ollama show {name} --template` matches the model's format")

    if not ollama:
        reason = "--no-load given" if not cfg.load else (
            "ollama not found on PATH; install it from Ollama's site or set OLLAMA_CLI_PATH")
        log(f"not created ({reason}). To create it, run:")
        log(f"  {command}")
        _print_usage(log, url, name)
        return target

    create(ollama, name, target, log)
    answer = ask(url, name, persona_chat(cfg.persona)[-1]["content"])
    if answer is None:
        _no_server(log, url)
    else:
        log(f"Ollama answered through {url}: {one_line(answer, 300)!r}")
    _print_usage(log, url, name)
    return target
