"""Faults a user meets, reproduced with real processes: two writers on one folder, a writer killed mid-way (its
lock and temporaries left behind), a replacement killed between its renames, a folder that cannot be written, and
Ctrl-C in `deepred run`. Each test fails if its guard is taken away."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepred.cli import main
from deepred.errors import file_system_refusal
from deepred.files import LOCK, FolderBusy, folder_lock, output_lock, partial_path, remove_stale_partials_in
from deepred.gguf_file import is_gguf
from deepred.records import MERGE_RECORD
from deepred.train.run_dir import latest_checkpoint

from .conftest import DATA

CLI = [sys.executable, "-m", "deepred.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def busy_line(pid: int, subject) -> str:
    """The refusal the issue asks for, word for word, followed by what to do."""
    return f"another deepred process (PID {pid}) is using {subject}; wait for it to finish, or stop it, then run this again"


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def hold_lock(folder: Path, seconds: float, start_at: float = 0.0) -> subprocess.Popen:
    """A child process that takes folder_lock(folder) (at wall-clock time start_at), says what happened on stdout and
    holds the lock for `seconds`."""
    script = textwrap.dedent(f"""
        import time
        from deepred.files import FolderBusy, folder_lock
        while time.time() < {start_at}:
            pass
        try:
            with folder_lock({str(folder)!r}, log=lambda line: print(line, flush=True)):
                print("locked", flush=True)
                time.sleep({seconds})
        except FolderBusy as exc:
            print(exc, flush=True)
    """)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------------------------
# the lock itself (no model: quick)


def test_a_second_process_is_refused_with_the_holders_pid_and_touches_nothing(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder, seconds=60)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = (folder / LOCK).read_text()
        with pytest.raises(FolderBusy) as refused:
            with folder_lock(folder, log=pytest.fail):
                pytest.fail("the lock was given twice")
        assert str(refused.value) == busy_line(holder.pid, folder)
        assert refused.value.exit_code == 2
        assert (folder / LOCK).read_text() == before and os.listdir(folder) == [LOCK]
    finally:
        holder.kill()
        holder.wait()


def test_processes_started_together_get_the_lock_one_at_a_time(tmp_path):
    """Six processes ask for one folder's lock in the same instant: exactly one gets it, each other is refused with
    that one's PID (the lock is taken with flock, not by checking first and writing after)."""
    folder = tmp_path / "run"
    start_at = time.time() + 3  # every child has imported deepred.files by then
    children = [hold_lock(folder, seconds=4, start_at=start_at) for _ in range(6)]
    said = {child.pid: child.communicate(timeout=60)[0].strip() for child in children}
    winners = [pid for pid, text in said.items() if text == "locked"]
    assert len(winners) == 1, said
    assert all(text == busy_line(winners[0], folder) for pid, text in said.items() if pid != winners[0]), said
    assert not (folder / LOCK).exists()  # released by its holder


def test_a_killed_holders_lock_is_taken_over_and_said(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder, seconds=60)
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((folder / LOCK).read_text())["pid"] == holder.pid  # a killed process cleans nothing up

    said = []
    with folder_lock(folder, log=said.append):
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    assert said == [f"took over the lock of {folder} from deepred process {holder.pid}, which ended without "
                    "releasing it (killed?)"]
    assert not (folder / LOCK).exists()


@pytest.mark.parametrize("fault", [RuntimeError, KeyboardInterrupt])
def test_the_lock_is_released_when_the_block_fails_or_is_interrupted(tmp_path, fault):
    with pytest.raises(fault):
        with output_lock(tmp_path / "model.gguf"):
            raise fault()
    assert os.listdir(tmp_path) == []
    with output_lock(tmp_path / "model.gguf", log=pytest.fail):  # and taken again silently: nothing was stale
        pass


def test_stale_temporaries_are_removed_in_one_line_but_never_a_live_processes(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        gone = dead_pid()
        stale = [tmp_path / f".deepred.gguf.{gone}.f32.partial", tmp_path / f".merged-deepred.{gone}.partial"]
        stale[0].write_bytes(b"GGUF half")
        stale[1].mkdir()
        (stale[1] / "model.safetensors").write_bytes(b"half")
        alive = tmp_path / f".deepred-q8_0.gguf.{live.pid}.f32.partial"  # a conversion still running
        ours = partial_path(tmp_path / "manifest.json")
        foreign = tmp_path / ".notes.txt.partial"  # no PID: not deepred's
        for path in (alive, ours, foreign):
            path.write_bytes(b"x")

        said = []
        assert remove_stale_partials_in(tmp_path, log=said.append) == sorted(stale)
        assert said == [f"removed 2 temporary file(s) that killed deepred processes left in {tmp_path}: "
                        f"{stale[0].name}, {stale[1].name}"]
        assert alive.exists() and ours.exists() and foreign.exists() and not any(p.exists() for p in stale)
    finally:
        live.kill()
        live.wait()
    assert remove_stale_partials_in(tmp_path, log=lambda _: None) == [alive]  # its process has ended now


# ---------------------------------------------------------------------------------------------------------------
# replacing an earlier merge, killed at each moment


def test_the_file_systems_refusals_are_one_line_and_other_os_errors_are_not_dressed_as_them():
    full = file_system_refusal(OSError(errno.ENOSPC, "No space left on device", "/runs/deepred.gguf"))
    assert full.startswith("No space left on device: /runs/deepred.gguf; free some disk space") and "\n" not in full
    assert "check the path and its permissions" in file_system_refusal(PermissionError(errno.EACCES, "Permission denied"))
    assert file_system_refusal(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) is None


KILL_AT = {
    # the new folder is complete and the old one set aside: killed before the new one is renamed in
    "rename-in": """
        real_replace = os.replace
        def replace(src, dst):
            if str(src).endswith(".partial") and not str(src).endswith(".old.partial") and Path(dst) == OUT:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = replace
    """,
    # the rename in fails (a full disk, a quota): the old folder goes back
    "rename-in fails": """
        real_replace = os.replace
        def replace(src, dst):
            if str(src).endswith(".partial") and not str(src).endswith(".old.partial") and Path(dst) == OUT:
                raise OSError(28, "No space left on device")
            return real_replace(src, dst)
        os.replace = replace
    """,
    # killed while the earlier merge is being deleted (its tokenizer.json already gone), wherever it is then
    "delete": """
        real_rmtree = shutil.rmtree
        def rmtree(path, *args, **kwargs):
            if (Path(path) / "earlier.txt").is_file():
                (Path(path) / "tokenizer.json").unlink()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rmtree(path, *args, **kwargs)
        shutil.rmtree = rmtree
    """,
}


def complete_merge(folder: Path) -> bool:
    return all((folder / name).is_file() for name in ("tokenizer.json", "model.safetensors", "config.json",
                                                      MERGE_RECORD))


@pytest.mark.slow
@pytest.mark.parametrize("moment", list(KILL_AT))
def test_a_replacement_cut_short_never_leaves_a_broken_merge(tiny_model, trained_run, merged_model, tmp_path, moment,
                                                             capsys):
    """The fault of the issue: `merge` deleted the old folder and then renamed the new one in, so a kill during the
    delete left weights and marker without tokenizer.json, and the rerun was refused as "not written by deepred
    merge". Now the old folder is renamed aside, the new one renamed in, the old one deleted; a `deepred merge`
    child is cut short at each of those moments, then merged again as a user would. With replace_folder put back to
    delete-then-rename, the `delete` case fails here: the final path is left without tokenizer.json."""
    out = tmp_path / "merged-deepred"
    shutil.copytree(merged_model, out)
    (out / "earlier.txt").write_text("the earlier merge")
    script = (f"import os, shutil, signal, sys\nfrom pathlib import Path\nOUT = Path({str(out)!r})\n"
              f"{textwrap.dedent(KILL_AT[moment])}\n"
              "from deepred.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    args = ["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"), "--output_path",
            str(out)]
    child = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=ENV,
                           timeout=300)
    if moment == "rename-in fails":
        assert child.returncode == 1 and child.stderr.splitlines()[-1:] == [
            "error: No space left on device; free some disk space, then run the command again (finished work is kept)"]
        assert "Traceback" not in child.stderr
        assert complete_merge(out) and (out / "earlier.txt").is_file()  # the earlier merge, back in place
        assert list(tmp_path.glob(".*.partial")) == []
    else:
        assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
        assert list(tmp_path.glob(".merged-deepred.*.partial")), "the kill did not land mid-replacement"
        if moment == "delete":  # the final path already holds the new merge, whole
            assert complete_merge(out) and not (out / "earlier.txt").exists()
        else:  # between the renames the final path is empty, never half a folder; the earlier one is aside, whole
            assert not out.exists()
            [aside] = tmp_path.glob(".merged-deepred.*.old.partial")
            assert complete_merge(aside) and (aside / "earlier.txt").is_file()

    capsys.readouterr()
    assert main(args) == 0  # not refused ("holds something deepred merge did not write") or broken
    said = capsys.readouterr().out
    assert complete_merge(out) and not (out / "earlier.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged-deepred"]  # no temporaries, no lock
    if moment == "rename-in":
        assert f"restored {out}: a replacement of it was killed" in said
    if moment != "rename-in fails":
        assert "temporary file(s) that killed deepred processes left in" in said


@pytest.mark.slow
def test_a_killed_conversion_leaves_temporaries_that_the_next_stage_writing_there_removes(merged_model, tiny_model,
                                                                                         trained_run, tmp_path):
    """A q8_0 conversion killed while llama.cpp writes its f32 intermediate leaves `.NAME.gguf.PID.f32.partial`
    (hundreds of MB for a real model). The next stage that writes that folder, here a merge, removes it and says so
    in one line."""
    gguf = tmp_path / "deepred-q8_0.gguf"
    proc = subprocess.Popen([*CLI, "convert", "--model_path", str(merged_model), "--output_path", str(gguf),
                             "--quant_type", "q8_0", "--no-check"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    intermediate = tmp_path / f".{gguf.name}.{proc.pid}.f32.partial"
    wait_for(lambda: intermediate.is_file() and intermediate.stat().st_size > 0, 240, "the f32 intermediate", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(p.name for p in tmp_path.glob(".*.partial"))
    assert intermediate.name in left

    merge = subprocess.run([*CLI, "merge", "--base_model", str(tiny_model), "--lora_path",
                            str(trained_run / "final"), "--output_path", str(tmp_path / "merged")],
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert merge.returncode == 0, merge.stderr[-2000:]
    removals = [line for line in merge.stdout.splitlines() if "temporary file(s)" in line]
    assert removals == [f"removed {len(left)} temporary file(s) that killed deepred processes left in {tmp_path}: "
                        + ", ".join(left)]
    assert list(tmp_path.glob(".*.partial")) == []


# ---------------------------------------------------------------------------------------------------------------
# a folder that cannot be written


def without_dac_override() -> None:
    """Run the child without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so chmod binds even for root (prctl
    PR_CAPBSET_DROP before exec: root's permitted capabilities after exec are its bounding set)."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):
            if libc.prctl(24, capability, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


@pytest.fixture
def read_only_folder(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = subprocess.run(["touch", str(folder / "probe")], preexec_fn=without_dac_override,
                               capture_output=True)
    except subprocess.SubprocessError:
        probe = None
    if probe is None or probe.returncode == 0:
        pytest.skip("cannot make a folder read-only for this user (root without CAP_SETPCAP)")
    yield folder
    folder.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "run"])
def test_an_unwritable_output_folder_is_one_line_before_any_model_loads(tiny_model, trained_run, read_only_folder,
                                                                        command):
    if command == "merge":
        args = ["merge", "--base_model", str(tiny_model), "--lora_path", str(trained_run / "final"),
                "--output_path", str(read_only_folder / "merged")]
        flag = "--output_path"
    else:
        args = ["run", "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
                str(read_only_folder), "--max_steps", "1", "--no-evaluate"]
        flag = "--output_dir"
    result = subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=300,
                            preexec_fn=without_dac_override)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: output folder {read_only_folder} is not writable (Permission "
                                          f"denied); choose another {flag}"]
    assert "merging" not in result.stdout and "Loading weights" not in result.stdout + result.stderr
    assert "[train]" not in result.stdout
    assert os.listdir(read_only_folder) == []


# ---------------------------------------------------------------------------------------------------------------
# `deepred run`: two at once, killed, interrupted


def run_command(run_dir: Path, max_steps: int, save_steps: int) -> list[str]:
    return [*CLI, "run", "--base_model", "tiny", "--dataset", str(DATA / "mini.jsonl"), "--output_dir",
            str(run_dir), "--max_steps", str(max_steps), "--save_steps", str(save_steps), "--batch_size", "1",
            "--gradient_accumulation_steps", "1", "--val_split", "0", "--lora_r", "4", "--lora_alpha", "8",
            "--quant_types", "f16", "--no-check", "--no-evaluate"]


def training_folders(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("theme-deepred-*"))


def assert_run_intact(run_dir: Path, max_steps: int) -> None:
    """One training folder trained to max_steps, every stage done, the GGUF whole, nothing left behind."""
    [training] = training_folders(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())["stages"]
    assert {stage: record["status"] for stage, record in manifest.items()} == dict.fromkeys(manifest, "done")
    assert manifest["train"]["outputs"]["train_dir"] == str(training)
    assert json.loads((latest_checkpoint(training) / "trainer_state.json").read_text())["global_step"] == max_steps
    assert (training / "final" / "adapter_model.safetensors").is_file()
    assert is_gguf(run_dir / "deepred.gguf") and complete_merge(run_dir / "merged-deepred")
    assert list(run_dir.rglob(".*.partial")) == [] and list(run_dir.rglob(LOCK)) == []


@pytest.mark.slow
def test_a_second_run_on_the_same_folder_is_refused_and_the_first_finishes_intact(tiny_model, tmp_path):
    """The issue's fault: the second `deepred run` "resumed" the live run's checkpoint, or deleted its merge
    temporaries, or erased its failure record. Now it is refused in one line naming the first one's PID."""
    run_dir = tmp_path / "run"
    first = subprocess.Popen(run_command(run_dir, max_steps=4, save_steps=2), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=ENV)
    wait_for(lambda: training_folders(run_dir), 300, "the first run to start training", first)
    second = subprocess.run(run_command(run_dir, max_steps=4, save_steps=2), capture_output=True, text=True, env=ENV,
                            timeout=300)
    assert first.poll() is None, "the first run ended before the second was refused: the test proved nothing"
    assert second.returncode == 2
    assert second.stderr.splitlines() == [f"error: {busy_line(first.pid, run_dir)}"]
    assert second.stdout == ""

    output, _ = first.communicate(timeout=900)
    assert first.returncode == 0, output[-3000:]
    assert "took over" not in output
    assert_run_intact(run_dir, max_steps=4)


@pytest.mark.slow
def test_a_killed_run_is_taken_over_and_ctrl_c_prints_the_command_that_resumes(tiny_model, tmp_path):
    run_dir = tmp_path / "my runs" / "run"  # a space: the printed command must keep the path one argument
    command = run_command(run_dir, max_steps=6, save_steps=1)

    killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    [training] = wait_for(lambda: training_folders(run_dir), 300, "training to start", killed)
    first_checkpoint = wait_for(lambda: latest_checkpoint(training), 300, "a checkpoint", killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert json.loads((run_dir / LOCK).read_text())["pid"] == killed.pid
    left = run_dir / f".deepred.gguf.{killed.pid}.f32.partial"  # as a conversion killed with the run would leave
    left.write_bytes(b"GGUF half")

    log = tmp_path / "interrupted.log"
    with open(log, "w") as sink:
        interrupted = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=ENV)
        wait_for(lambda: latest_checkpoint(training) != first_checkpoint, 300, "resumed training to save a checkpoint",
                 interrupted)
        interrupted.send_signal(signal.SIGINT)  # Ctrl-C
        interrupted.wait(300)
    said = log.read_text()
    assert interrupted.returncode == 130, said[-3000:]
    assert f"took over the lock of {run_dir} from deepred process {killed.pid}, which ended without releasing " \
           "it (killed?)" in said
    assert f"removed 1 temporary file(s) that killed deepred processes left in {run_dir}: {left.name}" in said
    assert not left.exists()
    [resume_line] = [line for line in said.splitlines() if "Resume with: " in line]
    assert resume_line.startswith("error: training was interrupted")
    resume = shlex.split(resume_line.split("Resume with: ", 1)[1])
    assert resume[:2] == ["deepred", "run"] and resume[resume.index("--output_dir") + 1] == str(run_dir)

    resumed = subprocess.run([*CLI, *resume[1:]], capture_output=True, text=True, env=ENV, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[train] running (previous attempt interrupted)" in resumed.stdout
    assert "resuming from" in resumed.stdout and "took over" not in resumed.stdout  # Ctrl-C released the lock
    assert_run_intact(run_dir, max_steps=6)


def test_refusals_stay_one_line_through_the_cli(tiny_model, tmp_path, capsys):
    """FolderBusy goes through the CLI as every DeepRedError: one line, exit 2 (here a merge whose output another
    process is writing)."""
    out = tmp_path / "merged"
    script = textwrap.dedent(f"""
        import time
        from deepred.files import output_lock
        with output_lock({str(out)!r}):
            print("locked", flush=True)
            time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "locked"
        adapter = tmp_path / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
        assert main(["merge", "--base_model", str(tiny_model), "--lora_path", str(adapter), "--output_path", str(out)]) == 2
        assert capsys.readouterr().err.splitlines() == [f"error: {busy_line(holder.pid, out)}"]
    finally:
        holder.kill()
        holder.wait()
