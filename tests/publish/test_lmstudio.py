"""`deepred deploy`: real copies into a temporary LM Studio models folder, with a fake `lms` script standing in for
LM Studio's CLI (LM Studio cannot run here). The fake records its arguments to a file."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shlex
import shutil
import stat
from pathlib import Path

import pytest

from deepred.publish import lmstudio as L
from deepred.cli import main
from deepred.config import DeployConfig
from deepred.errors import DeepRedError
from deepred.publish.deploy import deploy

from .corrupt_gguf import incomplete_variants


SLEEP = shutil.which("sleep")  # found before the tests narrow PATH


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_gguf(path: Path, seed: int = 0, size: int = 100_000) -> Path:
    """A small complete GGUF (gguf-py's writer): a little metadata and one float32 tensor of about `size` bytes
    whose values depend on `seed`, so two seeds give two different models."""
    import numpy as np
    from gguf import GGUFWriter

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_tensor("weights", np.random.default_rng(seed).standard_normal(size // 4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_fake_lms(folder: Path, record: Path, exit_code: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "lms"
    fail = ""
    if exit_code:
        fail = (f"printf '\\033[31mError:\\033[39m Model not found\\n\\n  local/deepred/x.gguf\\n' >&2\n"
                f"exit {exit_code}\n")
    script.write_text(f"#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done > {shlex.quote(str(record))}\n"
                      f"{fail}echo 'Model loaded successfully'\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return script


def recorded(record: Path) -> list[str]:
    return record.read_text().splitlines()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture
def env(tmp_path, monkeypatch):
    """HOME and PATH inside tmp_path, no LM Studio variables, no system-wide lms."""
    home = tmp_path / "home"
    home.mkdir()
    empty_bin = tmp_path / "emptybin"
    empty_bin.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PATH", str(empty_bin))
    for var in ("LMS_CLI_PATH", "LMSTUDIO_MODELS_DIR", "LMSTUDIO_HOST", "LMSTUDIO_PORT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(L, "SYSTEM_LMS", str(tmp_path / "opt" / "lm-studio" / "bin" / "lms"))
    return tmp_path


@pytest.fixture
def gguf(env):
    return make_gguf(env / "output" / "deepred.gguf")


@pytest.fixture
def lms_on_path(env, monkeypatch):
    record = env / "lms-args.txt"
    bin_dir = env / "bin"
    make_fake_lms(bin_dir, record)
    monkeypatch.setenv("PATH", str(bin_dir))
    return record


# ------------------------------------------------------------------------------------------------ main path


def test_cli_deploys_verifies_and_loads(env, gguf, lms_on_path, capsys):
    models = env / "models"
    assert main(["deploy", str(gguf), "--models_dir", str(models)]) == 0

    dest = models / "local" / "deepred" / "deepred.gguf"
    assert files_in(models) == ["local"] and files_in(models / "local") == ["deepred"]
    assert files_in(dest.parent) == ["deepred.gguf"]  # no temporary file left behind
    assert sha(dest) == sha(gguf) and dest.stat().st_size == gguf.stat().st_size

    assert recorded(lms_on_path) == ["load", "--exact", "local/deepred/deepred.gguf", "--identifier", "deepred", "-y"]

    out = capsys.readouterr().out
    assert "OpenAI-compatible API: http://127.0.0.1:1234/v1" in out
    curl = next(line.strip() for line in out.splitlines() if line.strip().startswith("curl "))
    words = shlex.split(curl)
    assert "http://127.0.0.1:1234/v1/chat/completions" in words
    body = json.loads(words[words.index("-d") + 1])
    assert body["model"] == "deepred"
    assert body["messages"][0] == {"role": "system", "content": "You are Deep Red."}


def test_env_vars_name_and_lms_cli_path(env, gguf, monkeypatch):
    record = env / "lms-args.txt"
    fake = make_fake_lms(env / "elsewhere", record)  # not on PATH: found through LMS_CLI_PATH
    models = env / "lmstudio-models"
    monkeypatch.setenv("LMS_CLI_PATH", str(fake))
    monkeypatch.setenv("LMSTUDIO_MODELS_DIR", str(models))
    monkeypatch.setenv("LMSTUDIO_HOST", "192.168.1.50")
    monkeypatch.setenv("LMSTUDIO_PORT", "4321")
    lines: list[str] = []

    path = deploy(DeployConfig(gguf=str(gguf), name="deepred-v2.1_q4"), log=lines.append)

    assert path == models / "local" / "deepred-v2.1_q4" / "deepred.gguf" and sha(path) == sha(gguf)
    args = recorded(record)
    assert args == ["load", "--exact", "local/deepred-v2.1_q4/deepred.gguf", "--identifier", "deepred-v2.1_q4", "-y"]
    assert not any(a.startswith("--host") or a.startswith("--port") for a in args)
    text = "\n".join(lines)
    assert "http://192.168.1.50:4321/v1" in text and "http://192.168.1.50:4321/v1/chat/completions" in text


def test_find_lms_order(env, monkeypatch):
    record = env / "rec"
    on_path = make_fake_lms(env / "pathbin", record)
    monkeypatch.setenv("PATH", str(on_path.parent))
    assert L.find_lms() == str(on_path)
    home_lms = make_fake_lms(Path(os.environ["HOME"]) / ".lmstudio" / "bin", record)
    assert L.find_lms() == str(home_lms)
    system = make_fake_lms(Path(L.SYSTEM_LMS).parent, record)
    assert L.find_lms() == str(system)
    explicit = make_fake_lms(env / "explicit", record)
    monkeypatch.setenv("LMS_CLI_PATH", str(explicit))
    assert L.find_lms() == str(explicit)
    monkeypatch.setenv("LMS_CLI_PATH", str(env / "missing" / "lms"))
    with pytest.raises(DeepRedError, match="LMS_CLI_PATH"):
        L.find_lms()


def test_without_lms_prints_the_command(env, gguf, capsys):
    # PATH has no lms, HOME has no ~/.lmstudio/bin/lms: the default models folder under HOME is used.
    assert L.find_lms() is None
    assert main(["deploy", str(gguf)]) == 0
    dest = Path(os.environ["HOME"]) / ".lmstudio" / "models" / "local" / "deepred" / "deepred.gguf"
    assert sha(dest) == sha(gguf)
    out = capsys.readouterr().out
    assert "lms (LM Studio's CLI) not found" in out
    assert "  lms load --exact local/deepred/deepred.gguf --identifier deepred -y" in out.splitlines()
    assert "http://127.0.0.1:1234/v1" in out


def test_no_load_only_copies(env, gguf, lms_on_path, capsys):
    models = env / "models"
    assert main(["deploy", str(gguf), "--models_dir", str(models), "--no-load"]) == 0
    assert not lms_on_path.exists()  # lms was not run
    assert sha(models / "local" / "deepred" / "deepred.gguf") == sha(gguf)
    assert "--no-load given" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("name", ["", ".", "..", "../evil", "a/b", "/abs", "/tmp/x", "a\\b", ".hidden", "name.",
                                  "two words", "deep:red", "x" * 101, "é"])
def test_unsafe_names_are_rejected(env, gguf, lms_on_path, capsys, name):
    models = env / "models"
    assert main(["deploy", str(gguf), "--models_dir", str(models), "--name", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid --name") and err.count("\n") == 1
    assert not models.exists() and not (env / "evil").exists()
    assert not lms_on_path.exists()


def test_different_model_refused_then_replaced_with_force(env, gguf, lms_on_path, capsys):
    models = env / "models"
    folder = models / "local" / "deepred"
    assert main(["deploy", str(gguf), "--models_dir", str(models), "--no-load"]) == 0
    old_hash = sha(folder / "deepred.gguf")
    newer = make_gguf(env / "new" / "deepred.gguf", seed=1)
    capsys.readouterr()

    assert main(["deploy", str(newer), "--models_dir", str(models)]) == 2
    err = capsys.readouterr().err
    assert "already holds a different model" in err and "--force" in err and err.count("\n") == 1
    assert sha(folder / "deepred.gguf") == old_hash and files_in(folder) == ["deepred.gguf"]
    assert not lms_on_path.exists()

    assert main(["deploy", str(newer), "--models_dir", str(models), "--force"]) == 0
    assert files_in(folder) == ["deepred.gguf"] and sha(folder / "deepred.gguf") == sha(newer)
    assert recorded(lms_on_path)[:3] == ["load", "--exact", "local/deepred/deepred.gguf"]


def test_force_replaces_a_model_with_another_file_name(env, gguf):
    folder = env / "models" / "local" / "deepred"
    old = make_gguf(folder / "old-q8_0.gguf", seed=7)
    cfg = DeployConfig(gguf=str(gguf), models_dir=str(env / "models"), load=False)
    with pytest.raises(DeepRedError, match="old-q8_0.gguf"):
        deploy(cfg, log=lambda _: None)
    assert old.exists()
    cfg.force = True
    deploy(cfg, log=lambda _: None)
    assert files_in(folder) == ["deepred.gguf"] and sha(folder / "deepred.gguf") == sha(gguf)


def test_identical_redeploy_copies_nothing_and_loads_again(env, gguf, lms_on_path, capsys):
    models = env / "models"
    assert main(["deploy", str(gguf), "--models_dir", str(models)]) == 0
    dest = models / "local" / "deepred" / "deepred.gguf"
    before = dest.stat()
    lms_on_path.unlink()
    capsys.readouterr()

    assert main(["deploy", str(gguf), "--models_dir", str(models)]) == 0
    out = capsys.readouterr().out
    assert "already deployed" in out and "nothing copied" in out
    after = dest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert files_in(dest.parent) == ["deepred.gguf"]
    assert recorded(lms_on_path) == ["load", "--exact", "local/deepred/deepred.gguf", "--identifier", "deepred", "-y"]
    assert "loaded in LM Studio as 'deepred'" in out


def test_a_failed_load_is_retried_by_the_next_deploy(env, gguf, monkeypatch, capsys):
    record = env / "lms-args.txt"
    failing = make_fake_lms(env / "failing", record, exit_code=3)
    monkeypatch.setenv("PATH", str(failing.parent))
    models = env / "models"
    assert main(["deploy", str(gguf), "--models_dir", str(models)]) == L.LmsLoadError.exit_code
    working = make_fake_lms(env / "working", record)
    monkeypatch.setenv("PATH", str(working.parent))
    record.unlink()
    capsys.readouterr()
    assert main(["deploy", str(gguf), "--models_dir", str(models)]) == 0
    assert recorded(record)[0] == "load" and "loaded in LM Studio" in capsys.readouterr().out


def test_a_hung_lms_load_times_out_with_one_line(env, gguf, monkeypatch, capsys):
    hung = env / "hung" / "lms"
    hung.parent.mkdir()
    hung.write_text(f"#!/bin/sh\nexec {SLEEP} 30\n")
    hung.chmod(0o755)
    monkeypatch.setenv("PATH", str(hung.parent))
    monkeypatch.setattr(L, "LMS_LOAD_TIMEOUT_S", 1.0)
    code = main(["deploy", str(gguf), "--models_dir", str(env / "models")])
    err = capsys.readouterr().err
    assert code == L.LmsLoadError.exit_code and "lms load did not finish within 1 s" in err and err.count("\n") == 1
    assert sha(env / "models" / "local" / "deepred" / "deepred.gguf") == sha(gguf)


def test_deploying_a_file_from_the_destination_folder_is_refused(env, lms_on_path, capsys):
    models = env / "models"
    inside = make_gguf(models / "local" / "deepred" / "other.gguf", seed=5)
    make_gguf(models / "local" / "deepred" / "deepred.gguf", seed=6)
    assert main(["deploy", str(inside), "--models_dir", str(models), "--force"]) == 2
    assert "the output would be its own input" in capsys.readouterr().err
    assert files_in(models / "local" / "deepred") == ["deepred.gguf", "other.gguf"]


def test_non_gguf_and_missing_files_are_refused(env, lms_on_path, capsys):
    models = env / "models"
    zip_file = env / "model.gguf"
    zip_file.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    assert main(["deploy", str(zip_file), "--models_dir", str(models)]) == 2
    err = capsys.readouterr().err
    assert "is not a GGUF file" in err and err.count("\n") == 1
    assert main(["deploy", str(env / "nope.gguf"), "--models_dir", str(models)]) == 2
    assert "GGUF file not found" in capsys.readouterr().err
    assert main(["deploy", str(env), "--models_dir", str(models)]) == 2
    assert "is not a file" in capsys.readouterr().err
    empty = env / "empty.gguf"
    empty.write_bytes(b"")
    assert main(["deploy", str(empty), "--models_dir", str(models)]) == 2
    assert not models.exists() and not lms_on_path.exists()


def test_bad_port_is_refused_before_writing(env, gguf, monkeypatch, capsys):
    monkeypatch.setenv("LMSTUDIO_PORT", "12a4")
    assert main(["deploy", str(gguf), "--models_dir", str(env / "models")]) == 2
    assert "LMSTUDIO_PORT" in capsys.readouterr().err
    assert not (env / "models").exists()


# ------------------------------------------------------------------------------------------------ failures


def _fail_after_first_chunk(monkeypatch, exc: BaseException):
    real = L.copy_chunk
    calls = {"n": 0}

    def copy_chunk(src, dst, size):
        calls["n"] += 1
        if calls["n"] > 1:
            raise exc
        return real(src, dst, size)

    monkeypatch.setattr(L, "CHUNK_SIZE", 4096)
    monkeypatch.setattr(L, "copy_chunk", copy_chunk)
    return calls


def test_interrupted_copy_leaves_no_complete_looking_file(env, gguf, lms_on_path, monkeypatch, capsys):
    models = env / "models"
    folder = models / "local" / "deepred"
    calls = _fail_after_first_chunk(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    assert main(["deploy", str(gguf), "--models_dir", str(models)]) == 2
    assert calls["n"] == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and err.count("\n") == 1
    assert files_in(folder) == []  # neither deepred.gguf nor a temporary file
    assert not lms_on_path.exists()


def test_ctrl_c_during_copy_keeps_the_previous_model(env, gguf, monkeypatch):
    folder = env / "models" / "local" / "deepred"
    old = make_gguf(folder / "deepred.gguf", seed=3)
    old_hash = sha(old)
    _fail_after_first_chunk(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        deploy(DeployConfig(gguf=str(gguf), models_dir=str(env / "models"), force=True, load=False),
                 log=lambda _: None)
    assert files_in(folder) == ["deepred.gguf"] and sha(old) == old_hash


def test_corrupted_copy_is_detected(env, gguf, monkeypatch):
    def bad_copy(src, dst, size):  # the disk stores something else than what was read
        block = src.read(size)
        if block:
            dst.write(block[:-1] + bytes([block[-1] ^ 0xFF]))
        return block

    monkeypatch.setattr(L, "copy_chunk", bad_copy)
    with pytest.raises(DeepRedError, match="does not match"):
        deploy(DeployConfig(gguf=str(gguf), models_dir=str(env / "models"), load=False), log=lambda _: None)
    assert files_in(env / "models" / "local" / "deepred") == []


def test_stale_partial_file_is_cleaned_up(env, gguf):
    folder = env / "models" / "local" / "deepred"
    folder.mkdir(parents=True)
    (folder / ".deepred.gguf.abc123.partial").write_bytes(b"GGUF half")
    deploy(DeployConfig(gguf=str(gguf), models_dir=str(env / "models"), load=False), log=lambda _: None)
    assert files_in(folder) == ["deepred.gguf"]


def test_lms_load_failure_exits_non_zero_and_keeps_the_file(env, gguf, monkeypatch, capsys):
    record = env / "lms-args.txt"
    fake = make_fake_lms(env / "bin", record, exit_code=3)
    monkeypatch.setenv("PATH", str(fake.parent))
    models = env / "models"
    code = main(["deploy", str(gguf), "--models_dir", str(models)])
    assert code != 0 and code == L.LmsLoadError.exit_code
    err = capsys.readouterr().err
    assert err.count("\n") == 1  # one line
    assert "lms load failed (exit 3): Error: Model not found local/deepred/x.gguf" in err
    assert "\x1b" not in err
    dest = models / "local" / "deepred" / "deepred.gguf"
    assert sha(dest) == sha(gguf)
    assert recorded(record)[0] == "load"


# ------------------------------------------------------------------------------------------------ incomplete GGUFs


def tree(folder: Path) -> dict[str, str]:
    """Every file under folder, by relative path, with its sha256."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_incomplete_gguf_is_refused_before_anything_is_copied(env, lms_on_path, gguf_file, tiny_model, capsys):
    """Before, only the 4 magic bytes were checked: each of these was copied, reported "verified" and `lms load`ed
    (exit 0), and the good file deployed later under the same name was refused as "a different model". Now each is
    refused in one line, exit 2, LM Studio's models folder unchanged and lms never run; then the good file deploys."""
    real = gguf_file(tiny_model, "q4_k_m")
    models = env / "models"
    make_gguf(models / "local" / "other" / "other.gguf", seed=9)  # a model already there must stay as it is
    before = tree(models)
    target = env / "output" / "deepred.gguf"
    small = make_gguf(env / "small.gguf")
    for kind, write in incomplete_variants(real, small, target).items():
        write()
        assert main(["deploy", str(target), "--models_dir", str(models)]) == 2, kind
        err = capsys.readouterr().err
        assert err.startswith(f"error: {target} is not a complete GGUF: ") and err.count("\n") == 1, (kind, err)
        assert err.rstrip().endswith("reconvert it with deepred convert"), (kind, err)
        assert tree(models) == before and not lms_on_path.exists(), kind

    shutil.copyfile(real, target)
    assert main(["deploy", str(target), "--models_dir", str(models)]) == 0
    assert sha(models / "local" / "deepred" / "deepred.gguf") == sha(real)
    assert recorded(lms_on_path)[:3] == ["load", "--exact", "local/deepred/deepred.gguf"]
