"""`ggsteer serve --rpc`: a parent process that keeps the port answering while the server cannot run.

A model on RPC workers cannot outlive a lost worker inside its process (llama.cpp's RPC backend
aborts on any failed socket, even when freeing the model). So the server runs as a child process
that ends with EXIT_WORKER_LOST after answering its clients (503 naming the worker), and this
supervisor, which owns the listening socket and hands it to each child, then answers every request
with 503 naming the lost worker, probes the workers every PROBE_INTERVAL_S and starts a fresh child
once all of them answer. Any other exit status of the child ends the supervisor with that status
(no restart loops on a bug); SIGINT and SIGTERM stop the child cleanly, then the supervisor.

The child gets its arguments (pickled, length-prefixed) on a pipe whose write end the supervisor
keeps open: end of file there means the supervisor is gone, and the child shuts down.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ggsteer.runtime.rpc import EXIT_WORKER_LOST, workers_answer

CHILD_ENV = "GGSTEER_SERVE_CHILD"  # "listen_fd,status_fd,lifeline_fd,restart" in a supervised server
PROBE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 1.0
STOP_TIMEOUT_S = 30.0  # a child asked to stop gets this long before it is killed
READ_TIMEOUT_S = 5.0  # a client of the 503 responder that does not send its request in time is dropped
MAX_HEAD_BYTES = 65536
MAX_BODY_BYTES = 1 << 20
READY = "ready"


# -- the 503 responder --------------------------------------------------------------------------


def unavailable_response(path: str, message: str) -> bytes:
    """A whole HTTP/1.1 503 reply in OpenAI's error shape (/health: status "unavailable" as well)."""
    error = {"message": message, "type": "server_error", "param": None, "code": 503}
    body = {"status": "unavailable", "error": error} if path.split("?")[0] == "/health" else {"error": error}
    data = json.dumps(body).encode()
    head = ("HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + data


def read_request(conn: socket.socket) -> str | None:
    """The request's path, once its head and (Content-Length) body have been read; None if it never came.

    The body is read before answering: closing a socket with unread data resets the connection,
    and the client would see the reset instead of the reply."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk or len(data) > MAX_HEAD_BYTES:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length" and value.strip().isdigit():
            length = int(value.strip())
    remaining = min(length, MAX_BODY_BYTES) - len(body)
    while remaining > 0:
        chunk = conn.recv(min(remaining, 65536))
        if not chunk:
            break
        remaining -= len(chunk)
    return parts[1] if len(parts) >= 2 else "/"


def answer_unavailable(conn: socket.socket, message: str) -> None:
    """Read one request from `conn`, answer 503 with `message`, close (run on a thread of its own)."""
    try:
        conn.settimeout(READ_TIMEOUT_S)
        path = read_request(conn)
        if path is not None:
            conn.sendall(unavailable_response(path, message))
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(0.5)
            while conn.recv(65536):  # until the client closes, so the reply is not reset
                pass
    except OSError:
        pass
    finally:
        conn.close()


def accept_and_answer(listener: socket.socket, message: str) -> None:
    try:
        conn, _ = listener.accept()
    except (BlockingIOError, InterruptedError):  # the child took it
        return
    threading.Thread(target=answer_unavailable, args=(conn, message), name="ggsteer-503", daemon=True).start()


# -- the child's side ----------------------------------------------------------------------------


@dataclass
class ChildChannel:
    """What a supervised server gets from its supervisor: the socket, a status pipe, a lifeline."""

    listen_fd: int
    status_fd: int
    lifeline_fd: int
    restart: bool

    @classmethod
    def from_environment(cls) -> ChildChannel | None:
        value = os.environ.pop(CHILD_ENV, None)
        if value is None:
            return None
        listen_fd, status_fd, lifeline_fd, restart = (int(part) for part in value.split(","))
        return cls(listen_fd, status_fd, lifeline_fd, bool(restart))

    def read_payload(self) -> bytes:
        (size,) = struct.unpack("<Q", self._read_exactly(8))
        return self._read_exactly(size)

    def _read_exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = os.read(self.lifeline_fd, size - len(data))
            if not chunk:
                raise RuntimeError("the supervisor closed the pipe before sending the server's arguments")
            data += chunk
        return data

    def listener(self) -> socket.socket:
        return socket.socket(fileno=self.listen_fd)

    def ready(self) -> None:
        os.write(self.status_fd, f"{READY}\n".encode())

    def when_parent_gone(self, callback) -> None:
        """Call `callback()` (on a thread) once the supervisor has gone away."""

        def wait() -> None:
            while os.read(self.lifeline_fd, 4096):
                pass
            callback()

        threading.Thread(target=wait, name="ggsteer-lifeline", daemon=True).start()


# -- the supervisor ------------------------------------------------------------------------------


class Child:
    """One server process and the supervisor's ends of its pipes."""

    def __init__(self, code: str, payload: bytes, listener: socket.socket, restart: bool):
        status_read, status_write = os.pipe()
        lifeline_read, self.lifeline = os.pipe()
        fds = (listener.fileno(), status_write, lifeline_read)
        env = {**os.environ, CHILD_ENV: ",".join(str(fd) for fd in fds) + f",{int(restart)}"}
        # a session of its own: a Ctrl-C in the terminal reaches the supervisor alone, which stops the child once
        self.process = subprocess.Popen([sys.executable, "-c", code], pass_fds=fds, env=env, start_new_session=True)
        os.close(status_write)
        os.close(lifeline_read)
        self.status: int | None = status_read
        self.ready = False
        self.lost_line: str | None = None
        self._pending = b""
        os.write(self.lifeline, struct.pack("<Q", len(payload)) + payload)

    def read_status(self) -> None:
        chunk = os.read(self.status, 4096)
        if not chunk:
            os.close(self.status)
            self.status = None
            return
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace").strip()
            if text == READY:
                self.ready = True
            elif text:
                self.lost_line = text  # written by the C handler: "RPC worker H:P stopped answering (...)"

    def close(self) -> None:
        while self.status is not None:  # what it wrote just before exiting
            self.read_status()
        os.close(self.lifeline)


class Supervisor:
    """Runs the server as a child, answers 503 while none can serve, restarts it when the workers answer."""

    def __init__(self, listener: socket.socket, endpoints: Sequence[str], child_code: str, payload: bytes,
                 log=None):
        self.listener = listener
        self.endpoints = list(endpoints)
        self.child_code = child_code
        self.payload = payload
        self.log = log or (lambda text: print(f"ggsteer serve: {text}", file=sys.stderr, flush=True))
        self.signal: int | None = None

    def run(self) -> int:
        """The first child's status if it never served, else the last child's when it was not a lost worker."""
        self.listener.setblocking(False)  # the child takes connections from the same socket
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._raise_signal()

    def _loop(self) -> int:
        message, restart = None, False
        while True:
            child = Child(self.child_code, self.payload, self.listener, restart)
            status = self._watch(child, message)
            if self.signal is not None:
                return 0
            if status != EXIT_WORKER_LOST or not (child.ready or restart):
                return status
            lost = child.lost_line or f"an RPC worker ({', '.join(self.endpoints)}) stopped answering"
            message = f"{lost}; the server starts again once every worker answers: retry shortly"
            self.log(f"{lost}; answering 503 until every worker answers again")
            if not self._wait_for_workers(message):
                return 0
            self.log("every RPC worker answers: starting the server again")
            message = f"the server is loading the model again after this: {lost}; retry shortly"
            restart = True

    def _watch(self, child: Child, message: str | None) -> int:
        """Until the child exits: its status lines, and 503 replies with `message` until it is ready."""
        stopping_since = None
        try:
            while True:
                if self.signal is not None and stopping_since is None:
                    stopping_since = time.monotonic()
                    child.process.terminate()  # uvicorn stops cleanly; the supervisor alone reports a Ctrl-C
                if stopping_since is not None and time.monotonic() - stopping_since > STOP_TIMEOUT_S:
                    child.process.kill()
                watched = [child.status] if child.status is not None else []
                answering = message is not None and not child.ready and stopping_since is None
                readable = self._select(watched + ([self.listener] if answering else []))
                if child.status is not None and child.status in readable:
                    child.read_status()
                if self.listener in readable and not child.ready:
                    accept_and_answer(self.listener, message)
                if child.process.poll() is not None:
                    return child.process.returncode
        finally:
            child.close()

    def _wait_for_workers(self, message: str) -> bool:
        """Answer 503 with `message` until every worker answers the hello (True) or a signal came (False)."""
        next_probe = time.monotonic() + PROBE_INTERVAL_S
        while self.signal is None:
            if self.listener in self._select([self.listener]):
                accept_and_answer(self.listener, message)
            if time.monotonic() >= next_probe:
                if workers_answer(self.endpoints, timeout=PROBE_TIMEOUT_S):
                    return True
                next_probe = time.monotonic() + PROBE_INTERVAL_S
        return False

    @staticmethod
    def _select(fds: list, timeout: float = 0.1) -> list:
        if not fds:
            time.sleep(timeout)
            return []
        return select.select(fds, [], [], timeout)[0]

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.signal = signum

    def _raise_signal(self) -> None:
        """After a clean stop, end as the server alone would have: KeyboardInterrupt, or death by SIGTERM."""
        if self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is not None:
            with contextlib.suppress(OSError):
                sys.stderr.flush()
            signal.raise_signal(self.signal)
