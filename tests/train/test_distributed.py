"""`deepred train` under torchrun and under `accelerate launch` with the shipped examples/accelerate/ddp.yaml: two CPU
processes (gloo) train together, only rank 0 writes, the adapter loads. The shipped FSDP2 config is checked with
accelerate's own config loader and launcher: accelerate runs FSDP only on GPUs (on CPUs it falls back to DDP), so
the FSDP launch itself is not run here."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from ..conftest import DATA, REPO


DDP_CONFIG = REPO / "examples" / "accelerate" / "ddp.yaml"
FSDP_CONFIG = REPO / "examples" / "accelerate" / "fsdp.yaml"


def _launcher(name: str, port: str) -> list[str]:
    bin_dir = os.path.dirname(sys.executable)
    if name == "torchrun":
        return [shutil.which("torchrun", path=bin_dir), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                "--master_port", port]
    # the README's command with the shipped config (on a machine without GPUs the processes run on the CPU)
    return [shutil.which("accelerate", path=bin_dir), "launch", "--config_file", str(DDP_CONFIG), "--num_processes",
            "2", "--main_process_ip", "127.0.0.1", "--main_process_port", port]


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate-ddp.yaml"])
def test_two_process_cpu_training(tmp_path, tiny_model, launcher):
    out = tmp_path / "ddp"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [*_launcher(launcher, port), "-m", "deepred.cli", "train",
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


def test_shipped_accelerate_configs_parse_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = load_config_from_file(str(DDP_CONFIG))
    assert ddp.distributed_type == DistributedType.MULTI_GPU and ddp.mixed_precision == "no"
    fsdp = load_config_from_file(str(FSDP_CONFIG))
    assert fsdp.distributed_type == DistributedType.FSDP
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "Qwen2DecoderLayer"


def _fsdp_launch_env(*overrides: str) -> dict[str, str]:
    """The environment `accelerate launch` gives each process for the README's FSDP command line."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    argv = ["--config_file", str(FSDP_CONFIG), "--num_processes", "2", *overrides, "-m", "deepred.cli", "train",
            "--base_model", "Qwen/Qwen2.5-7B-Instruct"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(argv))
    assert args.use_fsdp  # the launcher takes the multi-GPU path with FSDP, not a plain single process
    return prepare_multi_gpu_env(args)


def test_fsdp_launch_wraps_the_decoder_layers_of_the_model(monkeypatch, tiny_model, smollm2_model):
    """FSDP2 with the wrap policy on the model's decoder layers, built the way the Trainer builds it in each process
    from the launcher's environment; Llama-family models (SmolLM2) need the class named on the command line."""
    from accelerate import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    env = _fsdp_launch_env()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"  # the adapter is gathered and saved as one file
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    plugin.set_auto_wrap_policy(AutoModelForCausalLM.from_pretrained(tiny_model))  # finds Qwen2DecoderLayer

    smollm2 = AutoModelForCausalLM.from_pretrained(smollm2_model)
    with pytest.raises(ValueError, match="Could not find the transformer layer class Qwen2DecoderLayer"):
        FullyShardedDataParallelPlugin().set_auto_wrap_policy(smollm2)
    env = _fsdp_launch_env("--fsdp_transformer_layer_cls_to_wrap", "LlamaDecoderLayer")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", env["FSDP_TRANSFORMER_CLS_TO_WRAP"])
    FullyShardedDataParallelPlugin().set_auto_wrap_policy(smollm2)
