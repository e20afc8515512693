"""`rewardsvc-healthcheck` (or `python -m rewardsvc.cli.healthcheck`): one gRPC health Check against a server,
exit 0 when it answers SERVING and 1 otherwise (NOT_SERVING while loading or draining, unreachable, timed out,
unknown service). The Dockerfile's HEALTHCHECK and the Kubernetes exec probe of a TLS deployment run it.

Light on purpose: it imports the client only (grpc + protobuf, no torch), so a probe every few seconds costs
a fraction of a second. The port comes from --port, else $REWARDSVC_PORT (as for `rewardsvc serve`)."""

from __future__ import annotations

import argparse
import sys

from ..errors import RewardError
from .env import PORT_ENV, env_port

DEFAULT_PORT = 50051  # ServerConfig.port; not imported, to keep this probe free of the serving package


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardsvc-healthcheck", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="server address (default %(default)s)")
    parser.add_argument("--port", type=int, default=None, help=f"gRPC port (default ${PORT_ENV}, else {DEFAULT_PORT})")
    parser.add_argument("--service", default="", help='health service name (default "": the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default %(default)s)")
    parser.add_argument("--tls-ca", help="PEM CA bundle: speak TLS, trusting this CA")
    parser.add_argument("--tls-server-name", help="name to check the server certificate against (default: --host)")
    parser.add_argument("--tls-cert", help="PEM client certificate, when the server requires mutual TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    return parser


def check(args: argparse.Namespace) -> tuple[bool, str]:
    """(healthy, one line saying what the server answered)."""
    from ..client import ClientTLS, RewardClient

    if not args.timeout > 0:
        return False, f"--timeout must be > 0, got {args.timeout}"
    port = args.port if args.port is not None else env_port(PORT_ENV, DEFAULT_PORT)
    target = f"[{args.host}]:{port}" if ":" in args.host else f"{args.host}:{port}"
    tls: ClientTLS | bool = False
    if args.tls_ca or args.tls_cert:
        tls = ClientTLS(root_certificates=args.tls_ca, certificate_chain=args.tls_cert, private_key=args.tls_key,
                        server_name=args.tls_server_name)  # fmt: skip
    with RewardClient(target, tls=tls) as client:
        try:
            status = client.health(args.service, timeout=args.timeout)
        except RewardError as exc:
            return False, f"{target}: {type(exc).__name__}: {exc}"
    return status == "SERVING", f"{target}: {status}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        healthy, line = check(args)
    except (RewardError, OSError) as exc:  # a bad $REWARDSVC_PORT, an unreadable certificate file
        healthy, line = False, f"error: {exc}"
    print(line, file=sys.stdout if healthy else sys.stderr)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
