"""The name clients send as `model`: short by default, never the checkpoint's path."""

from pathlib import Path

import pytest

from llmkit.serve import protocol as api
from llmkit.serve.app import ServerState, ServeSettings, default_model_name


def test_a_runs_checkpoint_is_named_after_the_run(tmp_path: Path) -> None:
    ckpt = tmp_path / "outputs" / "gqa-sft" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    assert default_model_name(ckpt) == "gqa-sft"


def test_a_loose_file_is_named_by_its_stem_and_a_directory_by_its_name(tmp_path: Path) -> None:
    (tmp_path / "model-v2.ckpt").write_bytes(b"x")
    (tmp_path / "tiny-int8").mkdir()
    assert default_model_name(tmp_path / "model-v2.ckpt") == "model-v2"
    assert default_model_name(tmp_path / "tiny-int8") == "tiny-int8"
    assert default_model_name(str(tmp_path / "tiny-int8") + "/") == "tiny-int8"


def _state(tmp_path: Path) -> tuple[ServerState, Path]:
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"x")
    return ServerState(lambda: None, ServeSettings(model_name="run", checkpoint=str(ckpt))), ckpt


def test_the_old_path_form_gets_a_404_that_names_the_new_name(tmp_path: Path, monkeypatch) -> None:
    state, ckpt = _state(tmp_path)
    state.check_model("run")  # the name is accepted
    monkeypatch.chdir(tmp_path)
    for old in (str(ckpt), "run/checkpoints/last.ckpt", "./run/checkpoints/../checkpoints/last.ckpt"):
        with pytest.raises(api.APIError) as err:
            state.check_model(old)
        assert err.value.status == 404 and "send model='run'" in str(err.value.message), old


def test_an_unknown_name_gets_the_plain_404(tmp_path: Path) -> None:
    state, _ = _state(tmp_path)
    with pytest.raises(api.APIError) as err:
        state.check_model("gpt-4")
    assert err.value.status == 404 and "does not exist; this server serves 'run'" in err.value.message
