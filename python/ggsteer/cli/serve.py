"""`ggsteer serve`: the OpenAI-compatible steering server (python/ggsteer/serve/) on uvicorn.

With --rpc the server runs as the child of a supervisor (python/ggsteer/serve/supervisor.py) that
keeps the port answering 503 while an RPC worker is lost and starts the server again once it is back.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import pickle
import socket
import sys
import threading
import time

from ggsteer.cli.common import CliError, add_model_arguments, load_model
from ggsteer.extras import require
from ggsteer.model import DEFAULT_N_CTX
from ggsteer.runtime.rpc import EXIT_WORKER_LOST, end_worker_process, on_lost_worker, workers_answer
from ggsteer.serve import settings

API_KEY_ENV = "GGSTEER_API_KEY"
CHILD_CODE = "import sys; from ggsteer.cli.serve import run_child; sys.exit(run_child())"
LOST_WORKER_EXIT_S = 3.0  # a server that lost a worker answers its clients for this long at most, then exits


def add_parser(subparsers) -> None:
    """Register `ggsteer serve` on the `ggsteer` parser."""
    serve = subparsers.add_parser(
        "serve",
        help="serve /v1/completions and /v1/chat/completions with per-request steering, and a chat page at /",
    )
    add_model_arguments(serve)
    serve.add_argument("--vectors", required=True, metavar="DIR",
                       help="directory of *.gguf control vectors; requests steer by file stem")
    serve.add_argument("--host", default=settings.DEFAULT_HOST, help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=settings.DEFAULT_PORT,
                       help=f"port to listen on (default {settings.DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV}, "
                            "which keeps the key out of the process list)")
    serve.add_argument("--max-batch", type=int, default=settings.DEFAULT_MAX_BATCH,
                       help=f"requests generating together at most (default {settings.DEFAULT_MAX_BATCH})")
    wait_ms = settings.DEFAULT_BATCH_WAIT_S * 1000
    serve.add_argument("--batch-wait-ms", type=float, default=wait_ms,
                       help="when idle, wait this long after a request for others to start with it "
                            f"(default {wait_ms:g})")
    serve.add_argument("--max-queue", type=int, default=settings.DEFAULT_MAX_QUEUE,
                       help="requests waiting for a place in the batch at most; more are answered 429 "
                            f"(default {settings.DEFAULT_MAX_QUEUE})")
    serve.add_argument("--allowed-hosts", default=None, metavar="NAMES",
                       help="comma-separated Host names the server answers besides the loopback names (against DNS "
                            "rebinding; needed when --host is not loopback); '*' accepts any")
    serve.add_argument("--ctx-size", type=int, default=DEFAULT_N_CTX,
                       help=f"KV cells shared by the requests generating together (default {DEFAULT_N_CTX})")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    uvicorn = require("uvicorn", "serve", "ggsteer serve")
    from ggsteer.serve import ServerConfig, VectorRegistry, create_app

    channel = getattr(args, "supervised", None)  # set in the server process a supervisor started
    check_range("--max-batch", args.max_batch, 1, settings.MAX_BATCH_LIMIT)
    check_range("--batch-wait-ms", args.batch_wait_ms, 0, settings.MAX_BATCH_WAIT_S * 1000)
    check_range("--max-queue", args.max_queue, 1, settings.MAX_QUEUE_LIMIT)
    allowed_hosts = allowed_host_names(args.host, args.allowed_hosts, quiet=channel is not None)
    if channel is None:
        listener = bind_listener(args.host, args.port)  # before the model loads: a busy port fails in a second
        if args.rpc:
            return supervise(args, listener)
    else:
        listener = channel.listener()
        if channel.restart and not workers_answer(args.rpc, say=print_error):
            return EXIT_WORKER_LOST  # gone again since the supervisor's probe: it waits for them again
    try:
        model = load_model(args, n_ctx=args.ctx_size, n_seq_max=args.max_batch)
    except BaseException:
        listener.close()
        raise
    try:
        registry = VectorRegistry.load(args.vectors, model)
    except ValueError:
        model.close()
        listener.close()
        raise
    api_key = args.api_key or None  # an empty key would accept "Bearer " alone
    if channel is None or not channel.restart:
        warn_if_exposed(args.host, api_key)
    config = ServerConfig(api_key=api_key, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000,
                          max_queue=args.max_queue, allowed_hosts=allowed_hosts)
    app = create_app(model, registry, config)
    port = listener.getsockname()[1]
    print(f"serving {model.model_name} with vectors {', '.join(registry.names)} on http://{args.host}:{port}/",
          file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, log_level="info"))
    if channel is None:
        server.run(sockets=[listener])
        return 0
    lost = end_on_lost_worker(server, app, channel)
    report_ready(server, channel)
    channel.when_parent_gone(lambda: setattr(server, "should_exit", True))
    server.run(sockets=[listener])
    if lost.is_set():
        end_worker_process(EXIT_WORKER_LOST)  # never free the model: that would talk to the lost worker
    return 0


# -- with --rpc: a supervisor and the server process it runs -----------------------------------------


def supervise(args, listener: socket.socket) -> int:
    """Run the server as a child of a Supervisor, which restarts it once a lost RPC worker is back."""
    from ggsteer.serve.supervisor import Supervisor

    try:
        return Supervisor(listener, args.rpc, CHILD_CODE, pickle.dumps(args)).run()
    finally:
        listener.close()


def run_child() -> int:
    """The server process a Supervisor started: its arguments come from the supervisor's pipe."""
    from ggsteer.cli.main import run
    from ggsteer.serve.supervisor import ChildChannel

    channel = ChildChannel.from_environment()
    if channel is None:
        raise SystemExit("ggsteer: error: run_child() runs the server a `ggsteer serve --rpc` supervisor starts")
    args = pickle.loads(channel.read_payload())  # from the supervisor, our parent: trusted
    args.supervised = channel
    return run(args)


def print_error(message: str) -> None:
    print(f"ggsteer: error: {message}", file=sys.stderr)


def end_on_lost_worker(server, app, channel) -> threading.Event:
    """On a lost RPC worker: fail every request with 503 naming it, stop uvicorn, and end the process
    with EXIT_WORKER_LOST (within LOST_WORKER_EXIT_S even if uvicorn does not stop)."""
    lost = threading.Event()

    def on_lost(line: str) -> None:
        lost.set()
        server.should_exit = True
        threading.Timer(LOST_WORKER_EXIT_S, end_worker_process, args=(EXIT_WORKER_LOST,)).start()
        while True:  # until the process ends: a job submitted just as the worker was abandoned fails too
            app.state.server.worker.abandon(f"{line}; the server starts again once it answers: retry shortly")
            time.sleep(0.05)

    on_lost_worker(on_lost, also_fds=[channel.status_fd])
    return lost


def report_ready(server, channel) -> None:
    """Tell the supervisor once uvicorn accepts connections (it stops answering them then)."""

    def wait() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            channel.ready()

    threading.Thread(target=wait, name="ggsteer-ready", daemon=True).start()


def check_range(flag: str, value, low, high) -> None:
    if not low <= value <= high:  # also false for NaN
        raise CliError(f"{flag} must be between {low:g} and {high:g}, got {value:g}")


def bind_listener(host: str, port: int) -> socket.socket:
    """The listening socket uvicorn will serve on; a one-line CliError if the address is taken or wrong."""
    if not 0 <= port <= 65535:
        raise CliError(f"--port must be between 0 and 65535, got {port}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise CliError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as error:
        listener.close()
        if error.errno == errno.EADDRINUSE:
            raise CliError(f"port {port} on {host} is already in use: stop the other server or pick another "
                           "--port") from None
        reason = error.strerror or str(error)
        raise CliError(f"cannot listen on {host}:{port}: {reason}") from None
    return listener


def allowed_host_names(host: str, extra: str | None, quiet: bool = False) -> tuple[str, ...]:
    """The loopback names, the address served on (unless a wildcard), and --allowed-hosts."""
    from ggsteer.serve.guard import LOOPBACK_HOSTS

    names = list(LOOPBACK_HOSTS)
    if host not in ("0.0.0.0", "::", ""):
        names.append(host)
    names += [name.strip() for name in (extra or "").split(",") if name.strip()]
    if not extra and not is_loopback(host) and not quiet:
        print(f"ggsteer: note: only requests addressed to {', '.join(names)} are answered; "
              "add the names clients use with --allowed-hosts", file=sys.stderr)
    return tuple(dict.fromkeys(names))


def warn_if_exposed(host: str, api_key: str | None) -> None:
    if api_key is None and not is_loopback(host):
        print(f"ggsteer: warning: listening on {host} without --api-key: anyone who can reach it can use the model",
              file=sys.stderr)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
