"""llama.cpp's RPC backend: workers on other machines hold a model's layers.

A worker runs `ggsteer rpc-server` (ggml's `ggml_backend_rpc_start_server`); the main host
registers each worker with `ggml_backend_rpc_add_server` and hands the workers' devices to
`llama_model_params.devices`. Registration stays out of ggml's global registry, so models loaded
without `rpc_servers` in the same process never see the workers.

Faults: ggml-rpc aborts the process when a socket fails (GGML_ABORT on a failed send or recv).
Before loading, every worker is checked (connect and protocol hello, with a timeout), so a worker
that is down gives an `RpcWorkerError` naming it. A worker lost later, mid-decode, cannot be
survived inside the process: ggsteer's abort handler prints which worker stopped answering and
ends the process with `EXIT_WORKER_LOST` instead of a core-dumping abort. A server first hears of it
(`on_lost_worker`), answers its clients and ends itself; its supervisor (serve/supervisor.py)
starts it again once the worker is back.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import socket
import struct
import sys
import threading
import time
import weakref
from collections.abc import Sequence

from ggsteer.runtime.ggml_libs import declare, ggml_base, ggml_registry, library_dir, library_path
from ggsteer.runtime.native import native

# the wire protocol this llama.cpp build speaks (ggml-rpc.h) and its hello message (ggml-rpc.cpp)
RPC_PROTO_MAJOR = 7
RPC_PROTO_MINOR = 0
RPC_CMD_HELLO = 14
CONN_CAPS_SIZE = 24
CHECK_TIMEOUT_S = 5.0
DEFAULT_PORT = 50052
EXIT_WORKER_LOST = 75  # EX_TEMPFAIL: try again once the worker is back
DEVICE_TYPE_CPU = 0  # enum ggml_backend_dev_type
DEVICE_TYPE_ACCEL = 3

SECURITY_NOTE = (
    "the RPC protocol has no authentication or encryption: anyone who can reach the port can run "
    "computations and read memory on this machine. Serve only on a trusted network."
)


class RpcWorkerError(RuntimeError):
    """A worker that cannot be used, named by its endpoint."""

    def __init__(self, endpoint: str, reason: str):
        super().__init__(f"RPC worker {endpoint}: {reason}")
        self.endpoint = endpoint


def parse_endpoint(text: str) -> tuple[str, int]:
    """`host:port` -> (host, port), or a ValueError naming the text."""
    host, sep, port_text = str(text).strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad RPC endpoint {text!r}: expected HOST:PORT with a port between 1 and 65535")
    return host, int(port_text)


def parse_endpoints(servers: str | Sequence[str]) -> list[str]:
    """Endpoints from a list or a comma-separated string, checked and without duplicates."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    endpoints = []
    for item in items:
        host, port = parse_endpoint(item)
        endpoint = f"{host}:{port}"
        if endpoint in endpoints:
            raise ValueError(f"RPC endpoint {endpoint} is listed twice")
        endpoints.append(endpoint)
    if not endpoints:
        raise ValueError("rpc_servers is empty: give at least one HOST:PORT")
    return endpoints


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection closed during the hello")
        data += chunk
    return data


def check_worker(endpoint: str, timeout: float = CHECK_TIMEOUT_S) -> tuple[int, int, int]:
    """Connect and exchange the protocol hello within `timeout` seconds; the worker's version.

    Raises RpcWorkerError naming the endpoint when nothing listens, the hello times out (a worker
    serves one client at a time: another host may be using it) or the versions differ.
    """
    host, port = parse_endpoint(endpoint)
    request = struct.pack("<BQ", RPC_CMD_HELLO, CONN_CAPS_SIZE) + bytes(CONN_CAPS_SIZE)
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(request)
            (size,) = struct.unpack("<Q", _recv_exactly(sock, 8))
            if size != 4 + CONN_CAPS_SIZE:
                raise RpcWorkerError(endpoint, f"answered the hello with {size} bytes: not a llama.cpp RPC server "
                                               "of this protocol version")
            major, minor, patch = _recv_exactly(sock, size)[:3]
    except TimeoutError:
        raise RpcWorkerError(endpoint, f"no answer within {timeout:g} s (is it busy serving another host?)") from None
    except OSError as error:
        raise RpcWorkerError(endpoint, f"cannot connect ({error.strerror or error}); is `ggsteer rpc-server` "
                                       "running there?") from None
    if major != RPC_PROTO_MAJOR or minor > RPC_PROTO_MINOR:
        raise RpcWorkerError(endpoint, f"speaks RPC protocol {major}.{minor}.{patch}, this build "
                                       f"{RPC_PROTO_MAJOR}.{RPC_PROTO_MINOR}: run the same llama.cpp version on both")
    return major, minor, patch


@functools.cache
def ggml_rpc() -> ctypes.CDLL:
    """libggml-rpc from the llama-cpp-python build ggsteer runs on, or a clear error."""
    path = library_path("libggml-rpc")
    if path is None:
        raise RuntimeError(f"llama-cpp-python was built without llama.cpp's RPC backend (no libggml-rpc in "
                           f"{library_dir()}): reinstall it with CMAKE_ARGS=\"-DGGML_RPC=ON\"")
    text, size = ctypes.c_char_p, ctypes.c_size_t
    return declare(ctypes.CDLL(str(path)), {
        "ggml_backend_rpc_add_server": (ctypes.c_void_p, [text]),
        "ggml_backend_rpc_start_server": (None, [text, text, size, size, ctypes.POINTER(ctypes.c_void_p)]),
    })


# -- the main host: workers' devices for a model -------------------------------------------------


def check_workers(endpoints: Sequence[str], timeout: float = CHECK_TIMEOUT_S) -> None:
    """`check_worker` on each endpoint in turn: the first that fails raises its RpcWorkerError."""
    for endpoint in endpoints:
        check_worker(endpoint, timeout=timeout)


def workers_answer(endpoints: Sequence[str], timeout: float = CHECK_TIMEOUT_S, say=None) -> bool:
    """Whether every worker answers the hello; `say(message)` hears why the first one did not."""
    try:
        check_workers(endpoints, timeout=timeout)
    except RpcWorkerError as error:
        if say is not None:
            say(str(error))
        return False
    return True


def worker_devices(endpoints: Sequence[str]) -> list[int]:
    """Every device of every worker, in the order given (checked first: a dead worker must not
    reach ggml-rpc, which would abort)."""
    rpc = ggml_rpc()
    check_workers(endpoints)
    devices = []
    for endpoint in endpoints:
        reg = rpc.ggml_backend_rpc_add_server(endpoint.encode())
        count = ggml_base().ggml_backend_reg_dev_count(reg) if reg else 0
        if count == 0:
            raise RpcWorkerError(endpoint, "offers no device")
        devices += [ggml_base().ggml_backend_reg_dev_get(reg, i) for i in range(count)]
    watch_workers(endpoints)
    return devices


def device_description(device: int) -> str:
    base = ggml_base()
    return f"{base.ggml_backend_dev_name(device).decode()} ({base.ggml_backend_dev_description(device).decode()})"


class WorkerPlacement:
    """The device list and layer count a model on RPC workers loads with (kept alive with the model)."""

    def __init__(self, rpc_servers: str | Sequence[str]):
        self.endpoints = parse_endpoints(rpc_servers)
        self.devices = worker_devices(self.endpoints)
        # NULL-terminated, as llama_model_params.devices wants it; no local device in the list
        self.array = (ctypes.c_void_p * (len(self.devices) + 1))(*self.devices, None)

    def apply(self, params) -> None:
        params.devices = ctypes.addressof(self.array)


class ModelParamsWithDevices:
    """Class attribute for a Llama subclass: `self.model_params = ...` inside Llama.__init__ gets
    the instance's `_worker_placement` device list before the model loads (Llama has no argument
    for it)."""

    def __get__(self, instance, owner=None):
        return self if instance is None else instance.__dict__["_model_params"]

    def __set__(self, instance, params) -> None:
        placement = instance.__dict__.get("_worker_placement")
        if placement is not None:
            placement.apply(params)
            _close_at_exit.add(instance)
        instance.__dict__["_model_params"] = params


# Models on workers are closed by atexit, before Python's finalization: freeing them talks to the
# workers, and a thread of ggml-rpc that logs through llama_cpp's Python log callback once
# finalization has begun is ended by Python, leaving the main thread waiting for it forever.
_close_at_exit: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_models_on_workers() -> None:
    for model in list(_close_at_exit):
        model.close()


def worker_llama_kwargs(llama_kwargs: dict) -> dict:
    """Every layer on the workers unless n_gpu_layers says otherwise (llama.cpp's default, 0, would
    leave every layer on this host's CPU)."""
    kwargs = dict(llama_kwargs)
    if kwargs.get("n_gpu_layers") in (None, 0):
        kwargs["n_gpu_layers"] = -1
    return kwargs


# -- a worker lost mid-run ----------------------------------------------------------------------


def watch_workers(endpoints: Sequence[str]) -> None:
    """Turn ggml-rpc's abort on a lost worker into one line naming it and exit status
    EXIT_WORKER_LOST (in C: the failing thread must not wait for Python's lock)."""
    native().watch_rpc_workers(list(endpoints), EXIT_WORKER_LOST)


def on_lost_worker(callback, also_fds: Sequence[int] = (), grace_s: float = 10.0) -> None:
    """For a server: a lost worker calls `callback(line)` ("RPC worker H:P stopped answering (...)")
    on a thread of its own instead of ending the process at once. The failing ggml thread stays
    parked and ends the process with EXIT_WORKER_LOST after `grace_s` if Python has not by then; the
    callback must end the process too (os._exit: freeing the model would talk to the lost worker).
    The C handler also writes the line to `also_fds` (a supervisor's pipe), Python or not."""
    read_fd, write_fd = os.pipe()
    native().watch_rpc_notify([write_fd, *also_fds], int(grace_s * 1000))
    threading.Thread(target=_wait_for_lost_worker, args=(read_fd, callback), name="ggsteer-rpc-alarm",
                     daemon=True).start()


def _wait_for_lost_worker(fd: int, callback) -> None:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 4096)  # blocks without Python's lock
        if not chunk:
            return
        data += chunk
    callback(data.decode(errors="replace").strip())


# -- a worker: serve this machine's devices --------------------------------------------------------


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    import ipaddress

    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def served_devices() -> list[int]:
    """This machine's accelerators (GPUs), or its CPU when it has none: what upstream's rpc-server serves."""
    reg = ggml_registry()
    devices = [reg.ggml_backend_dev_get(i) for i in range(reg.ggml_backend_dev_count())]
    accelerators = [d for d in devices if reg.ggml_backend_dev_type(d) not in (DEVICE_TYPE_CPU, DEVICE_TYPE_ACCEL)]
    if accelerators:
        return accelerators
    cpu = reg.ggml_backend_dev_by_type(DEVICE_TYPE_CPU)
    if not cpu:
        raise RuntimeError("ggml found no device to serve")
    return [cpu]


def serve_devices(host: str, port: int, threads: int, devices: Sequence[int], cache_dir: str | None = None) -> None:
    """Blocks forever serving `devices` on host:port (run it in a thread: the call never returns)."""
    array = (ctypes.c_void_p * len(devices))(*devices)
    endpoint = f"{host}:{port}".encode()
    ggml_rpc().ggml_backend_rpc_start_server(endpoint, cache_dir.encode() if cache_dir else None, threads,
                                             len(devices), array)


def end_worker_process(status: int = 0) -> None:
    """Ends a worker's process at once: ggml's serving loop never returns, and a client may be
    mid-request in it (no interpreter shutdown around a thread still inside ggml)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# -- workers on this machine (trying RPC out, tests, benchmarks) ------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_local_worker(port: int, threads: int = 1, timeout: float = 30.0):
    """A `ggsteer rpc-server` process on 127.0.0.1:port, returned once it answers the hello."""
    import subprocess

    command = [sys.executable, "-c", "import sys; from ggsteer.cli.main import main; sys.exit(main(sys.argv[1:]))",
               "rpc-server", "--port", str(port), "--threads", str(threads)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            check_worker(f"127.0.0.1:{port}", timeout=1.0)
            return process
        except RpcWorkerError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the RPC worker on port {port} did not start: {process.stderr.read()}") from None
            time.sleep(0.1)
