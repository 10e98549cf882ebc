"""Run a worker script under torchrun (the real launcher, `python -m torch.distributed.run`) on the CPU.

The distributed tests start N gloo processes on one machine with `--standalone` (a free rendezvous port each
time) and read back what the workers wrote under a folder of the test's. A worker that fails makes the whole
launch fail, and the test sees every rank's output in the error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class LaunchFailed(AssertionError):
    """torchrun exited non-zero; the message holds its output (every rank's)."""

    def __init__(self, returncode: int, output: str):
        super().__init__(f"torchrun exited with {returncode}:\n{output[-6000:]}")
        self.returncode = returncode
        self.output = output


def torchrun(
    nproc: int, script: str | Path, *args: str, timeout: float = 180, env: dict[str, str] | None = None, check=True
) -> subprocess.CompletedProcess[str]:
    """`torchrun --standalone --nproc-per-node nproc script args...` from the checkout's root, one thread per
    process (two cores: N processes with several threads each would oversubscribe them).

    check: raise `LaunchFailed` (with every rank's output) when torchrun exits non-zero.
    """
    full_env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TORCHELASTIC_ERROR_FILE": "",
        **(env or {}),
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    command += ["--max-restarts=0", "--tee=3", str(script), *args]
    run = subprocess.run(command, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout, check=False)
    if check and run.returncode != 0:
        raise LaunchFailed(run.returncode, run.stdout + run.stderr)
    return run
