"""Preparation in units of work: cut into pieces or not, the same dataset byte for byte, equal to one Cleaner
streaming the whole input; duplicates found across pieces; an interrupted or killed build resumes to the same bytes;
a corrupt input is named and nothing half-written looks complete. All in this process (tests/data/test_executors.py
and tests/slurm/test_prepare_slurm.py run the same builds as tasks)."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import llmkit.data.prep.pipeline as pipeline
from llmkit.data.cleaning import Cleaner
from llmkit.data.prep.executors import InProcess
from llmkit.data.prep.pieces import InputError, Piece, component_pieces, read_piece
from llmkit.data.prep.pipeline import prepare
from llmkit.data.shards import MANIFEST
from tests.data.prep_corpus import EXACT, NEAR, ORIGINALS, corpus_spec, dataset_digest, write_corpus

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The dataset built with the whole input as one piece."""
    return prepare(corpus_spec(corpus), tmp_path_factory.mktemp("one_piece"), "web", progress=False, piece_bytes=1 << 40)


def test_pieces_are_the_input_files_in_order(corpus: Path) -> None:
    spec = corpus_spec(corpus)
    pieces = component_pieces("web", spec.components["web"], "hash", piece_bytes=0)
    assert [p.files for p in pieces] == [(str(f),) for f in sorted(corpus.glob("part*.jsonl*"))]
    assert len(component_pieces("web", spec.components["web"], "hash", piece_bytes=1 << 40)) == 1
    assert len(component_pieces("web", spec.components["web"], "tail", piece_bytes=0)) == 1  # tail needs it all
    streamed = [doc for p in pieces for doc in read_piece(spec.components["web"], p)]
    assert streamed == list(pipeline.read_documents(spec.components["web"]))


def test_one_piece_per_file_gives_the_same_bytes_as_one_piece(corpus: Path, reference: Path, tmp_path: Path) -> None:
    per_file = prepare(corpus_spec(corpus), tmp_path, "web", progress=False, piece_bytes=0)
    assert per_file.name == reference.name and dataset_digest(per_file) == dataset_digest(reference)
    assert not any(p.name.startswith(".") for p in per_file.rglob("*"))  # no scaffolding, no temporary files


def test_it_equals_one_cleaner_streaming_everything_and_finds_copies_across_files(corpus: Path, reference: Path) -> None:
    spec = corpus_spec(corpus)
    cleaner = Cleaner(**spec.clean)
    kept = [name for name, _ in cleaner(pipeline.read_documents(spec.components["web"]))]
    clean = [json.loads(line)["name"] for s in ("train", "val", "test")
             for line in (reference / "web" / "clean" / f"{s}.jsonl").read_text().splitlines()]
    assert sorted(clean) == sorted(kept) and len(kept) == ORIGINALS  # every planted group keeps exactly one
    report = json.loads((reference / "web" / "cleaning_report.json").read_text())
    assert report == cleaner.report.to_dict()
    filters = report["filters"]
    assert filters["exact_dedup"]["removed"] + filters["near_dedup"]["removed"] == NEAR + EXACT
    assert filters["near_dedup"]["removed"] >= NEAR - 1  # near copies of one original may be exact copies of each other
    manifest = json.loads((reference / MANIFEST).read_text())
    assert "created" not in manifest and manifest["components"]["web"]["cleaning"] == report


@pytest.mark.parametrize("clean", [{}, {"exact_dedup": False, "near_dedup": {"threshold": 0.7}, "quality": {}},
                                   {"near_dedup": {"threshold": 0.9, "num_perm": 64}, "min_chars": 900}])
def test_every_cleaning_setting_matches_the_cleaner(corpus: Path, tmp_path: Path, clean: dict) -> None:
    spec = corpus_spec(corpus, clean=clean)
    counts = pipeline.clean_components(spec, tmp_path, InProcess(progress=False), piece_bytes=0)
    cleaner = Cleaner(**clean)
    kept = list(cleaner(pipeline.read_documents(spec.components["web"])))
    assert json.loads((tmp_path / "web" / "cleaning_report.json").read_text()) == cleaner.report.to_dict()
    assert sum(counts["web"].values()) == len(kept)


def test_an_interrupted_build_resumes_and_skips_finished_units(
    corpus: Path, reference: Path, tmp_path: Path, monkeypatch
) -> None:
    original = pipeline.write_shard_unit

    def fail_on_shard_two(*args):
        if args[3] == 2:
            raise RuntimeError("interrupted")
        return original(*args)

    monkeypatch.setattr(pipeline, "write_shard_unit", fail_on_shard_two)
    executor = InProcess(progress=False, resumable=True)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare(corpus_spec(corpus), tmp_path, "web", executor=executor, piece_bytes=0)
    assert not list(tmp_path.glob("*/" + MANIFEST))  # nothing looks complete
    assert (tmp_path / f".{reference.name}.work").is_dir()  # kept for the next run
    monkeypatch.setattr(pipeline, "write_shard_unit", original)
    again = InProcess(progress=False, resumable=True)
    out = prepare(corpus_spec(corpus), tmp_path, "web", executor=again, piece_bytes=0)
    ran = {entry.stage: entry.ran for entry in again.log}
    assert ran["clean"] == ran["filter"] == ran["encode"] == 0 and 0 < ran["shards"] < len(list(out.glob("web/*.bin")))
    assert dataset_digest(out) == dataset_digest(reference)
    assert not (tmp_path / f".{reference.name}.work").exists()


def test_a_build_killed_mid_write_resumes_to_the_same_bytes(corpus: Path, reference: Path, tmp_path: Path) -> None:
    """SIGKILL while a shard is half written: the next run rewrites that shard and nothing else looks different."""
    script = (
        "import sys; from pathlib import Path; from llmkit.data.prep.executors import InProcess; "
        "from llmkit.data.prep.pipeline import prepare; from tests.data.prep_corpus import corpus_spec; "
        "prepare(corpus_spec(Path(sys.argv[1])), Path(sys.argv[2]), 'web', "
        "executor=InProcess(progress=False, resumable=True), piece_bytes=0)"
    )
    env = {**os.environ, "LLMKIT_PREPARE_KILL": "*/web/train_00001.bin", "LLMKIT_PREPARE_KILL_ONCE": str(tmp_path / "killed"),
           "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", script, str(corpus), str(tmp_path / "out")], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    work = tmp_path / "out" / f".{reference.name}.work"
    assert list((work / "web").glob(".train_00001.bin.*.tmp")) and not (work / MANIFEST).exists()
    out = prepare(corpus_spec(corpus), tmp_path / "out", "web", executor=InProcess(progress=False, resumable=True), piece_bytes=0)
    assert dataset_digest(out) == dataset_digest(reference)


def test_a_corrupt_input_is_named_and_nothing_looks_complete(corpus: Path, tmp_path: Path) -> None:
    broken = tmp_path / "in"
    broken.mkdir()
    for f in corpus.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    gz = next(broken.glob("*.gz"))
    gz.write_bytes(gz.read_bytes()[: len(gz.read_bytes()) // 2])  # cut short
    with pytest.raises(InputError, match=f"{gz}: cannot read it: EOFError"):
        prepare(corpus_spec(broken), tmp_path / "out", "web", progress=False, piece_bytes=0)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # the temporary build is gone
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(InputError, match=f"{gz}: cannot read it: BadGzipFile"):
        list(read_piece(corpus_spec(broken).components["web"], Piece("web", 0, (str(gz),))))
    bad = broken / "part0.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{not json\n')
    with pytest.raises(InputError, match=f"{bad}, line 2: not valid JSON"):
        list(read_piece(corpus_spec(broken).components["web"], Piece("web", 0, (str(bad),))))


def test_gzipped_and_plain_pieces_read_alike(tmp_path: Path) -> None:
    lines = '{"text": "one"}\n{"text": "two"}\n'
    (tmp_path / "a.jsonl").write_text(lines)
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(lines)
    options = {"source": "jsonl", "path": str(tmp_path / "*")}
    docs = [d for p in component_pieces("c", options, "hash", 0) for d in read_piece(options, p)]
    assert [t for _, t in docs] == ["one", "two", "one", "two"] and docs[2][0].endswith("b.jsonl.gz:1")
