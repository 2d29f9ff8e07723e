"""`deepred serve`: an OpenAI-compatible endpoint for GGUF files, like LM Studio's local server, without LM Studio.

It runs llama-cpp-python's server app (`/v1/chat/completions`, `/v1/models`, chat template from the GGUF) in this
process with uvicorn, so the weight-repacking workaround of `deepred.llama_runtime` applies to every model it loads.
Several GGUFs can be served at once (`--add_model ALIAS=PATH`, or `start_server({...})`): llama-cpp-python keeps one
in memory and swaps on demand when a request names another, which suits base-vs-tuned evaluation runs.

`start_server` launches the server as a child process on a free loopback port and waits until it answers.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .chat_template import has_system_role
from .config import ServeConfig
from .errors import DeepRedError
from .gguf_file import read_fields
from .llama_runtime import assert_no_repacking, cpu_threads, die_with_parent, weight_repacking_disabled
from .serve_requests import RequestFilter

STARTUP_TIMEOUT_S = 180.0


def add_model_argument(parser) -> None:
    """The `--add_model ALIAS=PATH` flag of `deepred serve` (ServeConfig holds the first model)."""
    parser.add_argument("--add_model", action="append", default=[], metavar="ALIAS=PATH",
                        help="serve another GGUF from the same server under ALIAS (repeatable), e.g. base=base.gguf")


def parse_model_spec(spec: str) -> tuple[str, Path]:
    alias, sep, path = spec.partition("=")
    if not sep or not alias.strip() or not path.strip():
        raise DeepRedError(f"--add_model {spec!r}: expected ALIAS=PATH, e.g. --add_model base=output/base.gguf")
    return alias.strip(), Path(path.strip())


def default_alias(gguf: Path) -> str:
    return gguf.name[:-5] if gguf.name.lower().endswith(".gguf") else gguf.name


def served_models(cfg: ServeConfig, add_model: list[str] | None = None) -> dict[str, Path]:
    """alias -> GGUF path, first one the default; every file must exist and every alias be unique."""
    first = Path(cfg.gguf).expanduser()
    models = {cfg.model_alias or default_alias(first): first}
    for spec in add_model or []:
        alias, path = parse_model_spec(spec)
        if alias in models:
            raise DeepRedError(f"model alias {alias!r} is used twice; give each GGUF its own alias")
        models[alias] = path.expanduser()
    for alias, path in models.items():
        if not path.is_file():
            raise DeepRedError(f"GGUF file not found: {path} (model {alias!r}); convert one with `deepred convert`")
    return models


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server holds before any model loads (uvicorn would say so after the model loaded and
    after "serving ..." was printed); bound as uvicorn binds it, with SO_REUSEADDR."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise DeepRedError(f"--host {host}: not an address of this machine ({exc.strerror}); use 127.0.0.1") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise DeepRedError(f"port {port} on {host} is already in use (another server, or LM Studio's); stop "
                                   "it or pick another with --port") from exc
            raise DeepRedError(f"cannot listen on {host}:{port} ({exc.strerror}); use --host 127.0.0.1 and a port "
                               "above 1023") from exc


def serve(cfg: ServeConfig, add_model: list[str] | None = None, log=print) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ConfigFileSettings, ModelSettings, ServerSettings

    models = served_models(cfg, add_model)
    check_port_free(cfg.host, cfg.port)
    if not is_loopback(cfg.host):
        print(f"warning: binding {cfg.host} exposes the model to anyone who can reach this machine, without "
              "authentication; use --host 127.0.0.1 to keep it local", file=sys.stderr)
    # The same shape as llama-cpp-python's --config_file (ConfigFileSettings), built in memory.
    settings = ConfigFileSettings(host=cfg.host, port=cfg.port, models=[
        ModelSettings(model=str(path), model_alias=alias, n_ctx=cfg.n_ctx, n_gpu_layers=cfg.n_gpu_layers,
                      n_threads=cpu_threads(), n_threads_batch=cpu_threads(), verbose=False)
        for alias, path in models.items()])
    # Kept on for the server's whole life: it reloads a model whenever a request switches to another alias.
    with weight_repacking_disabled():
        try:
            app = create_app(server_settings=ServerSettings.model_validate(settings), model_settings=settings.models)
        except ValueError as exc:  # llama.cpp could not load the first model
            raise DeepRedError(f"llama.cpp cannot load {next(iter(models.values()))} ({exc}); the file is damaged or "
                               "not a GGUF model: convert it again with `deepred convert`") from exc
        app = _locked_down(app, list(models), cfg.cors_origins, models_without_system_role(models))
        proxy = _llama_proxy()
        if proxy is not None and proxy._current_model is not None:
            assert_no_repacking(proxy._current_model)
        names = ", ".join(f"{alias} ({path.name})" for alias, path in models.items())
        log(f"serving {names} at http://{_url_host(cfg.host)}:{cfg.port}/v1 (OpenAI API; Ctrl-C stops)")
        try:
            uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
        finally:
            if proxy is not None:
                proxy.free()  # closes the model now instead of at interpreter exit


def models_without_system_role(models: dict[str, Path]) -> set[str]:
    """The aliases whose GGUF chat template has no system role, rendered as llama-cpp-python renders it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    aliases = set()
    for alias, path in models.items():
        field = read_fields(path).get("tokenizer.chat_template")
        if field is None:  # llama-cpp-python's fallback format, which has a system role
            continue
        formatter = Jinja2ChatFormatter(template=str(field.contents()), eos_token="", bos_token="")
        if not has_system_role(lambda messages: formatter(messages=messages).prompt):
            aliases.add(alias)
    return aliases


def _locked_down(app, names: list[str], cors_origins: list[str], without_system_role: set[str]):
    """Answer only for the models listed, and let only the given web origins call from a browser.

    llama-cpp-python answers a request for any `model` with its current model, under the requested name, and
    allows every origin with credentials: any web page open in the user's browser could drive the local model.
    """
    from starlette.middleware.cors import CORSMiddleware

    app.user_middleware = [m for m in app.user_middleware if m.cls is not CORSMiddleware]
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_credentials=False,
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    return RequestFilter(app, names, without_system_role)


def _llama_proxy():
    from llama_cpp.server import app as server_app

    return getattr(server_app, "_llama_proxy", None)


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


# ------------------------------------------------------------------------------------------------ child process


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class ServerHandle:
    """A running `deepred serve` child process. `.url` is the OpenAI base URL (ends in /v1)."""

    def __init__(self, process: subprocess.Popen, url: str, models: dict[str, Path], log_path: Path):
        self.process = process
        self.url = url
        self.models = models
        self.log_path = log_path

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def stop(self, timeout: float = 20.0, keep_log: bool = False) -> int:
        """Graceful stop (SIGTERM), then SIGKILL after `timeout` s; returns the exit code. Safe to call twice."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if not keep_log:
            self.log_path.unlink(missing_ok=True)
        return self.process.returncode

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _server_command(models: dict[str, Path], host: str, port: int, n_ctx: int) -> list[str]:
    (alias, path), *others = models.items()
    command = [sys.executable, "-m", "deepred.cli", "serve", str(path), "--model_alias", alias,
               "--host", host, "--port", str(port), "--n_ctx", str(n_ctx)]
    for other_alias, other_path in others:
        command += ["--add_model", f"{other_alias}={other_path}"]
    return command


def _child_env() -> dict[str, str]:
    """Make the child import this same deepred even when it is not installed."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_server(models: dict[str, Path], host: str = "127.0.0.1", port: int | None = None, n_ctx: int = 4096,
                 timeout: float = STARTUP_TIMEOUT_S) -> ServerHandle:
    """Launch `deepred serve` for {alias: gguf} in a child process and return once /v1/models answers."""
    import httpx

    if not models:
        raise DeepRedError("start_server needs at least one {alias: path/to/model.gguf}")
    models = {alias: Path(path).expanduser().absolute() for alias, path in models.items()}
    for alias, path in models.items():
        if not path.is_file():
            raise DeepRedError(f"GGUF file not found: {path} (model {alias!r}); convert one with `deepred convert`")
    port = port or free_port(host)
    log_file = tempfile.NamedTemporaryFile(prefix="deepred-serve-", suffix=".log", delete=False)
    with log_file:
        process = subprocess.Popen(_server_command(models, host, port, n_ctx), stdout=log_file,
                                   stderr=subprocess.STDOUT, env=_child_env(),  # it must not outlive us (Linux)
                                   preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
    handle = ServerHandle(process, f"http://{_url_host(host)}:{port}/v1", models, Path(log_file.name))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.running():
            raise DeepRedError(f"deepred serve exited with code {process.returncode} before answering; "
                               f"its log ({handle.log_path}): {handle.log_tail()}")
        try:
            if httpx.get(f"{handle.url}/models", timeout=2.0).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    handle.stop(keep_log=True)
    raise DeepRedError(f"deepred serve did not answer on {handle.url} within {timeout:.0f} s; "
                       f"its log ({handle.log_path}): {handle.log_tail()}")
