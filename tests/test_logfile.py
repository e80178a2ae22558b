"""trace.log and error.log on real disks: midnight with several processes (clock moved by libfaketime),
pruning, a full filesystem and a read-only one (tiny tmpfs mounts)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import pytest

import fastdeploy_otel as fdt
from fastdeploy_otel._errorlog import CONTINUATION
from fastdeploy_otel._logfile import DatedFile
from fastdeploy_otel.events import LoggingEventName as E
from fastdeploy_otel.mirror import parse_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _need(ok: bool, what: str) -> None:
    """Skip on a developer's machine without `what`; in CI (.ci/run installs it) that is a failure."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is missing in CI; .ci/run should provide it")
        pytest.skip(f"{what} not available here")


WRITER = textwrap.dedent("""
    import select, sys, time
    import fastdeploy_otel as fdt
    log_dir, seconds = sys.argv[1], float(sys.argv[2])
    fdt.configure(env={}, mode="local", log_dir=log_dir, flush_interval_s=0.05)
    n = errors = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        fdt.trace_print("PREPROCESSING_START", f"p{sys.argv[3]}-{n}", "u")
        n += 1
        if n % 50 == 0:
            fdt.record_error(f"p{sys.argv[3]}-{n}", "midnight")
            errors += 1
        select.select([], [], [], 0.002)  # time.sleep trips over libfaketime; Event.wait and select do not
    fdt.shutdown()
    print(n, errors)
""")


def test_midnight_with_two_processes_on_one_log_dir_loses_no_line(tmp_path):
    _need(shutil.which("faketime") is not None, "faketime (Debian package faketime)")
    log_dir = tmp_path / "log"
    env = {**os.environ, "TZ": "UTC", "FAKETIME_DONT_FAKE_MONOTONIC": "1", "PYTHONPATH": ROOT}
    procs = [
        subprocess.Popen(
            ["faketime", "-f", "@2026-12-01 23:59:58", sys.executable, "-c", WRITER, str(log_dir), "4", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(3)
    ]
    counts = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        counts.append(tuple(map(int, out.split())))
    files = sorted(os.listdir(log_dir))
    assert "trace.log.2026-12-01" in files and "trace.log.2026-12-02" in files, files
    assert os.readlink(log_dir / "trace.log") == "trace.log.2026-12-02"
    assert os.readlink(log_dir / "error.log") == "error.log.2026-12-02"
    lines = []
    for day in ("2026-12-01", "2026-12-02"):
        with open(log_dir / f"trace.log.{day}", encoding="utf-8") as f:
            day_lines = f.read().splitlines()
        assert day_lines, day  # both days got lines
        for line in day_lines:
            parsed = parse_line(line)
            assert parsed is not None, line
            # A file is chosen when a batch is written, as FastDeploy's handler does at emit time: the
            # last flush interval before midnight may land in the new day's file.
            assert parsed["asctime"].startswith(day) or parsed["asctime"] >= "2026-12-01 23:59:59", line
            lines.append(parsed)
    for i, (n, _) in enumerate(counts):
        assert len([x for x in lines if x["request_id"].startswith(f"p{i}-")]) == n
    heads = []
    for day in ("2026-12-01", "2026-12-02"):
        path = log_dir / f"error.log.{day}"
        if path.exists():
            heads += [x for x in path.read_text().splitlines() if not x.startswith(CONTINUATION)]
    assert len(heads) == sum(e for _, e in counts)


def test_old_days_are_pruned_idempotently_by_every_process(tmp_path):
    for day in ("2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"):
        (tmp_path / f"trace.log.{day}").write_text("old\n")
    (tmp_path / "trace.log.notadate").write_text("kept\n")
    a, b = DatedFile(str(tmp_path / "trace.log"), backup_count=2), DatedFile(str(tmp_path / "trace.log"), backup_count=2)
    assert a.write("one\n", 1) == 1 and b.write("two\n", 1) == 1
    names = sorted(os.listdir(tmp_path))
    dated = [n for n in names if n.startswith("trace.log.20")]
    assert len(dated) == 3 and "trace.log.2026-11-01" not in names and "trace.log.notadate" in names
    with open(tmp_path / "trace.log") as f:
        assert f.read() == "one\ntwo\n"  # two writers, one file, appended in order
    a.close()
    b.close()


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs; yields its path; unmounted afterwards."""
    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    _need(ok, "mounting a tmpfs (root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path) -> str:
    filler = os.path.join(path, "filler")
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError:
            pass
    return filler


def test_full_disk_counts_what_was_written_says_so_on_stderr_once_and_recovers(tiny_fs, capfd):
    log_dir = str(tiny_fs / "log")
    fdt.configure(env={}, mode="local", log_dir=log_dir, flush_interval_s=60)
    fdt.trace_print(E.PREPROCESSING_START, "before-full", "u")
    fdt.flush()
    filler = _fill(tiny_fs)
    for i in range(200):
        fdt.trace_print(E.PREPROCESSING_START, f"while-full-{i}", "u")
        if i % 20 == 0:
            fdt.flush()
    fdt.flush()
    st = fdt.stats()
    assert st["mirror_lines_failed"] > 0
    os.unlink(filler)
    fdt.trace_print(E.PREPROCESSING_START, "after-full", "u")
    fdt.flush()
    st = fdt.shutdown()
    err = capfd.readouterr().err
    assert err.count("trace.log failed") == 1 and err.count("trace.log recovered") == 1, err
    with open(os.path.join(log_dir, "trace.log"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    parsed = [parse_line(x) for x in lines if x]
    whole = [p for p in parsed if p is not None and "span_id" in p]  # a cut line may parse, but lacks its end
    assert len(parsed) - len(whole) <= 1  # at most the one line the disk cut short
    assert st["mirror_lines"] == len(whole)  # stats() counts what reached the file, nothing more
    assert st["mirror_lines"] + st["mirror_lines_failed"] == 202
    assert whole[-1]["request_id"] == "after-full"  # writing goes on, on a line of its own


def test_read_only_log_dir_never_stops_the_process(tiny_fs, capfd, receiver):
    receiver.store.clear()
    log_dir = tiny_fs / "log"
    log_dir.mkdir()
    assert subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], capture_output=True).returncode == 0
    fdt.configure(env={}, mode="all", log_dir=str(log_dir), endpoint=receiver.grpc_endpoint)
    fdt.trace_print(E.PREPROCESSING_START, "ro", "u")
    fdt.record_error("ro", ValueError("still traced"))
    fdt.finish_request("ro")
    assert fdt.flush(timeout=5)
    st = fdt.shutdown()
    err = capfd.readouterr().err
    assert err.count("trace.log failed") == 1 and err.count("error.log failed") == 1, err
    assert st["mirror_lines_failed"] == 1 and st["error_log_lines_failed"] >= 2
    spans = receiver.store.wait_for(lambda s: any(x.is_error for x in s))
    assert {s.attributes["fastdeploy.request_id"] for s in spans} == {"ro"}
