"""Start the whole stack (engine process + API server process) on free local ports.

    with Stack(trace_mode="all", log_dir="log", otlp_endpoint="http://127.0.0.1:4317") as stack:
        httpx.post(stack.base_url + "/v1/completions", json={...})

Each process configures tracing from its environment, as FastDeploy's do, and writes its own
trace.log under ``log_dir/<role>/`` (two processes must not rotate one file).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import httpx

EXAMPLES_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # minifd's parent

ROLES = ("api", "engine")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stack:
    trace_mode: str | None = None  # FD_TRACE for both processes; None: inherited from the environment
    log_dir: str = "log"
    otlp_endpoint: str | None = None  # None: OTEL_EXPORTER_OTLP_ENDPOINT as inherited, if any
    otlp_protocol: str | None = None
    json_dir: str | None = None  # write spans as OTLP JSON lines here (<role>.jsonl)
    port: int = 0
    host: str = "127.0.0.1"
    gpu_blocks: int = 48
    cpu_blocks: int = 96
    max_batch: int = 8
    fault_injection: bool = False  # the engine honours user="fault:<stage>" (MINIFD_FAULTS=1): demos and tests
    extra_env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 90.0
    # A command to run a role's process under, e.g. {"api": ["valgrind", "--tool=callgrind"]}: the bench
    # counts the API server's instructions in serving this way.
    launcher: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.base_url = ""

    def _env(self, role: str) -> dict[str, str]:
        """The operator's environment (OTEL_*, FD_*), plus what this stack was asked for."""
        env = dict(os.environ)
        env["FD_LOG_DIR"] = os.path.join(self.log_dir, role)
        env.setdefault("OTEL_SERVICE_NAME", "fastdeploy")
        extra = env.get("OTEL_RESOURCE_ATTRIBUTES", "")
        env["OTEL_RESOURCE_ATTRIBUTES"] = ",".join(filter(None, [extra, f"fastdeploy.role={role}"]))
        env["PYTHONUNBUFFERED"] = "1"
        # The processes run `python -m minifd.<role>`: minifd is importable from where this file lives.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [EXAMPLES_DIR, env.get("PYTHONPATH", "")]))
        if self.trace_mode:
            env["FD_TRACE"] = self.trace_mode
        if self.otlp_endpoint:
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp_endpoint
        if self.otlp_protocol:
            env["OTEL_EXPORTER_OTLP_PROTOCOL"] = self.otlp_protocol
        if not (env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
            env.setdefault("OTEL_TRACES_EXPORTER", "none")  # no collector given: do not dial localhost:4317
        if self.json_dir:
            env["FD_TRACE_JSON_FILE"] = os.path.join(self.json_dir, f"{role}.jsonl")
        elif env.get("FD_TRACE_JSON_FILE"):  # one file per process: two writers must not share one
            root, ext = os.path.splitext(env["FD_TRACE_JSON_FILE"])
            env["FD_TRACE_JSON_FILE"] = f"{root}.{role}{ext or '.jsonl'}"
        if self.fault_injection:
            env["MINIFD_FAULTS"] = "1"
        env.update(self.extra_env)
        return env

    def start(self) -> "Stack":
        tag = uuid.uuid4().hex[:8]
        self._ipc = [os.path.join(tempfile.gettempdir(), f"minifd-{tag}-{d}") for d in ("in", "out")]
        to_engine, from_engine = (f"ipc://{path}" for path in self._ipc)
        port = self.port or free_port()
        os.makedirs(self.log_dir, exist_ok=True)
        self.procs["api"] = subprocess.Popen(
            [*self.launcher.get("api", []), sys.executable, "-m", "minifd.server", "--host", self.host, "--port", str(port),
             "--engine-recv", to_engine, "--engine-send", from_engine],
            env=self._env("api"), stdout=open(os.path.join(self.log_dir, "api.out"), "ab"), stderr=subprocess.STDOUT,
        )
        self.start_engine()
        self.base_url = f"http://{'127.0.0.1' if self.host in ('0.0.0.0', '::') else self.host}:{port}"
        self._wait_healthy()
        return self

    def start_engine(self) -> None:
        """(Re)start the engine process; a new one connects to the running API server, which is healthy
        again at its first heartbeat (what a supervisor restarting only the engine would rely on)."""
        to_engine, from_engine = (f"ipc://{path}" for path in self._ipc)
        self.procs["engine"] = subprocess.Popen(
            [*self.launcher.get("engine", []), sys.executable, "-m", "minifd.engine", "--recv", to_engine, "--send", from_engine,
             "--gpu-blocks", str(self.gpu_blocks), "--cpu-blocks", str(self.cpu_blocks), "--max-batch", str(self.max_batch)],
            env=self._env("engine"), stdout=open(os.path.join(self.log_dir, "engine.out"), "ab"), stderr=subprocess.STDOUT,
        )

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            for role, proc in self.procs.items():
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"the {role} process exited with {proc.returncode}; see {self.log_dir}/{role}.out")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"the stack did not become healthy in {self.startup_timeout_s}s; see {self.log_dir}/*.out")

    def stop(self) -> None:
        """SIGTERM both processes; each flushes its spans and mirror lines before it exits."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for path in getattr(self, "_ipc", ()):  # the ZMQ ipc socket files
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> "Stack":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
