"""What the benchmark scripts share: child processes on free loopback ports, readings from /proc, percentiles."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def proc_status(pid: int) -> tuple[float, float]:
    """(resident MiB, CPU seconds used so far) of a live process, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return kib / 1024, (int(fields[11]) + int(fields[12])) / CLOCK_TICK


class Child:
    """A child process on its own port; output goes to a log file in the temp folder."""

    def __init__(self, name: str, args: list[str], port: int, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.name, self.port, self.log = name, port, tmp / f"{name}.log"
        with self.log.open("wb") as out:
            full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=full_env)

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> Child:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not open port {self.port} in {timeout_s:g}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _all_cpus() -> list[int]:
    """/proc/stat's first line, in clock ticks since boot: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return list(map(int, f.readline().split()[1:9]))


def machine_busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat, all CPUs)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = _all_cpus()
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICK


def stolen_s() -> float:
    """CPU seconds the hypervisor took from this VM since boot, all CPUs (/proc/stat). On a shared VM it moves
    every target's latency more than a build does: a phase is read beside the steal during it."""
    return _all_cpus()[7] / CLOCK_TICK


def our_cpu_s(pids: dict[str, int]) -> float:
    """CPU seconds of this script and the given children so far."""
    return sum(os.times()[:2]) + sum(proc_status(pid)[1] for pid in pids.values())


def loop_factory() -> Any:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def no_nan(value: Any) -> Any:
    """NaN (a run with no successes) is not JSON; print null instead."""
    if isinstance(value, dict):
        return {k: no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [no_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, in ms."""
    if not values:
        return math.nan
    return sorted(values)[max(0, math.ceil(q * len(values)) - 1)] * 1000
