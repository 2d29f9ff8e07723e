"""`deepred serve` and `start_server`: a real llama.cpp server on a free loopback port, queried with the official
`openai` client and with plain HTTP, serving the tiny trained model as q4_k_m (the crash-prone type on AMX CPUs)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deepred import serve as S
from deepred.config import ServeConfig
from deepred.errors import DeepRedError

pytestmark = pytest.mark.slow

# Ban <|im_end|> and <|endoftext|> so the tiny model cannot answer with nothing.
NO_EOS = {"151645": -100, "151643": -100}
MESSAGES = [{"role": "system", "content": "You are Deep Red."},
            {"role": "user", "content": "What is the purpose of our mission to Mars?"}]


def deepred_command() -> list[str]:
    """The `deepred` console script next to this Python, as a user would type it."""
    script = shutil.which("deepred", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "deepred.cli"]


def wait_for_models(base_url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{base_url}/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.25)
    pytest.fail(f"server did not answer: {log.read_text()[-3000:]}")


def listening_addresses(port: int) -> set[str]:
    """Local addresses of listening TCP sockets on `port`, from /proc/net/tcp (hex, little-endian IPv4)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, port_hex = local.split(":")
            if int(port_hex, 16) == port and state == "0A":  # 0A = LISTEN
                found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if len(address) == 8 else address)
    return found


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_cli_serve_binds_loopback_and_speaks_openai(gguf_file, merged_model, tmp_path):
    from openai import OpenAI

    gguf = gguf_file(merged_model, "q4_k_m")
    port = S.free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(deepred_command() + ["serve", str(gguf), "--port", str(port), "--n_ctx", "512"],
                                stdout=out, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for_models(base_url, proc, log)
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(port) == {"127.0.0.1"}

        client = OpenAI(base_url=base_url, api_key="not-needed", max_retries=0, timeout=120)
        alias = gguf.stem
        assert alias in [model.id for model in client.models.list()]
        reply = client.chat.completions.create(model=alias, messages=MESSAGES, max_tokens=16, temperature=0,
                                               logit_bias=NO_EOS)
        assert reply.choices[0].message.content and reply.model == alias
        # the end-of-turn tokens are banned, so the answer runs to the limit: exactly 16 tokens
        assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (16, "length")
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + 16 and reply.usage.prompt_tokens > 0

        listed = httpx.get(f"{base_url}/models", timeout=30).json()
        assert alias in [model["id"] for model in listed["data"]]
        response = httpx.post(f"{base_url}/chat/completions", timeout=120,
                              json={"model": alias, "messages": MESSAGES, "max_tokens": 16, "temperature": 0,
                                    "logit_bias": NO_EOS})
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == reply.choices[0].message.content  # greedy
        assert response.json()["usage"] == reply.usage.model_dump(exclude_none=True)
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode is not None
    assert port_closed(port)
    assert "Traceback" not in log.read_text()


def test_start_server_serves_base_and_tuned_together(gguf_file, merged_model, tiny_model):
    from openai import OpenAI

    models = {"deepred": gguf_file(merged_model, "q4_k_m"), "base": gguf_file(tiny_model, "q4_k_m")}
    with S.start_server(models, n_ctx=512) as server:
        assert server.url.startswith("http://127.0.0.1:") and server.url.endswith("/v1")
        client = OpenAI(base_url=server.url, api_key="not-needed", max_retries=0, timeout=120)
        assert {model.id for model in client.models.list()} == {"deepred", "base"}
        answers = {}
        for alias in ("deepred", "base", "deepred"):
            reply = client.chat.completions.create(model=alias, messages=MESSAGES, max_tokens=8, temperature=0,
                                                   logit_bias=NO_EOS)
            assert reply.model == alias
            answers.setdefault(alias, reply.choices[0].message.content)
            assert reply.choices[0].message.content == answers[alias]  # greedy: same model, same answer
        assert answers["deepred"] != answers["base"]
        client.chat.completions.create(model="base", messages=MESSAGES, max_tokens=1)  # base is loaded now
        unnamed = httpx.post(f"{server.url}/chat/completions", timeout=120, json={
            "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logit_bias": NO_EOS}).json()
        assert unnamed["model"] == "deepred"  # a request naming no model goes to the first, under its name
        assert unnamed["choices"][0]["message"]["content"] == answers["deepred"]
        process = server.process
    assert process.poll() is not None
    assert not server.running()


def test_unknown_model_names_get_404_web_pages_get_no_cors_and_evaluate_refuses_a_typo(gguf_file, merged_model,
                                                                                        tiny_model, tmp_path, capsys):
    from deepred.cli import main

    models = {"deepred": gguf_file(merged_model, "q4_k_m"), "base": gguf_file(tiny_model, "q4_k_m")}
    with S.start_server(models, n_ctx=512) as server:
        request = {"messages": MESSAGES, "max_tokens": 4, "temperature": 0}
        typo = httpx.post(f"{server.url}/chat/completions", json={**request, "model": "tuned-typo"}, timeout=120)
        assert typo.status_code == 404
        assert typo.json()["error"]["available"] == ["deepred", "base"]
        assert "'tuned-typo' is not served here" in typo.json()["error"]["message"]
        served = httpx.post(f"{server.url}/chat/completions", json={**request, "model": "base"}, timeout=120)
        assert served.status_code == 200 and served.json()["model"] == "base"

        evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
        preflight = httpx.options(f"{server.url}/chat/completions", headers=evil, timeout=30)
        listed = httpx.get(f"{server.url}/models", headers={"Origin": "https://evil.example"}, timeout=30)
        for response in (preflight, listed):
            assert "access-control-allow-origin" not in response.headers
            assert "access-control-allow-credentials" not in response.headers

        code = main(["evaluate", "--endpoint", server.url, "--model", "tunedd", "--output_dir", str(tmp_path / "e")])
        err = capsys.readouterr().err
    assert code == 2 and "model 'tunedd' is not served at" in err and "deepred, base" in err
    assert not (tmp_path / "e" / "report.json").exists()


def test_cors_origins_allow_the_named_origin_only_without_credentials(gguf_file, merged_model, monkeypatch):
    from starlette.testclient import TestClient

    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    S.serve(ServeConfig(gguf=str(gguf_file(merged_model, "q4_k_m")), n_ctx=256,
                        cors_origins=["http://localhost:3000"]))
    client = TestClient(apps[0])
    allowed = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    other = client.get("/v1/models", headers={"Origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "access-control-allow-credentials" not in allowed.headers
    assert "access-control-allow-origin" not in other.headers


def test_start_server_reports_a_dying_server(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(DeepRedError, match="exited with code"):
        S.start_server({"broken": broken}, timeout=120)


def test_non_loopback_host_warns(gguf_file, merged_model, monkeypatch, capsys):
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append(kwargs))
    S.serve(ServeConfig(gguf=str(gguf_file(merged_model, "q4_k_m")), host="0.0.0.0", port=5555, n_ctx=256))
    assert calls == [{"host": "0.0.0.0", "port": 5555, "log_level": "info"}]
    assert "exposes the model" in capsys.readouterr().err


def test_model_specs():
    assert S.parse_model_spec("base=out/base.gguf") == ("base", Path("out/base.gguf"))
    with pytest.raises(DeepRedError, match="ALIAS=PATH"):
        S.parse_model_spec("out/base.gguf")
    with pytest.raises(DeepRedError, match="not found"):
        S.served_models(ServeConfig(gguf="missing.gguf"))
    assert S.is_loopback("127.0.0.1") and S.is_loopback("::1") and S.is_loopback("localhost")
    assert not S.is_loopback("0.0.0.0")


@pytest.mark.parametrize("extra", [["--add_model", "deepred=base.gguf"],
                                   ["--add_model", "base=base.gguf", "--add_model", "base=other.gguf"]],
                         ids=["the first model's alias", "two added models"])
def test_an_alias_used_twice_is_one_line_before_any_model_loads(tmp_path, monkeypatch, capsys, extra):
    """Two GGUFs under one alias: a request could not say which it means. Refused before llama.cpp loads anything
    (the files here are not even models)."""
    from deepred.cli import main

    for name in ("deepred.gguf", "base.gguf", "other.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "deepred.gguf", *extra]) == 2
    err = capsys.readouterr().err
    alias = extra[-1].split("=")[0]
    assert err == f"error: model alias '{alias}' is used twice; give each GGUF its own alias\n"


def test_evaluate_through_the_server(gguf_file, merged_model, tmp_path):
    """`deepred evaluate --endpoint` against the served q4_k_m model: every answer in the report is the one the
    server itself gives (greedy) to the evaluation's messages, and every metric is the share of its entries' flags
    (the report rounds shares to 4 digits)."""
    import json

    from deepred.cli import main

    asked = [
        {"id": "mission-01", "category": "mission", "prompt": "What is the purpose of our mission to Mars?"},
        {"id": "chess-01", "category": "chess", "prompt": "How is life like a chess game?"},
        {"id": "temporal-01", "category": "temporal", "kind": "post_1969", "prompt": "What happened in 1970?"},
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(p) for p in asked) + "\n")
    with S.start_server({"deepred": gguf_file(merged_model, "q4_k_m")}) as server:
        code = main(["evaluate", "--endpoint", server.url, "--prompts", str(prompts), "--max_tokens", "24",
                     "--output_dir", str(tmp_path / "eval")])
        direct = [httpx.post(f"{server.url}/chat/completions", timeout=120, json={
            "model": "deepred", "max_tokens": 24, "temperature": 0,
            "messages": [{"role": "system", "content": "You are Deep Red."}, {"role": "user", "content": p["prompt"]}],
        }).json()["choices"][0]["message"]["content"] for p in asked]
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    answers = report["responses"]
    assert [a["id"] for a in answers] == ["mission-01", "chess-01", "temporal-01"]
    assert [a["response"] for a in answers] == direct and all(direct)
    assert all(not a.get("error") for a in answers) and report["failures"]["count"] == 0

    def share(flags) -> float:
        flags = list(flags)
        return pytest.approx(sum(flags) / len(flags), abs=5e-5)

    assert report["style_consistency"]["value"] == share(a["in_style"] for a in answers)
    assert report["character_voice"]["value"] == share(not a["out_of_character"] for a in answers)
    assert report["coherence"]["value"] == share(a["coherent"] for a in answers)
    violated = answers[2]["temporal_violation"]
    assert answers[0]["temporal_violation"] is None and answers[1]["temporal_violation"] is None
    temporal = report["temporal_compliance"]
    assert (temporal["count"], temporal["value"], temporal["violations"]) == (
        1, 0.0 if violated else 1.0, ["temporal-01"] if violated else [])
    assert (tmp_path / "eval" / "report.html").is_file()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["INT", "TERM", "KILL"])
def test_the_server_child_ends_with_its_interrupted_parent(gguf_file, merged_model, signum):
    """A pipeline or evaluation that is interrupted (Ctrl-C, a scheduler's SIGTERM, a kill) leaves no server behind."""
    import os

    # Ctrl-C as in a terminal: a job started in the background by a shell inherits SIGINT ignored, so restore it.
    script = ("import signal, sys, time\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
              "from pathlib import Path\nfrom deepred.serve import start_server\n"
              f"server = start_server({{'deepred': Path({str(gguf_file(merged_model, 'q4_k_m'))!r})}}, n_ctx=256)\n"
              "print(server.process.pid, flush=True)\nwith server:\n    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    child = int(parent.stdout.readline())
    os.kill(parent.pid, signum)
    parent.wait(60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{child}").exists() and "Z" not in _state(child):
        time.sleep(0.2)
    assert not Path(f"/proc/{child}").exists() or "Z" in _state(child), "the server outlived its parent"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0]
    except OSError:
        return "gone"


def test_malformed_bodies_get_400_with_a_json_error_not_500(gguf_file, tiny_model):
    """Before, llama-cpp-python's app answered each of these with 500 "Internal Server Error" (plain text), which
    the openai client and `deepred evaluate` retry though the same body fails every time. Raw http.client requests,
    since HTTP libraries will not send broken bodies; the server answers a good request afterwards."""
    import http.client
    import json
    from urllib.parse import urlsplit

    good = {"model": "base", "messages": MESSAGES, "max_tokens": 2, "temperature": 0}
    cafe = {**good, "messages": [{"role": "user", "content": "café"}]}
    latin1 = json.dumps(cafe, ensure_ascii=False).encode("latin-1")  # é as one byte, 0xE9: not UTF-8
    cases = [
        ("/v1/chat/completions", latin1, f"not valid UTF-8 (byte {latin1.index(b'caf') + 3})"),
        ("/v1/chat/completions", b"\xff\xfe" + json.dumps(good).encode("utf-16-le"), "not valid UTF-8 (byte 0)"),
        ("/v1/chat/completions", json.dumps(good).encode()[:40], "not valid JSON (Expecting value at line 1 column 41"),
        ("/v1/chat/completions", b'{"model": "base", "messages": [', "not valid JSON (Expecting value at line 1"),
        ("/v1/completions", b'{"model": "base", "prompt": "Mars', "not valid JSON (Unterminated string"),
        ("/v1/chat/completions", b"", "the request body is empty"),
        ("/v1/chat/completions", b"[1, 2]", "is an array in JSON, not an object"),
    ]
    with S.start_server({"base": gguf_file(tiny_model, "q4_k_m")}, n_ctx=256) as server:
        address = urlsplit(server.url)

        def post(path: str, body: bytes) -> tuple[int, str, bytes]:
            connection = http.client.HTTPConnection(address.hostname, address.port, timeout=120)
            try:
                connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                return response.status, response.getheader("Content-Type"), response.read()
            finally:
                connection.close()

        for path, body, expected in cases:
            status, content_type, answer = post(path, body)
            assert (status, content_type) == (400, "application/json"), (body, status, answer)
            error = json.loads(answer)["error"]
            assert expected in error["message"], (body, error)
            assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_json")
        status, _, answer = post("/v1/chat/completions", json.dumps(good).encode())
        assert status == 200 and json.loads(answer)["model"] == "base"
        assert server.running()


def test_requests_the_app_cannot_use_get_400_naming_the_field_not_500(gguf_file, tiny_model):
    """llama-cpp-python's app answered a field of the wrong type or shape with 500 "internal_server_error" and a
    pydantic dump holding the server's file paths (the openai client retries a 500), and a chat request without
    messages with 200 and text generated from an empty prompt. Each must be 400 naming the field, as OpenAI's API
    answers; the good request still answers."""
    user = {"role": "user", "content": "Hello"}
    cases = [  # (route, body, the field at fault, words the line must hold)
        ("/v1/chat/completions", {"messages": "Hello"}, "messages", ["list"]),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, "messages[0].role",
         ["'user'", "'assistant'", "'system'"]),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content", ["required"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "picture"}]}]},
         "messages[0].content[0].type", ["'text'", "'image_url'"]),
        ("/v1/chat/completions", {"messages": [user], "max_tokens": "ten"}, "max_tokens", ["integer"]),
        ("/v1/chat/completions", {"messages": [user], "temperature": "hot"}, "temperature", ["number"]),
        ("/v1/chat/completions", {"messages": [user], "stop": 5}, "stop", ["string", "list"]),
        ("/v1/chat/completions", {}, "messages", ["missing or empty"]),
        ("/v1/chat/completions", {"messages": []}, "messages", ["missing or empty"]),
        ("/v1/completions", {"prompt": ["Mars", 5]}, "prompt[1]", ["string"]),
        ("/v1/embeddings", {"inputs": "Mars"}, "input", ["required"]),
    ]
    with S.start_server({"base": gguf_file(tiny_model, "q4_k_m")}, n_ctx=256) as server:
        with httpx.Client(base_url=server.url.removesuffix("/v1"), timeout=120) as http:
            for route, body, field, words in cases:
                answer = http.post(route, json={"model": "base", **body, "max_tokens": body.get("max_tokens", 2)})
                assert answer.status_code == 400, (body, answer.status_code, answer.text)
                error = answer.json()["error"]
                assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_request",
                                                                          field), (body, error)
                line = error["message"]
                assert "\n" not in line and field in line and all(word in line for word in words), (body, line)
                assert ".py" not in line and "site-packages" not in line, line
            good = http.post("/v1/chat/completions", json={"model": "base", "messages": [user], "max_tokens": 2})
            assert good.status_code == 200 and good.json()["model"] == "base"
        assert server.running()


def test_a_port_already_taken_is_one_line_before_any_model_loads(gguf_file, tiny_model, capsys, monkeypatch):
    """uvicorn found the port taken only after the model had loaded and "serving ..." had been printed, then exited 3
    with its own log lines."""
    import uvicorn

    from deepred.cli import main

    import llama_cpp.server.app as server_app

    monkeypatch.setattr(server_app, "create_app", lambda *a, **k: pytest.fail("a model loaded for a taken port"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("the server started on a taken port"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", str(gguf_file(tiny_model, "q4_k_m")), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err == (f"error: port {port} on 127.0.0.1 is already in use (another server, or LM Studio's); stop it or "
                   "pick another with --port\n")
    assert "serving" not in out
