"""Runs started from the page: one ``fuse run`` child process at a time, its log kept for the page, a stop.

The child's arguments are the overrides the core has just validated (registered names and
typed ``key=value`` fields), passed as an argument list: no shell is ever involved.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from fusion_core import FuseError

MAX_LINES = 5000
STOP_GRACE_S = 10.0


class Runner:
    """The current (or last) run: its command, its output lines, its exit status."""

    def __init__(self, cwd: str | None = None) -> None:
        self.cwd = cwd
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.command: list[str] = []
        self.started = 0.0
        self.finished: float | None = None
        self.stopped = False

    def start(self, overrides: Sequence[str]) -> dict:
        with self.lock:
            if self.proc is not None and self.proc.poll() is None:
                raise FuseError("a run is already going; stop it first")
            self.command = ["fuse", "run", *overrides]
            argv = [sys.executable, "-m", "fusion_core", "run", *overrides]
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         text=True, encoding="utf-8", errors="replace", bufsize=1, cwd=self.cwd, env=env,
                                         start_new_session=True)
            self.lines, self.started, self.finished, self.stopped = [], time.time(), None, False
            threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()
        return self.status()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            with self.lock:
                if len(self.lines) < MAX_LINES:
                    self.lines.append(line.rstrip("\n"))
        proc.wait()
        with self.lock:
            self.finished = time.time()

    def stop(self) -> dict:
        """SIGTERM to the run's process group (the run removes its partial output), SIGKILL after a grace period."""
        with self.lock:
            proc = self.proc
            if proc is None or proc.poll() is not None:
                raise FuseError("no run is going")
            self.stopped = True
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        return self.status()

    def status(self, since: int = 0) -> dict:
        with self.lock:
            proc = self.proc
            rc = None if proc is None else proc.poll()
            running = proc is not None and rc is None
            state = ("idle" if proc is None else "running" if running else "stopped" if self.stopped
                     else "finished" if rc == 0 else "failed")
            end = self.finished or time.time()
            return {"state": state, "command": " ".join(self.command), "returncode": rc,
                    "seconds": round(end - self.started, 1) if proc is not None else None,
                    "lines": self.lines[since:], "next": len(self.lines)}

    def shutdown(self) -> None:
        with self.lock:
            proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=STOP_GRACE_S)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
