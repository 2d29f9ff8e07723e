"""`deepred train` under torchrun: two CPU processes (gloo) train together, only rank 0 writes, the adapter loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

from .conftest import DATA


def test_two_process_cpu_training(tmp_path, tiny_model):
    out = tmp_path / "ddp"
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [torchrun, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port, "-m", "deepred.cli", "train",
           "--base_model", str(tiny_model), "--dataset", str(DATA / "mini.jsonl"), "--output_dir", str(out),
           "--max_steps", "3", "--batch_size", "1", "--gradient_accumulation_steps", "2", "--val_split", "0",
           "--lora_r", "4", "--lora_alpha", "8", "--save_steps", "3", "--logging_steps", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    run_config = json.loads((out / "run_config.json").read_text())
    assert run_config["hardware"]["world_size"] == 2
    # effective batch 2 split over two processes: one example each per optimizer step
    assert run_config["batch_plan"]["micro_batch"] * run_config["batch_plan"]["accumulation"] == 1
    assert result.stdout.count("adapter saved to") == 1  # only rank 0 reports and writes
    assert result.stdout.count("dataset: ") == 1  # ranks agree on who is rank 0 from the start
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "final")
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) > 0
