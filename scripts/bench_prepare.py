"""Benchmark: `llmkit prepare` stage by stage, in one process, as 2 local tasks and as 2 SLURM tasks, side by side.

A synthetic corpus (--mb of JSON lines over --files files, with 10% planted near duplicates and 2% exact copies,
each in another file than its original) is prepared three times with the same settings (near-dedup on, a BPE
tokenizer); the table gives each stage group's wall-clock seconds and throughput (MB of input per second):

    clean     read, transforms, per-document filters            (stage clean)
    dedup     MinHash, buckets, clusters, filter, gather          (minhash, buckets, clusters, filter, gather)
    tokenize  tokenizer training                                 (tokenizer)
    encode    token ids and shards                               (encode, shards)

and checks that the three datasets are byte-identical. A task stage also pays for starting its processes (and on
SLURM for scheduling): on small corpora that overhead, not the work, sets the figure. The SLURM column needs a
cluster (slurm/local-cluster.sh up) and is skipped without one.

  python scripts/bench_prepare.py [--mb 16] [--files 8] [--vocab 2048] [--seed 0] [--out /tmp/bench_prepare]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmkit.data.prep.executors import make_executor  # noqa: E402
from llmkit.data.prep.pipeline import DataSpec, prepare  # noqa: E402

GROUPS = {"clean": ["clean"], "dedup": ["minhash", "buckets", "clusters", "filter", "gather"],
          "tokenize": ["tokenizer"], "encode": ["encode", "shards"]}


def write_corpus(directory: Path, megabytes: float, files: int, seed: int) -> None:
    rng = random.Random(seed)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    originals, size = [], 0
    while size < megabytes * 1e6 * 0.88:
        originals.append(" ".join(rng.choices(vocab, k=rng.randint(180, 330))))
        size += len(originals[-1])
    out: list[list[str]] = [[] for _ in range(files)]
    for i, text in enumerate(originals):
        out[i * files // len(originals)].append(json.dumps({"id": f"{i}", "text": text}))
    for k in range(len(originals) // 9):
        i = rng.randrange(len(originals))
        words = originals[i].split()
        words[rng.randrange(len(words))] = rng.choice(vocab)
        out[(i * files // len(originals) + 1) % files].append(json.dumps({"id": f"{i}/near{k}", "text": " ".join(words)}))
    for k in range(len(originals) // 45):
        i = rng.randrange(len(originals))
        out[(i * files // len(originals) + 2) % files].append(json.dumps({"id": f"{i}/exact{k}", "text": originals[i]}))
    directory.mkdir(parents=True, exist_ok=True)
    for n, lines in enumerate(out):
        (directory / f"part{n:02d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def have_slurm() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run(spec: DataSpec, root: Path, executor: str, tasks: int) -> tuple[dict, dict[str, str]]:
    shutil.rmtree(root, ignore_errors=True)
    out = prepare(spec, root, "bench", progress=False, executor=make_executor(executor, tasks, progress=False), piece_bytes=0)
    log = json.loads((out / "prepare_log.json").read_text())
    digest = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
              for p in sorted(out.rglob("*")) if p.is_file() and p.name not in ("prepare_log.json", ".verified.json")}
    return log, digest


def table(logs: dict[str, dict]) -> str:
    mb = next(iter(logs.values()))["input_bytes"] / 1e6
    header = f"{'stage':<10}" + "".join(f"{name:>24}" for name in logs)
    lines = [f"{mb:.1f} MB of input; seconds and MB/s per stage group", header, f"{'':<10}" + "   seconds     MB/s  " * len(logs)]
    for group, stages in [*GROUPS.items(), ("total", None)]:
        row = f"{group:<10}"
        for log in logs.values():
            seconds = log["seconds"] if stages is None else sum(s["seconds"] for s in log["stages"] if s["stage"] in stages)
            row += f"{seconds:>11.2f} {mb / seconds:>9.2f}    "
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=16)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_prepare"))
    args = parser.parse_args()

    write_corpus(args.out / "corpus", args.mb, args.files, args.seed)
    spec = DataSpec(components={"web": {"source": "jsonl", "path": str(args.out / "corpus" / "*.jsonl"), "id_field": "id"}},
                    clean={"near_dedup": {"threshold": 0.8}}, vocab_size=args.vocab, shard_tokens=1 << 20)
    runs = [("1 process", "none", 1), ("2 local tasks", "local", 2)]
    runs += [("2 SLURM tasks", "slurm", 2)] if have_slurm() else []
    logs, digests = {}, []
    for label, executor, tasks in runs:
        start = time.perf_counter()
        logs[label], digest = run(spec, args.out / executor, executor, tasks)
        digests.append(digest)
        print(f"{label}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(table(logs))
    if not have_slurm():
        print("(no SLURM cluster answered: the SLURM column is left out; slurm/local-cluster.sh up brings one up)")
    same = all(d == digests[0] for d in digests)
    print(f"datasets byte-identical across the runs: {'yes' if same else 'NO'} ({len(digests[0])} files)")
    removed = json.loads((args.out / "none").glob("bench-*").__next__().joinpath("web", "cleaning_report.json").read_text())
    print("removed: " + ", ".join(f"{k} {v['removed']}" for k, v in removed["filters"].items()))


if __name__ == "__main__":
    main()
