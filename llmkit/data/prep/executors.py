"""Where preparation stages run: in this process, or as tasks of submitit jobs on this machine or on SLURM.

Why submitit rather than datatrove's executors: llmkit's stages already exist (sources, cleaning, tokenizers, the
shard writer); what they lack is an engine that runs one function over a list of arguments as separate processes
and, on a cluster, as one SLURM job array. submitit does exactly that with one API for both (`map_array` on a
LocalExecutor or a SlurmExecutor), it is maintained, light, and already installed with hydra-submitit-launcher,
and its local executor starts the same pickled function in fresh processes, so a local run rehearses a SLURM one.
datatrove would bring its own document model and pipeline-step classes that llmkit's stages would have to be
rewritten into, to end in llmkit shards all the same.

An executor runs a stage: the units not yet done (tasks.is_done), dealt round-robin to at most `tasks` tasks. A
task killed from outside (SIGKILL, preemption, a lost node: submitit reports no result) is resubmitted with its
unfinished units up to `retries` times; an error raised by a unit (a corrupt input) is not retried but reported
with the unit's own message, which names the input.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from llmkit.data.prep.tasks import PREP, Unit, UnitError, is_done, recorded_errors, run_unit, run_units

EXECUTORS = ("none", "local", "slurm")


@dataclass
class StageLog:
    stage: str
    units: int
    ran: int
    seconds: float


class Executor(Protocol):
    name: str
    tasks: int
    resumable: bool  # keeps a failed build's work directory for the next run to resume
    threads_per_task: int | None  # encoding threads in each task; None: the tokenizer's default
    log: list[StageLog]

    def run(self, stage: str, units: list[Unit], work: Path) -> None: ...


@dataclass
class InProcess:
    """Every unit in this process, one after another: `prepare()` without an engine (and LMDataModule's path)."""

    progress: bool = True
    name: str = "none"
    tasks: int = 1
    resumable: bool = False
    threads_per_task: int | None = None  # encoding: the tokenizer's own threading, as before
    log: list[StageLog] = field(default_factory=list)

    def run(self, stage: str, units: list[Unit], work: Path) -> None:
        start = time.perf_counter()
        pending = [u for u in units if not is_done(work, u)]
        for unit in tqdm(pending, desc=stage, unit=" units", disable=not self.progress or len(pending) < 2):
            run_unit(unit, work)
        self.log.append(StageLog(stage, len(units), len(pending), time.perf_counter() - start))
        if self.progress:
            print(f"{stage}: {len(pending)} of {len(units)} units in {time.perf_counter() - start:.1f} s", file=sys.stderr)


@dataclass
class Submitit:
    """Units as tasks of submitit job arrays: `cluster="local"` (processes on this machine) or "slurm"."""

    cluster: str
    tasks: int = 4
    retries: int = 1
    timeout_min: int = 24 * 60
    slurm: dict[str, Any] = field(default_factory=dict)  # partition, cpus_per_task, mem_gb, array_parallelism, additional
    progress: bool = True
    poll_s: float = 0.5
    resumable: bool = True
    log: list[StageLog] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cluster

    @property
    def threads_per_task(self) -> int:
        """Encoding threads per task: its share of this machine's cores, or its SLURM cpus_per_task."""
        if self.cluster == "slurm":
            return int(self.slurm.get("cpus_per_task") or 1)
        return max(1, (os.cpu_count() or 1) // self.tasks)

    def run(self, stage: str, units: list[Unit], work: Path) -> None:
        start = time.perf_counter()
        ran = sum(not is_done(work, u) for u in units)
        for attempt in range(self.retries + 1):
            pending = [u for u in units if not is_done(work, u)]
            if not pending:
                break
            killed = self._attempt(stage, pending, work, attempt)
            if not killed:
                break
            if attempt == self.retries:
                raise UnitError(f"stage {stage}: tasks were killed {attempt + 1} times (retries={self.retries}):\n{killed}")
            self._say(f"stage {stage}: a task was killed; resubmitting its unfinished units\n{killed}", always=True)
        self.log.append(StageLog(stage, len(units), ran, time.perf_counter() - start))

    def _attempt(self, stage: str, pending: list[Unit], work: Path, attempt: int) -> str:
        """Submit one job array; '' when every task finished, else what submitit said about the killed ones."""
        shutil.rmtree(work / PREP / "errors" / stage, ignore_errors=True)
        groups = [pending[t :: self.tasks] for t in range(min(self.tasks, len(pending)))]
        executor = self._executor(work / PREP / "logs" / f"{stage}-{attempt}", stage)
        jobs = executor.map_array(run_units, groups, [str(work)] * len(groups))
        self._say(f"stage {stage}: {len(pending)} units in {len(jobs)} {self.cluster} tasks (job {jobs[0].job_id})")
        self._wait(jobs, stage)
        return self._failures(jobs, stage, work)

    def _executor(self, folder: Path, stage: str) -> Any:
        import submitit  # lazily: only these executors need it

        executor = submitit.AutoExecutor(folder=folder, cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.timeout_min, "name": f"llmkit-prepare-{stage}"}
        if self.cluster == "slurm":
            params |= _slurm_parameters(self.slurm)
        executor.update_parameters(**params)
        return executor

    def _wait(self, jobs: list[Any], stage: str) -> None:
        """Until every task has written its result or has left the machine (local) or the queue (SLURM) without one.

        SLURM is asked through squeue, not submitit's sacct polling: squeue answers on every cluster, also one
        without an accounting daemon, where sacct fails and submitit would wait forever for a killed task."""
        bar = tqdm(total=len(jobs), desc=stage, unit=" tasks", disable=not self.progress)
        pending = set(range(len(jobs)))
        gone: dict[int, float] = {}  # SLURM tasks no longer queued, since when (its result may still be on its way)
        last_asked = 0.0
        while pending:
            queued = None
            if self.cluster == "slurm" and time.monotonic() - last_asked > 3:
                queued, last_asked = _squeue(jobs[0].job_id.split("_")[0]), time.monotonic()
            for i in sorted(pending):
                if jobs[i].paths.result_pickle.exists() or self._ended(jobs[i], queued, gone, i):
                    pending.discard(i)
                    bar.update(1)
            time.sleep(self.poll_s)
        bar.close()

    def _ended(self, job: Any, queued: set[str] | None, gone: dict[int, float], i: int) -> bool:
        if self.cluster != "slurm":
            return job.done()  # the local task's process has exited
        if queued is not None and job.job_id not in queued:
            gone.setdefault(i, time.monotonic())
        return i in gone and time.monotonic() - gone[i] > RESULT_GRACE_S

    def _failures(self, jobs: list[Any], stage: str, work: Path) -> str:
        """Raises UnitError for a task a unit failed in; returns what to say about tasks killed from outside."""
        from submitit.core.utils import FailedJobError

        killed = []
        for job in jobs:
            if not job.paths.result_pickle.exists():
                killed.append(f"task {job.job_id} ended without a result (log: {job.paths.stderr})")
                continue
            error = job.exception()
            if isinstance(error, FailedJobError):
                messages = recorded_errors(work, stage) or [str(error)]
                raise UnitError("\n".join(messages) + f"\n(task log: {job.paths.stderr})") from error
        return "\n".join(killed)

    def _say(self, message: str, always: bool = False) -> None:
        if self.progress or always:
            print(message, file=sys.stderr, flush=True)


RESULT_GRACE_S = 10  # a SLURM task out of the queue without a result file: wait this long for a slow filesystem


def _squeue(array_id: str) -> set[str]:
    """The ids ("123_4") of the array's tasks SLURM still has queued or running."""
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", array_id], capture_output=True, text=True)
    if out.returncode != 0 and "Invalid job id" not in out.stderr:  # unknown: every task has left the queue
        raise UnitError(f"squeue failed: {out.stderr.strip()}")
    return set(out.stdout.split())


SLURM_KEYS = {"partition": "slurm_partition", "cpus_per_task": "cpus_per_task", "mem_gb": "mem_gb",
              "array_parallelism": "slurm_array_parallelism", "additional": "slurm_additional_parameters"}


def _slurm_parameters(slurm: dict[str, Any]) -> dict[str, Any]:
    """submitit's names for llmkit's `slurm.*` keys; unset (null or empty) ones are left to SLURM's defaults."""
    unknown = set(slurm) - set(SLURM_KEYS)
    if unknown:
        raise ValueError(f"unknown slurm settings {sorted(unknown)}; valid: {', '.join(SLURM_KEYS)}")
    params = {SLURM_KEYS[k]: v for k, v in slurm.items() if v not in (None, {}, "")}
    if "slurm_additional_parameters" in params:
        params["slurm_additional_parameters"] = dict(params["slurm_additional_parameters"])
    return {"cpus_per_task": 1} | params


def make_executor(
    executor: str = "none", tasks: int = 4, retries: int = 1, timeout_min: int = 24 * 60,
    slurm: dict[str, Any] | None = None, progress: bool = True,
) -> Executor:
    """The executor named by `llmkit prepare executor=...`."""
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor '{executor}'; valid: {', '.join(EXECUTORS)}")
    if tasks < 1 or retries < 0:
        raise ValueError(f"tasks must be >= 1 and retries >= 0, got tasks={tasks}, retries={retries}")
    if executor == "none":
        return InProcess(progress)
    return Submitit(executor, tasks, retries, timeout_min, dict(slurm or {}), progress)
