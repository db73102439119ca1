"""`ggsteer serve`: the OpenAI-compatible steering server (python/ggsteer/serve/) on uvicorn."""

from __future__ import annotations

import ipaddress
import os
import sys

from ggsteer.cli.common import CliError, add_model_arguments, load_model
from ggsteer.extras import require
from ggsteer.model import DEFAULT_N_CTX

API_KEY_ENV = "GGSTEER_API_KEY"


def add_parser(subparsers) -> None:
    """Register `ggsteer serve` on the `ggsteer` parser."""
    serve = subparsers.add_parser(
        "serve",
        help="serve /v1/completions and /v1/chat/completions with per-request steering, and a chat page at /",
    )
    add_model_arguments(serve)
    serve.add_argument("--vectors", required=True, metavar="DIR",
                       help="directory of *.gguf control vectors; requests steer by file stem")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                       help=f"require 'Authorization: Bearer KEY' on /v1 requests (default: ${API_KEY_ENV}, "
                            "which keeps the key out of the process list)")
    serve.add_argument("--max-batch", type=int, default=8, help="requests generating together at most (default 8)")
    serve.add_argument("--batch-wait-ms", type=float, default=20.0,
                       help="when idle, wait this long after a request for others to start with it (default 20)")
    serve.add_argument("--ctx-size", type=int, default=DEFAULT_N_CTX,
                       help=f"KV cells shared by the requests generating together (default {DEFAULT_N_CTX})")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    uvicorn = require("uvicorn", "serve", "ggsteer serve")
    from ggsteer.serve import ServerConfig, VectorRegistry, create_app

    if not 1 <= args.max_batch <= 256:
        raise CliError(f"--max-batch must be between 1 and 256, got {args.max_batch}")
    if not 0 <= args.batch_wait_ms <= 1000:
        raise CliError(f"--batch-wait-ms must be between 0 and 1000, got {args.batch_wait_ms}")
    model = load_model(args, n_ctx=args.ctx_size, n_seq_max=args.max_batch)
    try:
        registry = VectorRegistry.load(args.vectors, model)
    except ValueError:
        model.close()
        raise
    api_key = args.api_key or None  # an empty key would accept "Bearer " alone
    warn_if_exposed(args.host, api_key)
    config = ServerConfig(api_key=api_key, max_batch=args.max_batch, batch_wait_s=args.batch_wait_ms / 1000)
    app = create_app(model, registry, config)
    print(f"serving {model.model_name} with vectors {', '.join(registry.names)} on http://{args.host}:{args.port}/",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


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
