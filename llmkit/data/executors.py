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

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tqdm.auto import tqdm

from llmkit.data.tasks import PREP, Unit, UnitError, is_done, recorded_errors, run_unit, run_units

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
    log: list[StageLog]

    def run(self, stage: str, units: list[Unit], work: Path) -> None: ...


@dataclass
class InProcess:
    """Every unit in this process, one after another: `prepare()` without an engine (and LMDataModule's path)."""

    progress: bool = True
    name: str = "none"
    tasks: int = 1
    resumable: bool = False
    log: list[StageLog] = field(default_factory=list)

    def run(self, stage: str, units: list[Unit], work: Path) -> None:
        start = time.perf_counter()
        pending = [u for u in units if not is_done(work, u)]
        for unit in tqdm(pending, desc=stage, unit=" units", disable=not self.progress or len(pending) < 2):
            run_unit(unit, work)
        self.log.append(StageLog(stage, len(units), len(pending), time.perf_counter() - start))


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
            self._say(f"stage {stage}: a task was killed; resubmitting its unfinished units\n{killed.splitlines()[0]}")
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
        slurm = dict(self.slurm)
        params: dict[str, Any] = {"timeout_min": self.timeout_min, "name": f"llmkit-prepare-{stage}"}
        if self.cluster == "slurm":
            params |= {"cpus_per_task": slurm.pop("cpus_per_task", 1), "slurm_array_parallelism": slurm.pop("array_parallelism", 256)}
            if slurm.get("mem_gb") is not None:
                params["mem_gb"] = slurm.pop("mem_gb")
            if slurm.get("partition"):
                params["slurm_partition"] = slurm.pop("partition")
            if slurm.get("additional"):
                params["slurm_additional_parameters"] = dict(slurm.pop("additional"))
        executor.update_parameters(**params)
        return executor

    def _wait(self, jobs: list[Any], stage: str) -> None:
        """Until every job is done; the cluster's own state is asked every 5 s (submitit caches it otherwise)."""
        bar = tqdm(total=len(jobs), desc=stage, unit=" tasks", disable=not self.progress)
        done: set[int] = set()
        last_forced = time.monotonic()
        while len(done) < len(jobs):
            force = time.monotonic() - last_forced > 5
            last_forced = time.monotonic() if force else last_forced
            for i, job in enumerate(jobs):
                if i not in done and job.done(force_check=force):
                    done.add(i)
                    bar.update(1)
            time.sleep(self.poll_s)
        bar.close()

    def _failures(self, jobs: list[Any], stage: str, work: Path) -> str:
        import submitit

        killed = []
        for job in jobs:
            job._results_timeout_s = 2  # a killed task never writes a result: do not wait 15 s for one
            error = job.exception()
            if isinstance(error, submitit.core.utils.FailedJobError):
                messages = recorded_errors(work, stage) or [str(error)]
                raise UnitError("\n".join(messages) + f"\n(task logs: {job.paths.stderr})") from error
            if error is not None:
                killed.append(str(error).splitlines()[0])
        return "\n".join(killed)

    def _say(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)


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
