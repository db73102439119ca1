"""`ggsteer rpc-server`: serve this machine's devices to a ggsteer (or llama.cpp) host over llama.cpp's RPC."""

from __future__ import annotations

import os
import signal
import sys
import threading

from ggsteer.cli.common import CliError
from ggsteer.runtime.rpc import (
    DEFAULT_PORT,
    SECURITY_NOTE,
    device_description,
    end_worker_process,
    is_loopback,
    serve_devices,
    served_devices,
)


def add_parser(sub) -> None:
    server = sub.add_parser("rpc-server", help="serve this machine's devices to a host using --rpc (llama.cpp RPC)")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    server.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    server.add_argument("--threads", type=int, default=None, help="CPU threads to compute with (default: all cores)")
    server.add_argument("--cache", default=None, metavar="DIR",
                        help="keep received weights in DIR, so a restarted host loads them from this disk")
    server.add_argument("--allow-network", action="store_true",
                        help="listen on a non-loopback address (the protocol has no authentication)")
    server.set_defaults(func=rpc_server_command)


def check_arguments(args) -> int:
    if not 1 <= args.port <= 65535:
        raise CliError(f"--port must be between 1 and 65535, got {args.port}")
    threads = args.threads or os.cpu_count() or 1
    if threads < 1:
        raise CliError(f"--threads must be at least 1, got {args.threads}")
    if not is_loopback(args.host) and not args.allow_network:
        raise CliError(f"--host {args.host} is not a loopback address, and {SECURITY_NOTE} "
                       "Pass --allow-network to serve on it anyway.")
    if args.cache is not None and not os.path.isdir(args.cache):
        raise CliError(f"--cache {args.cache}: no such folder")
    return threads


def rpc_server_command(args) -> int:
    threads = check_arguments(args)
    if not is_loopback(args.host):
        print(f"ggsteer: WARNING: listening on {args.host}: {SECURITY_NOTE}", file=sys.stderr)
    devices = served_devices()
    stop = threading.Event()
    ended: list[str] = []

    def serve() -> None:
        try:
            serve_devices(args.host, args.port, threads, devices, args.cache)
            ended.append("could not listen (is the port in use?)")  # ggml returns only then
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            ended.append(str(error))
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"ggsteer rpc-server: serving {', '.join(device_description(d) for d in devices)} on "
          f"{args.host}:{args.port} with {threads} threads (Ctrl-C stops)", file=sys.stderr, flush=True)
    # the serving loop never returns: it runs in a daemon thread, and the process ends when asked
    threading.Thread(target=serve, name="ggml-rpc-server", daemon=True).start()
    while not stop.wait(0.5):
        pass
    if ended:
        raise CliError(f"rpc-server on {args.host}:{args.port}: {ended[0]}")
    print("ggsteer rpc-server: stopped", file=sys.stderr, flush=True)
    end_worker_process(0)
    return 0
