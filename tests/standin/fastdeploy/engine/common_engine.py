"""The engine process: receive thread, scheduler thread, token processor thread (roles mixed, prefill, decode).

Run as ``python -m fastdeploy.engine.common_engine --connect HOST:PORT --role ROLE`` (subprocess) or
through ``run_engine`` (multiprocessing).  Tasks and results travel over one
multiprocessing.connection to the API server.
"""

from __future__ import annotations

import argparse
import queue
import threading
import time
from multiprocessing.connection import Client

from fastdeploy.engine.request import Request
from fastdeploy.metrics import trace as tracing
from fastdeploy.output.token_processor import TokenProcessor
from fastdeploy.trace import trace_logger
from fastdeploy.trace.constants import LoggingEventName
from fastdeploy.trace.trace_logger import print as trace_print

AUTHKEY = b"fastdeploy-standin"


class EngineService:
    def __init__(self, conn, role: str) -> None:
        self.conn = conn
        self.role = role
        self.send_lock = threading.Lock()
        self.scheduler: queue.Queue = queue.Queue()
        self.worker: queue.Queue = queue.Queue()
        self.token_processor = TokenProcessor(self)

    def send(self, message: dict) -> None:
        with self.send_lock:
            self.conn.send(message)

    def _insert_zmq_task_to_scheduler(self) -> None:
        tracing.trace_set_thread_info("Insert Task to Scheduler")
        while True:
            try:
                data = self.conn.recv()
            except EOFError:
                self.scheduler.put(None)
                return
            if data is None:
                self.scheduler.put(None)
                return
            task = Request.from_dict(data)
            task.metrics["scheduler_recv_req_time"] = time.time()
            if self.role != "decode":  # a decode instance gets its requests from the prefill instance
                trace_logger.print(LoggingEventName.PREPROCESSING_END, task.request_id, task.user)  # module attribute style
            trace_print(LoggingEventName.REQUEST_SCHEDULE_START, task.request_id, task.user)
            trace_print(LoggingEventName.REQUEST_QUEUE_START, task.request_id, task.user)
            self.scheduler.put(task)

    def _schedule_request_to_worker_v1(self) -> None:
        tracing.trace_set_thread_info("Scheduler Task to Work")
        while True:
            task = self.scheduler.get()
            if task is None:
                self.worker.put(None)
                return
            trace_print(LoggingEventName.REQUEST_QUEUE_END, task.request_id, task.user)
            if self.role == "prefill":
                trace_print(LoggingEventName.ASK_DECODE_RESOURCE_START, task.request_id, task.user)
                trace_print(LoggingEventName.ASK_DECODE_RESOURCE_END, task.request_id, task.user)
            trace_print(LoggingEventName.RESOURCE_ALLOCATE_START, task.request_id, task.user)
            if self.role == "decode":
                trace_print(LoggingEventName.DECODE_PROCESS_PREALLOCATE_REQUEST_START, task.request_id, task.user)
                trace_print(LoggingEventName.DECODE_PROCESS_PREALLOCAT_REQUEST_END, task.request_id, task.user)
            trace_print(LoggingEventName.CACHE_MISS, task.request_id, task.user)
            trace_print(LoggingEventName.RESOURCE_ALLOCATE_END, task.request_id, task.user)
            trace_print(LoggingEventName.REQUEST_SCHEDULE_END, task.request_id, task.user)
            self.insert_tasks([task])
            task.metrics["inference_start_time"] = time.time()
            trace_print(LoggingEventName.INFERENCE_START, task.request_id, task.user)
            self.worker.put(task)

    def insert_tasks(self, tasks) -> None:
        for task in tasks:
            rid = task.request_id.split("_")[0]
            if task.trace_carrier:
                tracing.trace_set_proc_propagate_context(rid, task.trace_carrier)
                task.trace_carrier = tracing.trace_get_proc_propagate_context(rid)
            tracing.trace_report_span(tracing.TraceSpanName.SCHEDULE, rid,
                                      int(task.metrics["scheduler_recv_req_time"] * 1e9), time.time_ns(),
                                      thread_finish_flag=True)

    def run(self) -> None:
        tracing.process_tracing_init()
        threads = [threading.Thread(target=self._insert_zmq_task_to_scheduler, daemon=True),
                   threading.Thread(target=self._schedule_request_to_worker_v1, daemon=True),
                   threading.Thread(target=self.token_processor.process_sampling_results, daemon=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def run_engine(address: tuple[str, int], role: str) -> None:
    """The engine process's entry point (multiprocessing target)."""
    conn = Client(address, authkey=AUTHKEY)
    try:
        EngineService(conn, role).run()
    finally:
        conn.close()


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--connect", required=True)
    p.add_argument("--role", default="mixed")
    args = p.parse_args(argv)
    host, port = args.connect.rsplit(":", 1)
    run_engine((host, int(port)), args.role)


if __name__ == "__main__":
    main()
