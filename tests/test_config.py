"""Every preset and option composes and builds; presets are pure; bad names fail helpfully."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from llmkit.hardware import HardwareError, check_hardware, set_matmul_precision
from llmkit.model import ModelConfig, Transformer

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
COMPONENT_GROUPS = sorted(p.name for p in (CONF / "model").iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in COMPONENT_GROUPS for p in sorted((CONF / "model" / g).glob("*.yaml"))]
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def _build(model_cfg, vocab_size: int = 64) -> Transformer:
    values = OmegaConf.to_container(model_cfg, resolve=True)
    values["vocab_size"] = vocab_size
    return Transformer(ModelConfig.from_dict(values))


def test_there_is_something_to_check() -> None:
    assert {"gpt2", "simple_gpt", "gqa_rope", "tiny"} <= set(PRESETS)
    assert {"block", "norm", "attention", "position", "ffn"} <= set(COMPONENT_GROUPS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_builds(preset: str) -> None:
    cfg = _compose(f"model={preset}", "model.n_layers=2")  # depth does not change what is built per layer
    model = _build(cfg.model)
    assert model.cfg.d_model == cfg.model.d_model


def test_gpt2_preset_is_124m_with_the_gpt2_vocabulary() -> None:
    cfg = _compose("model=gpt2")
    assert 124e6 < _build(cfg.model, vocab_size=50257).num_params() < 125e6


@pytest.mark.parametrize("preset,vocab,low,high", [
    ("gqa_rope_350m", 2048, 340e6, 370e6), ("gqa_rope_1b", 2048, 850e6, 890e6), ("gqa_rope_1b", 32000, 0.97e9, 1.02e9),
])
def test_sized_presets_have_the_parameter_counts_their_names_and_mfu_figures_refer_to(
    preset: str, vocab: int, low: float, high: float
) -> None:
    cfg = _compose(f"model={preset}", "data.seq_len=2048")
    with torch.device("meta"):  # sizes only: nothing allocated
        assert low < _build(cfg.model, vocab_size=vocab).num_params() < high


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_component_option_builds(group: str, option: str) -> None:
    cfg = _compose("model=tiny", f"model/{group}={option}")
    _build(cfg.model)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("group,option", OPTIONS)
def test_preset_does_not_leak_into_swapped_component(preset: str, group: str, option: str) -> None:
    """With model/<group>=<option> the component is exactly the option file: a preset setting a
    component field (say n_kv_heads) would silently turn a run labelled MHA into GQA."""
    cfg = _compose(f"model={preset}", f"model/{group}={option}")
    expected = OmegaConf.load(CONF / "model" / group / f"{option}.yaml")
    assert OmegaConf.to_container(cfg.model[group]) == OmegaConf.to_container(expected)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds(experiment: str) -> None:
    cfg = _compose(f"experiment={experiment}")
    _build(cfg.model)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_composes(trainer: str) -> None:
    cfg = _compose(f"trainer={trainer}")
    assert cfg.trainer.max_steps > 0


def test_headline_command_composes_and_stops_without_gpus() -> None:
    cfg = _compose("model=gqa_rope", "trainer=fsdp_8gpu")
    assert cfg.trainer.devices == 8 and cfg.model.attention.n_kv_heads == 2
    with pytest.raises(HardwareError, match=r"needs 8 CUDA GPU.*trainer=(cpu|gpu)"):
        check_hardware(cfg.trainer, "fsdp_8gpu")


def test_cpu_trainer_passes_hardware_check() -> None:
    check_hardware(_compose().trainer)


def test_gpu_trainers_let_float32_matmuls_use_tf32_and_a_bad_value_lists_valid_ones() -> None:
    import torch

    saved = torch.get_float32_matmul_precision()
    try:
        for trainer, expected in [("gpu", "high"), ("fsdp_8gpu", "high"), ("cpu", "highest")]:
            set_matmul_precision(_compose(f"trainer={trainer}").trainer)
            assert torch.get_float32_matmul_precision() == expected
        with pytest.raises(ValueError, match="float32_matmul_precision=tf32: valid values are highest, high, medium"):
            set_matmul_precision(_compose("trainer.float32_matmul_precision=tf32").trainer)
    finally:
        torch.set_float32_matmul_precision(saved)


@pytest.mark.parametrize("override", ["model=gpt3", "model/attention=gqq", "model/position=rotary", "trainer=fsdp_9gpu"])
def test_misspelt_option_lists_valid_names(override: str) -> None:
    with pytest.raises(MissingConfigException) as err:
        _compose(override)
    assert "Available options" in str(err.value)


def test_misspelt_component_name_inside_a_config_lists_valid_names() -> None:
    cfg = _compose("model.position.name=rotary")
    with pytest.raises(KeyError, match="unknown position 'rotary'; valid names: alibi, learned, none, rope"):
        _build(cfg.model)


def test_unknown_component_option_names_the_component() -> None:
    cfg = _compose("+model.attention.n_kv_head=2")
    with pytest.raises(TypeError, match="model.attention=causal.*n_kv_head"):
        _build(cfg.model)
