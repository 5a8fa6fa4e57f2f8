"""FineTuneConfig: defaults merged under the user's settings; every mistake reported with a hint."""

from __future__ import annotations

import copy

import pytest
import torch

from huggingface_model import (
    DEFAULT_LORA_CONFIG,
    DEFAULT_TRAINING_ARGS,
    FineTuneConfig,
    FineTuneConfigError,
    HuggingFaceWrapper,
    ModelLoadError,
    cpu_has_bf16,
    device_training_args,
)


def test_empty_config_is_the_defaults():
    cfg = FineTuneConfig.from_dict(None)
    assert cfg.lora_config == DEFAULT_LORA_CONFIG
    assert cfg.training_args == DEFAULT_TRAINING_ARGS
    assert cfg.eval_fraction == 0.1
    assert cfg.force_retrain is False and cfg.resume is False
    assert FineTuneConfig.from_dict({}).training_args == DEFAULT_TRAINING_ARGS


def test_user_keys_override_and_other_keys_keep_defaults():
    lora_before, args_before = copy.deepcopy(DEFAULT_LORA_CONFIG), copy.deepcopy(DEFAULT_TRAINING_ARGS)
    cfg = FineTuneConfig.from_dict({
        "lora_config": {"r": 16, "lora_dropout": 0.05},
        "training_args": {"learning_rate": 1e-3, "max_steps": 7},
        "eval_fraction": 0.2,
        "force_retrain": True,
    })
    assert cfg.lora_config["r"] == 16 and cfg.lora_config["lora_dropout"] == 0.05
    assert cfg.training_args["learning_rate"] == 1e-3 and cfg.training_args["max_steps"] == 7
    for key, value in DEFAULT_LORA_CONFIG.items():
        if key not in ("r", "lora_dropout"):
            assert cfg.lora_config[key] == value, key
    for key, value in DEFAULT_TRAINING_ARGS.items():
        if key not in ("learning_rate", "max_steps"):
            assert cfg.training_args[key] == value, key
    assert cfg.eval_fraction == 0.2 and cfg.force_retrain is True
    assert cfg.user_training_keys == {"learning_rate", "max_steps"}
    # The module-level defaults are never mutated by a merge.
    assert DEFAULT_LORA_CONFIG == lora_before and DEFAULT_TRAINING_ARGS == args_before


def test_two_configs_do_not_share_state():
    a = FineTuneConfig.from_dict({"training_args": {"max_steps": 3}})
    a.training_args["learning_rate"] = 0.5
    a.lora_config["r"] = 99
    b = FineTuneConfig.from_dict(None)
    assert b.training_args["learning_rate"] == DEFAULT_TRAINING_ARGS["learning_rate"]
    assert b.lora_config["r"] == DEFAULT_LORA_CONFIG["r"]


@pytest.mark.parametrize(
    ("config", "where", "suggestion"),
    [
        ({"lora_confg": {"r": 4}}, "unknown key 'lora_confg'", "did you mean 'lora_config'"),
        ({"training_arg": {}}, "unknown key 'training_arg'", "did you mean 'training_args'"),
        ({"lora_config": {"lora_alpah": 8}}, "lora_config.lora_alpah", "did you mean 'lora_alpha'"),
        ({"training_args": {"learning_rte": 1e-3}}, "training_args.learning_rte", "did you mean 'learning_rate'"),
        ({"training_args": {"max_step": 3}}, "training_args.max_step", "did you mean 'max_steps'"),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(config, where, suggestion):
    with pytest.raises(FineTuneConfigError) as info:
        FineTuneConfig.from_dict(config)
    message = str(info.value)
    assert where in message
    assert suggestion in message


def test_unknown_top_level_key_lists_the_valid_keys():
    with pytest.raises(FineTuneConfigError) as info:
        FineTuneConfig.from_dict({"zzzz": 1})
    message = str(info.value)
    assert "unknown key 'zzzz'" in message
    assert "did you mean" not in message  # nothing is close
    for key in ("lora_config", "training_args", "eval_data_path", "force_retrain"):
        assert key in message


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"lora_config": {"r": 0}}, "lora_config.r = 0"),
        ({"lora_config": {"r": 2.5}}, "lora_config.r = 2.5"),
        ({"lora_config": {"lora_dropout": 1.0}}, "lora_config.lora_dropout = 1.0"),
        ({"lora_config": {"loraplus_lr_ratio": 0.5}}, "lora_config.loraplus_lr_ratio = 0.5: must be a number from 1 to 1000"),
        ({"lora_config": {"loraplus_lr_ratio": "high"}}, "lora_config.loraplus_lr_ratio = 'high'"),
        ({"training_args": {"learning_rate": -1e-4}}, "training_args.learning_rate = -0.0001"),
        ({"training_args": {"learning_rate": 0}}, "training_args.learning_rate = 0"),
        ({"training_args": {"max_steps": 0}}, "training_args.max_steps = 0"),
        ({"training_args": {"max_steps": True}}, "training_args.max_steps = True"),
        ({"training_args": {"per_device_train_batch_size": 0}}, "training_args.per_device_train_batch_size = 0"),
        ({"training_args": {"num_train_epochs": -1}}, "training_args.num_train_epochs = -1"),
        ({"training_args": {"learning_rate": "fast"}}, "training_args.learning_rate = 'fast'"),
        ({"eval_fraction": 0.7}, "eval_fraction = 0.7"),
        ({"force_retrain": "yes"}, "force_retrain = 'yes'"),
        ({"probes": ["ok", ""]}, "probes must be a list of non-empty strings"),
    ],
)
def test_range_problems(config, expected):
    with pytest.raises(FineTuneConfigError) as info:
        FineTuneConfig.from_dict(config)
    assert expected in str(info.value)


def test_max_steps_minus_one_means_epochs():
    assert FineTuneConfig.from_dict({"training_args": {"max_steps": -1}}).training_args["max_steps"] == -1


def test_all_problems_are_reported_at_once():
    with pytest.raises(FineTuneConfigError) as info:
        FineTuneConfig.from_dict({
            "lora_confg": {},
            "lora_config": {"r": 0, "lora_alpah": 8},
            "training_args": {"learning_rate": -1.0, "max_steps": 0, "learning_rte": 1},
        })
    message = str(info.value)
    for part in ("lora_confg", "lora_config.r = 0", "lora_alpah", "learning_rate = -1.0", "max_steps = 0",
                 "learning_rte"):
        assert part in message, part
    assert "\n" not in message  # every problem on one line, gathered in one error


def test_non_dict_sections_are_rejected():
    with pytest.raises(FineTuneConfigError, match="'training_args' must be a dict"):
        FineTuneConfig.from_dict({"training_args": [("max_steps", 3)]})


def test_cpu_device_settings_override_what_cpu_cannot_do():
    cfg = FineTuneConfig.from_dict({"training_args": {"fp16": True, "optim": "paged_adamw_8bit"}},
                                   device=torch.device("cpu"))
    assert cfg.training_args["use_cpu"] is True
    assert cfg.training_args["fp16"] is False and cfg.training_args["bf16"] is cpu_has_bf16()
    assert cfg.training_args["optim"] == "adamw_torch"
    # A CPU-capable optimiser the user chose is kept.
    kept = device_training_args(torch.device("cpu"), {"optim": "sgd"}, {"optim"})
    assert kept["optim"] == "sgd"


def test_bad_config_fails_before_the_model_is_loaded(tmp_path):
    # The folder does not exist: a config check that ran after loading would raise ModelLoadError instead.
    with pytest.raises(FineTuneConfigError, match="learning_rte"):
        HuggingFaceWrapper(local_model_path=str(tmp_path / "missing"), data_path=str(tmp_path / "data.jsonl"),
                           fine_tune_config={"training_args": {"learning_rte": 1e-3}})
    with pytest.raises(FineTuneConfigError, match="max_steps = 0"):
        HuggingFaceWrapper(local_model_path=str(tmp_path / "missing"),
                           fine_tune_config={"training_args": {"max_steps": 0}})


def test_unknown_model_config_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        HuggingFaceWrapper(local_model_path=str(tmp_path / "missing"), max_lenght=16)
    assert "max_lenght" in str(info.value)
    assert "did you mean 'max_length'" in str(info.value)


def test_unknown_training_key_is_caught_when_fine_tuning(tiny_model_dir, tmp_path, monkeypatch):
    from helpers import identity_rows, make_wrapper, write_jsonl

    monkeypatch.chdir(tmp_path)
    wrapper = make_wrapper(tiny_model_dir, fine_tune_config={"training_args": {"output_dir": str(tmp_path / "runs"),
                                                                               "learning_rte": 1e-3}})
    with pytest.raises(FineTuneConfigError, match="did you mean 'learning_rate'"):
        wrapper.fine_tune(str(write_jsonl(tmp_path / "a.jsonl", identity_rows())))
    assert not (tmp_path / "runs").exists() and wrapper.active_adapter is None


def test_cpu_mixed_precision_follows_the_cpu_and_the_user(monkeypatch, caplog):
    import hfmodel.settings

    cpu, mps = torch.device("cpu"), torch.device("mps")
    for has_bf16 in (True, False):
        monkeypatch.setattr(hfmodel.settings, "cpu_has_bf16", lambda value=has_bf16: value)
        assert device_training_args(cpu, {}, set())["bf16"] is has_bf16  # default: bf16 autocast iff native
        assert device_training_args(cpu, {"bf16": False}, {"bf16"})["bf16"] is False  # the user's fp32 wins
    caplog.clear()
    assert device_training_args(cpu, {"bf16": True}, {"bf16"})["bf16"] is True  # honoured, but slow: warned
    assert "slower than fp32" in caplog.text
    caplog.clear()
    out = device_training_args(mps, {"bf16": True, "fp16": True}, {"bf16", "fp16"})
    assert out["bf16"] is False and out["fp16"] is False and "not supported for training on mps" in caplog.text
