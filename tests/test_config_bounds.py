"""A number a setting cannot take is one line naming the setting, before any work starts, whatever built the config
(flags, YAML, code); a value exactly on the limit is taken. Before, `deepred train --learning_rate -1` ended in
torch's traceback after the model had loaded, and `--batch_size 0` trained with some other batch size."""

from __future__ import annotations

import pytest

from deepred.cli import main
from deepred.config import EvalConfig, PairsConfig, RunConfig, ServeConfig, TrainConfig
from deepred.errors import DeepRedError

# (config, setting, the last value it can take, the first it cannot): limits read from what the value means
LIMITS = [
    (TrainConfig, "batch_size", 1, 0),                # a batch holds at least one example
    (TrainConfig, "gradient_accumulation_steps", 1, 0),
    (TrainConfig, "learning_rate", 1e-12, 0.0),       # a zero rate learns nothing, a negative one climbs the loss
    (TrainConfig, "epochs", 0.01, 0.0),
    (TrainConfig, "val_split", 0.0, -0.01),           # 0 disables validation
    (TrainConfig, "val_split", 0.99, 1.0),            # all held out leaves nothing to train on
    (TrainConfig, "lora_dropout", 0.0, -0.1),
    (TrainConfig, "lora_dropout", 0.9, 1.0),          # dropping every activation trains nothing
    (TrainConfig, "warmup_ratio", 0.0, -0.1),
    (TrainConfig, "lora_r", 1, 0),
    (TrainConfig, "lora_layers", 1, 0),               # adapting no block trains nothing (None: every block)
    (TrainConfig, "neftune_noise_alpha", 1e-6, 0.0),  # zero noise is off: None says so (a negative scale is the same noise)
    (TrainConfig, "horizon_examples", 0, -1),         # a negative count was read as "none" without a word
    (TrainConfig, "save_steps", 1, 0),
    (RunConfig, "prefer_steps", 1, 0),
    (RunConfig, "pair_horizon", 0, -1),
    (PairsConfig, "voice", 0, -1),
    (ServeConfig, "port", 65535, 65536),              # TCP ports are 1-65535
    (ServeConfig, "port", 1, 0),
    (EvalConfig, "temperature", 0.0, -0.01),          # 0 is greedy decoding
    (EvalConfig, "retries", 0, -1),
]


@pytest.mark.parametrize("cls, name, last_good, first_bad", LIMITS,
                         ids=[f"{c.__name__}.{n}={bad}" for c, n, _, bad in LIMITS])
def test_a_setting_takes_its_limit_and_refuses_the_value_past_it(cls, name, last_good, first_bad):
    required = {"output": "pairs.jsonl"} if cls is PairsConfig else {}
    assert getattr(cls(**required, **{name: last_good}), name) == last_good
    with pytest.raises(DeepRedError) as refused:
        cls(**required, **{name: first_bad})
    message = str(refused.value)
    assert message.startswith(f"setting {name}: must be ") and message.endswith(f", got {first_bad!r}")
    assert "\n" not in message


def test_a_negative_learning_rate_is_one_line_on_the_command_line_before_the_model_loads(tmp_path, capsys):
    run = tmp_path / "run"
    # a base model that does not exist: the refusal must come before anything is loaded
    assert main(["train", "--base_model", str(tmp_path / "no-model"), "--output_dir", str(run),
                 "--learning_rate", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "error: setting learning_rate: must be above 0, got -1.0\n"
    assert not run.exists()


def test_a_yaml_config_past_a_limit_or_not_yaml_at_all_is_one_line_with_the_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    for body, message in [("val_split: 1.0\n", ": setting val_split: must be at least 0 and below 1, got 1.0"),
                          ("base_model: tiny\nlr: [1, 2\n", ":3: not valid YAML (expected ',' or ']', but got "
                                                           "'<stream end>'); fix the file")]:
        config.write_text(body)
        assert main(["run", str(config), "--output_dir", str(tmp_path / "out")]) == 2
        assert capsys.readouterr().err == f"error: {config}{message}\n"
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_a_number_that_is_not_finite_is_refused_from_flags_and_yaml(value, tmp_path, capsys):
    """`--learning_rate inf` trained an adapter of NaN that was saved as final/ and merged without a word."""
    assert main(["train", "--base_model", str(tmp_path / "no-model"), "--output_dir", str(tmp_path / "run"),
                 f"--learning_rate={value}"]) == 2
    assert capsys.readouterr().err == f"error: setting learning_rate: must be a finite number, got {value}\n"
    config = tmp_path / "run.yaml"
    config.write_text(f"learning_rate: {value.replace('inf', '.inf').replace('nan', '.nan')}\n")
    assert main(["run", str(config), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {config}: setting learning_rate: must be a finite number, got {value}\n"
    assert not (tmp_path / "run").exists() and not (tmp_path / "out").exists()
    with pytest.raises(DeepRedError, match=f"^setting max_steps: must be a finite number, got {value}$"):
        TrainConfig(max_steps=float(value))


def test_a_choice_in_another_letter_case_is_that_choice_and_a_wrong_one_is_one_line(tmp_path, capsys):
    """LM Studio names its files Q4_K_M; argparse refused that with a usage dump, and YAML with a line."""
    from deepred.config import ConvertConfig

    assert ConvertConfig(quant_type="Q4_K_M").quant_type == "q4_k_m"
    assert RunConfig(quant_types=["Q4_K_M", "F16"]).quant_types == ["q4_k_m", "f16"]
    assert TrainConfig(profile="Lean").profile == "lean"
    assert main(["convert", "--model_path", str(tmp_path / "none"), "--output_path", str(tmp_path / "x.gguf"),
                 "--quant_type", "Q9_K"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: setting quant_type: 'Q9_K' is not one of f32, f16, ") and err.count("\n") == 1
