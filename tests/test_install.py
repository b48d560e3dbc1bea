"""A regular (non-editable) install works from any directory: the configs travel inside the package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # a venv and a wheel: ~40 s; .ci/run runs it


def _run(*cmd: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv holding llmkit from a wheel; its dependencies come from this interpreter's
    site-packages through a .pth line (no download, and not this checkout: a path added by a .pth
    file is not scanned for .pth files, so the editable install's finder stays out)."""
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy: building in the checkout would leave build/ and egg-info there
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "llmkit", "conf"):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "wheel", source, cwd=tmp)
    env = tmp / "venv"
    venv.create(env, with_pip=True)  # ensurepip: offline
    purelib = Path(sysconfig.get_paths(vars={"base": str(env), "platbase": str(env)})["purelib"])
    (purelib / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (wheel,) = (tmp / "wheel").glob("llmkit-*.whl")
    _run(env / "bin" / "python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp)
    return env


def test_a_wheel_install_trains_generates_evaluates_and_exports_from_another_directory(
    installed: Path, tmp_path: Path
) -> None:
    python = installed / "bin" / "python"
    where = _run(python, "-c", "import llmkit, llmkit.conf; print(llmkit.__file__)", cwd=tmp_path).stdout
    assert str(installed) in where, f"llmkit imported from {where}, not from the wheel"
    llmkit = [installed / "bin" / "llmkit"]  # the console script pip wrote
    run = tmp_path / "run"
    _run(*llmkit, "train", f"hydra.run.dir={run}", f"data.cache_dir={tmp_path / 'cache'}", *TINY_RUN, cwd=tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    assert json.loads((run / "summary.json").read_text())["steps"] == 4

    out = _run(*llmkit, "generate", f"ckpt={ckpt}", "prompt=def", "max_new_tokens=8", "temperature=0", cwd=tmp_path).stdout
    assert out.startswith("def") and len(out) > len("def\n")
    (tmp_path / "held_out.txt").write_text("import os\n" * 20)
    _run(*llmkit, "evaluate", f"ckpt={ckpt}", "text=held_out.txt", "out=eval.json", cwd=tmp_path)
    assert json.loads((tmp_path / "eval.json").read_text())["tokens"] > 0
    _run(*llmkit, "export", f"ckpt={ckpt}", "out=hf", cwd=tmp_path)
    assert (tmp_path / "hf" / "model.safetensors").exists()
