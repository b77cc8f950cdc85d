"""TrainConfig: every shipped YAML validates; bad configs fail with the rule and the fix."""
from __future__ import annotations

from pathlib import Path

import pytest

from npu_rft.config import TrainConfig, load_train_config
from npu_rft.config_base import ConfigError, from_dict

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))

MINIMAL = {
    "model": {"name_or_path": "m"},
    "data": {"train": "t.jsonl"},
    "graders": [{"name": "inverse_rank"}],
}


def test_configs_folder_has_the_three_groups():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert any(n.startswith("tiny/") for n in names)
    assert "dxbench/grpo_qwen2.5-7b_910b.yaml" in names
    assert any("cuda" in n for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_every_shipped_config_validates(path):
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    assert cfg.algorithm_config == getattr(cfg, cfg.algorithm)


def test_minimal_config_takes_the_defaults():
    cfg = from_dict(TrainConfig, MINIMAL)
    assert cfg.algorithm == "grpo" and cfg.grpo.beta == 0.04 and cfg.model.finetune == "lora"
    assert cfg.schedule.steps == 100 and cfg.rollout.num_samples == 8


def test_overrides_are_parsed_as_yaml_scalars(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\ngraders: [{name: inverse_rank}]\n")
    cfg = load_train_config(path, ["optim.lr=3e-4", "grpo.aggregation=seq_mean_token_mean", "schedule.steps=7"])
    assert cfg.optim.lr == 3e-4 and cfg.grpo.aggregation == "seq_mean_token_mean" and cfg.schedule.steps == 7


def test_unknown_keys_and_bad_values_are_all_reported():
    data = {**MINIMAL, "optim": {"lr": 0, "learning_rate": 1}, "grpo": {"aggregation": "mean"}}
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data)
    text = str(err.value)
    assert "optim.learning_rate: unknown key" in text and "valid keys:" in text and "lr" in text
    assert "grpo.aggregation: 'mean' is not one of" in text


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schedule": {"steps": 3, "epochs": 1}}, "exactly one of steps and epochs"),
        ({"graders": []}, "graders is empty"),
        ({"algorithm": "ppo"}, "unknown; known algorithms"),
        ({"eval": {"every_steps": 5}}, "data.eval is not"),
        ({"rollout": {"top_p": 0}}, "rollout.top_p=0"),
        ({"optim": {"betas": [0.9]}}, "optim.betas"),
        ({"grpo": {"beta": -1}}, "grpo.beta=-1"),
    ],
)
def test_invalid_configs_state_the_rule(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(TrainConfig, {**MINIMAL, **change})


def test_a_section_of_an_unselected_algorithm_is_an_error():
    with pytest.raises(ConfigError, match="'grpo' section is set but algorithm='sft'"):
        from_dict(TrainConfig, {**MINIMAL, "algorithm": "sft", "grpo": {"beta": 0.1}})


# ---------------------------------------------------------------- environment variables fill unset keys only


def _minimal(tmp_path, extra: str = ""):
    path = tmp_path / "c.yaml"
    path.write_text("model: {name_or_path: m}\ndata: {train: t.jsonl}\ngraders: [{name: exact_match}]\n" + extra,
                    encoding="utf-8")
    return path


def test_env_fills_unset_keys_and_records_the_source(tmp_path, monkeypatch):
    from npu_rft.config import load_train_config

    monkeypatch.setenv("NPU_RFT_DEVICE", "cpu")
    monkeypatch.setenv("NPU_RFT_KERNELS_TILE_BYTES", "4096")
    cfg = load_train_config(_minimal(tmp_path))
    assert (cfg.run.device, cfg.kernels.tile_bytes) == ("cpu", 4096)
    assert cfg.sources["run.device"] == "$NPU_RFT_DEVICE"
    assert cfg.sources["kernels.tile_bytes"] == "$NPU_RFT_KERNELS_TILE_BYTES"
    assert cfg.sources["model.name_or_path"].startswith("file ")
    assert "optim.lr" not in cfg.sources  # a default


def test_env_never_overrides_the_config_or_set(tmp_path, monkeypatch):
    from npu_rft.config import load_train_config

    monkeypatch.setenv("NPU_RFT_DEVICE", "npu")
    monkeypatch.setenv("NPU_RFT_KERNELS_TILE_BYTES", "0")
    cfg = load_train_config(_minimal(tmp_path, "run: {device: cpu}\n"), ["kernels.tile_bytes=null"])
    assert (cfg.run.device, cfg.kernels.tile_bytes) == ("cpu", None)
    assert cfg.sources["run.device"].startswith("file ") and cfg.sources["kernels.tile_bytes"] == "--set"


def test_a_bad_env_value_names_the_variable(tmp_path, monkeypatch):
    from npu_rft.config import load_train_config
    from npu_rft.config_base import ConfigError

    monkeypatch.setenv("NPU_RFT_KERNELS_TILE_BYTES", "lots")
    with pytest.raises(ConfigError, match=r"expected an integer[\s\S]*kernels.tile_bytes <- \$NPU_RFT_KERNELS_TILE_BYTES"):
        load_train_config(_minimal(tmp_path))
    monkeypatch.setenv("NPU_RFT_KERNELS_TILE_BYTES", "-1")
    with pytest.raises(ConfigError, match="kernels.tile_bytes=-1"):
        load_train_config(_minimal(tmp_path))


def test_kernels_backend_is_validated(tmp_path):
    from npu_rft.config import load_train_config
    from npu_rft.config_base import ConfigError

    with pytest.raises(ConfigError, match="kernels.backend='cuda': choose auto or one of naive, npu, torch, triton"):
        load_train_config(_minimal(tmp_path), ["kernels.backend=cuda"])
