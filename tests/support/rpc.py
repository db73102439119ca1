"""RPC workers and `ggsteer` commands as processes, for the RPC tests (tests/test_rpc*.py)."""

from __future__ import annotations

import sys

from ggsteer.runtime.rpc import free_port, start_local_worker

CLI = [sys.executable, "-c", "import sys; from ggsteer.cli.main import main; sys.exit(main(sys.argv[1:]))"]


def stop(process) -> None:
    """Kill a process (a worker, a client) unless it has ended, and reap it."""
    if process.returncode is None:
        process.kill()
        process.communicate()


def start_workers(count: int = 2) -> tuple[list[int], list]:
    """`count` local `ggsteer rpc-server` processes on free loopback ports: (ports, processes)."""
    ports = [free_port() for _ in range(count)]
    processes = []
    try:
        for port in ports:
            processes.append(start_local_worker(port))
    except BaseException:
        for process in processes:
            stop(process)
        raise
    return ports, processes
