"""The preparation pipeline: sources -> cleaning + dedup + splits -> tokenizer -> shards + manifest, in stages that
run in this process or as tasks on this machine or a SLURM cluster (llmkit/data/prep/executors.py).

    clean_components   per piece (llmkit/data/prep/pieces.py): read, transform, per-document filters   -> prep_clean
                       per piece: MinHash signatures and LSH band keys                            -> prep_dedup
                       per digest slice: exact duplicates; per LSH band: bucket candidates        -> prep_dedup
                       one unit per component: near duplicates among the candidates, in order    -> prep_dedup
                       per piece: drop duplicates, assign splits; then gather clean/{split}.jsonl -> prep_clean
    tokenizer_stage    one unit: train (or load) the tokenizer                                    -> prep_encode
    encode_stage       per byte range: token ids; per shard: the shard; then manifest.json        -> prep_encode

Every unit's work depends on the input and the settings only, never on the number of tasks, and each stage's output
is in input order: the shards and the manifest are byte-identical whether one process or N tasks prepared them.
Units are marked done when their outputs are complete (llmkit/data/prep/tasks.py), so a killed task is rerun alone and a
rerun skips what is done. `prepare()` builds in a work directory beside the dataset and renames it into place when
complete; a dataset is keyed by a fingerprint of every setting and of the source files, so a second run reuses it.
An in-process build works in a temporary directory removed on failure; a build on an executor works in
`.<dataset>.work`, kept on failure, which the next run with the same settings resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from llmkit.data.files import write_json_atomic
from llmkit.data.prep import layout
from llmkit.data.prep.clean import (
    clean_piece,
    filter_piece,
    finish_gather,
    gather_offsets,
    gather_piece,
    merge_report,
    open_gather_files,
)
from llmkit.data.prep.dedup import band_candidates, exact_partition, exact_path, minhash_piece, near_clusters, near_removed_path
from llmkit.data.prep.encode import (
    build_manifest,
    encode_range,
    encode_ranges,
    range_key,
    read_clean,  # noqa: F401  (re-exported: stages read cleaned documents through it)
    shard_plan,
    train_tokenizer_unit,
    write_shard_unit,
)
from llmkit.data.prep.executors import Executor, InProcess
from llmkit.data.prep.layout import CLEAN_DIR, REPORT, TOKENIZER_DIR  # noqa: F401  (the layout, as before)
from llmkit.data.prep.pieces import PIECE_BYTES, Piece, component_pieces, read_documents  # noqa: F401
from llmkit.data.prep.tasks import PREP, Unit, is_done, result
from llmkit.data.shards import MANIFEST, token_dtype
from llmkit.data.spec import DataSpec, source_fingerprint  # noqa: F401  (re-exported)
from llmkit.data.splits import SPLITS
from llmkit.text.tokenizer import Tokenizer, load_tokenizer

EXACT_PARTITION_DOCS = 4_000_000  # documents per exact-dedup unit (its digests: 24 bytes each)
SPEC_FILE = "spec.json"


# ---- stages 1-3: sources, cleaning, dedup, splits -----------------------------------------------------------------
def clean_components(
    spec: DataSpec, work: Path, executor: Executor | None = None, names: list[str] | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> dict[str, dict[str, int]]:
    """Clean, dedup and split components (default: all) into <name>/clean/{split}.jsonl and their cleaning reports;
    returns the documents per split of each."""
    executor, work = executor or InProcess(), Path(work).resolve()  # tasks may start elsewhere
    _claim(work, spec)
    names = sorted(names or spec.components)
    pieces = {c: component_pieces(c, spec.components[c], spec.split_method(c), piece_bytes) for c in names}
    cleaned = _run(executor, work, [Unit("clean", p.key, clean_piece, (spec.clean, spec.components[p.component], p, str(work)))
                                    for c in names for p in pieces[c]])
    near = spec.clean.get("near_dedup")
    if near is not None:
        _run(executor, work, [Unit("minhash", p.key, minhash_piece, (dict(near), p, str(work), cleaned[p.key]["documents"]))
                              for c in names for p in pieces[c]])
    exact = spec.clean.get("exact_dedup", True)
    parts = {c: _exact_parts(sum(cleaned[p.key]["documents"] for p in pieces[c]), exact) for c in names}
    _run(executor, work, _bucket_units(spec, work, pieces, parts))
    if near is not None:
        _run(executor, work, [Unit("clusters", c, near_clusters, (dict(near), str(work), c, parts[c])) for c in names])
    filtered = _run(executor, work, [_filter_unit(spec, work, p, parts[c]) for c in names for p in pieces[c]])
    _gather(executor, work, pieces, filtered)
    return {c: _finish_component(spec, work, c, [cleaned[p.key] for p in pieces[c]], [filtered[p.key] for p in pieces[c]])
            for c in names}


def clean_stage(spec: DataSpec, name: str, work: Path, progress: bool = True, executor: Executor | None = None) -> dict[str, int]:
    """One component: clean/{split}.jsonl and the cleaning report; returns its documents per split."""
    return clean_components(spec, work, executor or InProcess(progress), [name])[name]


def _exact_parts(documents: int, enabled: bool) -> int:
    """Exact-dedup units: slices of digest space of about EXACT_PARTITION_DOCS documents (none when it is off)."""
    return max(1, min(256, math.ceil(documents / EXACT_PARTITION_DOCS))) if enabled else 0


def _bucket_units(spec: DataSpec, work: Path, pieces: dict[str, list[Piece]], parts: dict[str, int]) -> list[Unit]:
    units = [Unit("buckets", f"{c}/exact-{q:03d}", exact_partition, (str(work), c, len(pieces[c]), q, parts[c]))
             for c in pieces for q in range(parts[c])]
    near = spec.clean.get("near_dedup")
    if near is not None:
        from llmkit.data.dedup import NearDuplicateFilter

        bands = NearDuplicateFilter(**near).bands
        units += [Unit("buckets", f"{c}/band-{b:03d}", band_candidates, (str(work), c, len(pieces[c]), b))
                  for c in pieces for b in range(bands)]
    return units


def _filter_unit(spec: DataSpec, work: Path, piece: Piece, parts: int) -> Unit:
    c = piece.component
    exact = [str(exact_path(work, c, q)) for q in range(parts)]
    near = str(near_removed_path(work, c)) if spec.clean.get("near_dedup") is not None else None
    return Unit("filter", piece.key, filter_piece, (spec.split_settings(c), piece, str(work), exact, near))


def _gather(executor: Executor, work: Path, pieces: dict[str, list[Piece]], filtered: dict[str, dict]) -> None:
    units = []
    for c, component_pieces_ in pieces.items():
        offsets, totals = gather_offsets([filtered[p.key] for p in component_pieces_])
        mine = [Unit("gather", p.key, gather_piece, (str(work), c, p.index, offsets[p.index])) for p in component_pieces_]
        if not all(is_done(work, u) for u in mine):
            open_gather_files(work, c, totals)
        units += mine
    _run(executor, work, units)
    for c in pieces:
        finish_gather(work, c)


def _finish_component(spec: DataSpec, work: Path, name: str, cleaned: list[dict], filtered: list[dict]) -> dict[str, int]:
    report = merge_report(spec.clean, cleaned, filtered)
    path = work / name / REPORT
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    counts = {s: sum(f["splits"][s]["documents"] for f in filtered) for s in SPLITS}
    if counts["train"] == 0:
        raise ValueError(
            f"data component '{name}' has no training documents after cleaning and splitting: {counts}. "
            f"Filters removed: {_removed(report)} (details in {path}); "
            "loosen data.clean, change data.val_fraction or add documents"
        )
    return counts


def _removed(report: dict[str, Any]) -> str:
    filters = report.get("filters", {})
    return ", ".join(f"{k} {v['removed']}" for k, v in filters.items() if v.get("removed")) or "none"


# ---- stage 4: tokenizer -------------------------------------------------------------------------------------------
def tokenizer_stage(spec: DataSpec, work: Path, executor: Executor | None = None) -> Tokenizer:
    """Train on every component's training split (up to tokenizer_train_chars), or load the given one."""
    executor, work = executor or InProcess(), Path(work).resolve()  # tasks may start elsewhere
    _claim(work, spec)
    _run(executor, work, [Unit("tokenizer", "tokenizer", train_tokenizer_unit, (spec, str(work)))])
    return load_tokenizer(work / TOKENIZER_DIR)


# ---- stage 5: encoding --------------------------------------------------------------------------------------------
def encode_stage(
    spec: DataSpec, work: Path, processes: int = 1, progress: bool = True, executor: Executor | None = None
) -> dict[str, Any]:
    """Encode every component's splits into shards; returns the manifest (also written, last)."""
    executor, work = executor or InProcess(progress), Path(work).resolve()
    _claim(work, spec)
    loaded = load_tokenizer(work / TOKENIZER_DIR)
    tokenizer = {"vocab_size": loaded.vocab_size, "fingerprint": loaded.fingerprint}
    dtype = token_dtype(loaded.vocab_size, spec.dtype).name
    threads = executor.threads_per_task
    sizes = {(c, s): layout.clean_path(work, c, s).stat().st_size for c in sorted(spec.components) for s in SPLITS}
    ranges = {(c, s): [range_key(c, s, a, b) for a, b in encode_ranges(size, executor.tasks)] for (c, s), size in sizes.items()}
    units = [Unit("encode", key, encode_range, (str(work), c, s, *_bounds(key), dtype, processes, threads))
             for (c, s), keys in ranges.items() for key in keys]
    encoded = _run(executor, work, units)
    plans = {cs: shard_plan([(k, encoded[k]) for k in keys], spec.shard_tokens) for cs, keys in ranges.items()}
    shard_units = [Unit("shards", f"{c}/{s}/{i:05d}", write_shard_unit, (str(work), c, s, i, lo, hi, sources, dtype))
                   for (c, s), plan in plans.items() for i, (lo, hi, sources) in enumerate(plan)]
    entries = _run(executor, work, shard_units)
    splits: dict[str, dict[str, Any]] = {c: {} for c in spec.components}
    for (c, s), keys in ranges.items():
        shards = [entries[f"{c}/{s}/{i:05d}"] for i in range(len(plans[(c, s)]))]
        splits[c][s] = {"tokens": sum(encoded[k]["tokens"] for k in keys),
                        "documents": sum(encoded[k]["documents"] for k in keys), "shards": shards}
    reports = {c: _read_report(work, c) for c in spec.components}
    manifest = build_manifest(spec, tokenizer, splits, reports)
    write_json_atomic(work / MANIFEST, manifest)
    return manifest


def _bounds(key: str) -> tuple[int, int]:
    start, end = key.rsplit("/", 1)[1].split("-")
    return int(start), int(end)


def _read_report(work: Path, name: str) -> dict[str, Any]:
    path = work / name / REPORT
    return json.loads(path.read_text()) if path.exists() else {}


# ---- running units ------------------------------------------------------------------------------------------------
def _run(executor: Executor, work: Path, units: list[Unit]) -> dict[str, dict[str, Any]]:
    """Run a stage's units on the executor; their results by key."""
    if units:
        executor.run(units[0].stage, units, work)
    return {u.key: result(work, u) for u in units}


def _claim(work: Path, spec: DataSpec) -> None:
    """Markers in `work` are valid for one spec only: another spec's (a single-stage run in a reused work_dir)
    are cleared."""
    prep = work / PREP
    stamp = prep / SPEC_FILE
    fingerprint = spec.fingerprint()
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
        return
    shutil.rmtree(prep, ignore_errors=True)
    prep.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, {"fingerprint": fingerprint})


# ---- all stages ---------------------------------------------------------------------------------------------------
def dataset_dir(spec: DataSpec, root: Path, label: str) -> Path:
    return root / f"{label}-{spec.tokenizer if not spec.tokenizer_path else 'pretrained'}-{spec.fingerprint()}"


def prepare(
    spec: DataSpec, root: Path, label: str = "data", processes: int = 1, progress: bool = True, out: Path | None = None,
    executor: Executor | None = None, piece_bytes: int = PIECE_BYTES,
) -> Path:
    """Run every stage unless the dataset is already there; returns its directory (`out`, when the
    caller has already computed dataset_dir: fingerprinting globs and stats every source file)."""
    out = out or dataset_dir(spec, root, label)
    if (out / MANIFEST).exists():
        return out
    executor = executor or InProcess(progress)
    root.mkdir(parents=True, exist_ok=True)
    if executor.resumable:
        work = root / f".{out.name}.work"
        work.mkdir(exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    try:
        start = time.perf_counter()
        clean_components(spec, work, executor, piece_bytes=piece_bytes)
        tokenizer_stage(spec, work, executor)
        encode_stage(spec, work, processes, progress, executor)
        _write_log(work, executor, time.perf_counter() - start)
        _publish(work, out)
    except BaseException:
        if not executor.resumable:
            shutil.rmtree(work, ignore_errors=True)
        raise
    return out


PREPARE_LOG = "prepare_log.json"


def _write_log(work: Path, executor: Executor, seconds: float) -> None:
    """How this build ran (not part of the manifest, which must not depend on it)."""
    clean = [json.loads(p.read_text()) for p in sorted((work / PREP / "done" / "clean").rglob("*.json"))]
    write_json_atomic(work / PREPARE_LOG, {
        "executor": executor.name, "tasks": executor.tasks, "seconds": round(seconds, 3),
        "input_bytes": sum(r["bytes_in"] for r in clean),
        "stages": [vars(entry) | {"seconds": round(entry.seconds, 3)} for entry in executor.log],
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })


def _publish(work: Path, out: Path) -> None:
    """Drop the build's scaffolding and rename it into place; if another process won the race, keep its copy."""
    shutil.rmtree(work / PREP, ignore_errors=True)
    for leftover in list(work.rglob(".*.tmp")):  # temporary files (and a tokenizer directory) of killed attempts
        if leftover.is_dir():
            shutil.rmtree(leftover)
        else:
            leftover.unlink(missing_ok=True)
    try:
        os.replace(work, out)
    except OSError:
        if not (out / MANIFEST).exists():
            raise
        shutil.rmtree(work, ignore_errors=True)
