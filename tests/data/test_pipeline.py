"""The pipeline end to end: stages alone and chained, JSONL and mixtures, pretrained tokenizers,
the cleaning report next to the shards, and prepared datasets at fsspec URLs."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import fsspec
import pytest

from llmkit.data import LMDataModule
from llmkit.data.prep.pipeline import DataSpec, clean_stage, encode_stage, prepare, tokenizer_stage
from llmkit.data.prepared import PreparedDataset
from llmkit.data.shards import MANIFEST, ShardError
from llmkit.text.tokenizer import train_tokenizer
from tests.data.helpers import byte_level_bpe_json

WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega river stone cloud".split()


def _doc(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    """60 distinct documents, 5 exact copies and 5 near copies (one word changed)."""
    rng = random.Random(0)
    docs = [_doc(rng) for _ in range(60)]
    near = [d.replace(" ", " zz ", 1) for d in docs[:5]]
    records = [{"id": f"doc{i}", "body": {"text": t}} for i, t in enumerate(docs + docs[5:10] + near)]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def _spec(jsonl: Path, **overrides) -> DataSpec:
    settings = dict(
        components={"web": {"source": "jsonl", "path": str(jsonl), "text_field": "body.text", "id_field": "id"}},
        clean={"near_dedup": {"threshold": 0.8}}, tokenizer="bpe", vocab_size=320, val_fraction=0.1,
        shard_tokens=2000,
    )
    settings.update(overrides)
    return DataSpec(**settings)


def test_jsonl_to_shards_with_the_cleaning_report(jsonl: Path, tmp_path: Path) -> None:
    directory = prepare(_spec(jsonl), tmp_path / "out", "web", progress=False)
    report = json.loads((directory / "web" / "cleaning_report.json").read_text())
    assert report["documents_in"] == 70 and report["documents_out"] == 60
    assert report["filters"]["exact_dedup"]["removed"] == 5 and report["filters"]["near_dedup"]["removed"] == 5
    dataset = PreparedDataset.open(directory)
    manifest = dataset.manifest
    splits = manifest["components"]["web"]["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 60
    assert len(splits["train"]["shards"]) > 1 and all(e["tokens"] == 2000 for e in splits["train"]["shards"][:-1])
    assert manifest["components"]["web"]["cleaning"]["documents_out"] == 60  # the summary travels in the manifest
    assert dataset.tokenizer.decode(dataset.stream("web", "train").read(0, 30).tolist()).split()[0] in WORDS


def test_stages_run_alone_give_the_same_dataset(jsonl: Path, tmp_path: Path) -> None:
    spec = _spec(jsonl)
    work = tmp_path / "work"
    counts = clean_stage(spec, "web", work, progress=False)
    assert counts["train"] + counts["val"] == 60 and (work / "web" / "clean" / "train.jsonl").exists()
    tokenizer = tokenizer_stage(spec, work)
    manifest = encode_stage(spec, work, progress=False)
    chained = PreparedDataset.open(prepare(spec, tmp_path / "out", "web", progress=False)).manifest
    assert manifest["tokenizer_fingerprint"] == tokenizer.fingerprint == chained["tokenizer_fingerprint"]
    shas = [[e["sha256"] for e in m["components"]["web"]["splits"]["train"]["shards"]] for m in (manifest, chained)]
    assert shas[0] == shas[1]


def test_existing_sentencepiece_model_is_used_instead_of_training(jsonl: Path, tmp_path: Path) -> None:
    trained = train_tokenizer("unigram", [_doc(random.Random(i)) for i in range(50)], 300)
    model = tmp_path / "given.model"
    model.write_bytes(trained.proto)
    directory = prepare(_spec(jsonl, tokenizer_path=str(model)), tmp_path / "out", "web", progress=False)
    assert "pretrained" in directory.name
    assert PreparedDataset.open(directory).tokenizer.fingerprint == trained.fingerprint
    # the same model file with the prepared dataset is fine; another tokenizer is refused by name
    LMDataModule(prepared=str(directory), tokenizer_path=str(model)).setup()
    other = tmp_path / "other.model"
    other.write_bytes(train_tokenizer("bpe", [_doc(random.Random(i)) for i in range(50)], 300).proto)
    with pytest.raises(ShardError, match=f"tokenizer_path={other} is not the tokenizer the shards"):
        LMDataModule(prepared=str(directory), tokenizer_path=str(other)).setup()


def test_mixture_components_share_one_tokenizer_and_are_drawn_by_weight(jsonl: Path, tmp_path: Path) -> None:
    text = tmp_path / "story.txt"
    text.write_text("\n\n".join(_doc(random.Random(100 + i), 60) for i in range(40)))
    mixture = {
        "web": {"source": "jsonl", "path": str(jsonl), "text_field": "body.text", "weight": 3.0},
        "story": {"source": "text", "path": str(text), "weight": 1.0, "split_by": "tail"},  # one file: split its tail
    }
    dm = LMDataModule(
        mixture=mixture, tokenizer="char", split="hash", val_fraction=0.2, seq_len=16, batch_size=8,
        cache_dir=str(tmp_path / "cache"), progress=False, val_windows=20,
    )
    dm.prepare_data()
    dm.setup()
    assert dm.dataset.components == ["story", "web"] and dm.dataset.weights == [1.0, 3.0]
    assert dm.data_dir().name.startswith("mixture-char-")
    story = dm.dataset.manifest["components"]["story"]["splits"]
    assert story["train"]["documents"] == story["val"]["documents"] == 1  # split_by=tail for this component only
    assert 0.15 < story["val"]["tokens"] / (story["train"]["tokens"] + story["val"]["tokens"]) < 0.25
    assert dm.dataset.manifest["components"]["web"]["splits"]["train"]["documents"] > 30
    batches = dm.train_batches()
    drawn = Counter(batches.mixture.locate(j)[0] for j in range(4096))
    assert drawn == {0: 1024, 1: 3072}
    assert next(iter(dm.train_dataloader()))[0].shape == (8, 16)
    assert len(dm.validation_windows()) == 20


def test_a_dataset_at_an_fsspec_url_is_cached_locally(jsonl: Path, tmp_path: Path, monkeypatch) -> None:
    directory = prepare(_spec(jsonl), tmp_path / "out", "web", progress=False)
    fs = fsspec.filesystem("memory")
    for path in directory.rglob("*"):
        if path.is_file():
            fs.pipe(f"/bucket/ds/{path.relative_to(directory).as_posix()}", path.read_bytes())
    url = "memory://bucket/ds"
    dm = LMDataModule(prepared=url, cache_dir=str(tmp_path / "cache"), seq_len=16, batch_size=2, progress=False)
    dm.prepare_data()
    dm.setup()
    assert dm.data_dir().is_relative_to(tmp_path / "cache" / "remote")
    assert dm.dataset.fingerprint == PreparedDataset.open(directory).fingerprint
    assert next(iter(dm.train_dataloader()))[0].shape == (2, 16)

    fetched: list[str] = []
    original = fs.get_file
    monkeypatch.setattr(type(fs), "get_file", lambda self, rpath, lpath, **kw: fetched.append(rpath) or original(rpath, lpath))
    LMDataModule(prepared=url, cache_dir=str(tmp_path / "cache")).prepare_data()
    assert fetched == []  # cached files with the right checksum are not fetched again

    cached = dm.data_dir() / "web" / "train_00000.bin"
    damaged = bytearray(cached.read_bytes())
    damaged[-1] ^= 0xFF
    cached.write_bytes(bytes(damaged))  # a damaged cached copy is fetched again, not trusted
    LMDataModule(prepared=url, cache_dir=str(tmp_path / "cache")).prepare_data()
    assert fetched == ["/bucket/ds/web/train_00000.bin"] and cached.read_bytes() != bytes(damaged)

    shard = "/bucket/ds/web/train_00000.bin"
    data = bytearray(fs.cat_file(shard))
    data[-1] ^= 0xFF
    fs.pipe(shard, bytes(data))
    with pytest.raises(ShardError, match="checksum mismatch for memory://bucket/ds/web/train_00000.bin|checksum mismatch"):
        LMDataModule(prepared=url, cache_dir=str(tmp_path / "other_cache")).prepare_data()
    fs.rm("/bucket", recursive=True)


def test_a_local_prepared_directory_and_a_missing_one(jsonl: Path, tmp_path: Path) -> None:
    directory = prepare(_spec(jsonl), tmp_path / "out", "web", progress=False)
    dm = LMDataModule(prepared=str(directory), seq_len=16, batch_size=2, progress=False)
    dm.prepare_data()
    dm.setup()
    assert dm.data_dir() == directory
    with pytest.raises(FileNotFoundError, match=f"no prepared dataset in {tmp_path / 'nowhere'}.*llmkit prepare"):
        LMDataModule(prepared=str(tmp_path / "nowhere")).setup()
    assert (directory / MANIFEST).exists()


def test_a_hugging_face_tokenizer_json_through_the_pipeline(jsonl: Path, tmp_path: Path) -> None:
    byte_level_bpe_json([_doc(random.Random(i)) for i in range(30)], 300, tmp_path / "tokenizer.json")
    directory = prepare(_spec(jsonl, tokenizer_path=str(tmp_path / "tokenizer.json")), tmp_path / "out", "web", progress=False)
    dataset = PreparedDataset.open(directory)
    assert dataset.tokenizer.kind == "hf_tokenizers" and dataset.manifest["vocab_size"] == 300
    stream = dataset.stream("web", "train")
    end = int(stream.doc_starts[1])
    tokens = stream.read(0, end).tolist()
    assert tokens[-1] == dataset.tokenizer.eos_id  # documents end with </s>
    words = dataset.tokenizer.decode(tokens[:-1]).rstrip(".").split()
    assert len(words) == 120 and set(words) <= set(WORDS)


@pytest.mark.slow
def test_prepare_command_all_and_single_stages(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The command line: stage=all prints the dataset, stages alone write their files in work_dir."""
    from llmkit.cli import main as llmkit

    text = tmp_path / "story.txt"
    text.write_text("\n\n".join(_doc(random.Random(i), 80) for i in range(30)))
    common = [f"paths.data_dir={tmp_path / 'cache'}", "data=text", f"data.path={text}", "data.tokenizer=char",
              "data.progress=false", "hydra.run.dir=."]

    def run(*args: str) -> str:  # in this process: five runs would pay five interpreter start-ups
        capsys.readouterr()
        llmkit(["prepare", *common, *args])
        return capsys.readouterr().out

    out = run()
    assert "dataset:" in out and "train" in out and "documents in" in out
    (dataset,) = (tmp_path / "cache").glob("text-char-*")
    assert (dataset / MANIFEST).exists()
    for stage in ("clean", "tokenizer", "encode"):
        assert f"stage {stage} done" in run(f"stage={stage}")
    work = tmp_path / "cache" / "work" / "text"
    assert (work / "text" / "clean" / "train.jsonl").exists() and (work / MANIFEST).exists()
    # the stages alone make the same shards as the chained run
    shas = [[e["sha256"] for e in json.loads((d / MANIFEST).read_text())["components"]["text"]["splits"]["train"]["shards"]]
            for d in (dataset, work)]
    assert shas[0] == shas[1]
    with pytest.raises(SystemExit, match="unknown stage 'tokenise'; valid: all, clean, tokenizer, encode"):
        llmkit(["prepare", *common, "stage=tokenise"])
