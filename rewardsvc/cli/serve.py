"""`rewardsvc serve`: load the scorer, serve it over gRPC, block until SIGTERM / SIGINT, stop gracefully.

Wired into rewardsvc/cli/main.py as an extension (`add_arguments` / `run`), or run alone:
    python -m rewardsvc.cli.serve --port 50051 --metrics-port 9090
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from ..errors import InvalidInputError, RewardError
from ..integrations.openrlhf import ScoresMapping
from ..serving.config import ServerConfig
from .env import HOST_ENV, METRICS_PORT_ENV, PORT_ENV, env_host, env_port

log = logging.getLogger("rewardsvc.server")

TOKEN_ENV = "REWARDSVC_AUTH_TOKEN"

INPUT_FORMAT = """\
requests: gRPC rewardsvc.v1.RewardService (proto/rewardsvc/v1/reward.proto; docs/SERVING.md): Score,
  ScoreGroup, Compare, InspectWeights, ScoreStream, GetModelInfo; health and reflection are on
"""


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Model flags (shared with score / inspect, added here unless the caller already did) + server flags."""
    from .main import add_model_arguments

    if not any("--model" in action.option_strings for action in parser._actions):
        add_model_arguments(parser, multiple_models=True)
    d = ServerConfig()
    g = parser.add_argument_group("server")
    g.add_argument("--host", default=None,
                   help=f"address to bind (default ${HOST_ENV}, else {d.host}; 0.0.0.0 for all interfaces)")  # fmt: skip
    g.add_argument("--port", type=int, default=None, help=f"gRPC port, 0 = ephemeral (default ${PORT_ENV}, else {d.port})")
    g.add_argument("--metrics-port", type=int, default=None,
                   help=f"Prometheus /metrics port, 0 = ephemeral (default ${METRICS_PORT_ENV}, else off)")  # fmt: skip
    g.add_argument("--http-port", type=int, default=None,
                   help="also serve HTTP/JSON here: OpenRLHF's POST /get_reward, vLLM's /classify, /pooling and "
                        "/v1/models, and /v1/score etc. (default: off; 0 = ephemeral)")  # fmt: skip
    g.add_argument("--http-policy-template", default=None,
                   help="tokenizer (directory or hub id) of the policy whose chat template /get_reward queries use "
                        "(default: the reward backbone's)")  # fmt: skip
    g.add_argument("--http-default-weights", default=None, metavar="JSON",
                   help='steering of /get_reward, /classify and /pooling, whose requests cannot carry weights: '
                        '\'{"mode": "mask", "values": {"safety": 0}}\' (default: the gating\'s)')  # fmt: skip
    g.add_argument("--openrlhf-scores", default=str(d.openrlhf_scores), metavar="sigmoid|raw|threshold=T",
                   help="/get_reward's `scores` (OpenRLHF's dynamic filtering): sigmoid(reward), the raw reward, or "
                        "1/0 for reward >= T (default %(default)s)")  # fmt: skip
    g.add_argument("--auth-token-file", help=f"file holding the bearer token clients must send (or set ${TOKEN_ENV})")
    g.add_argument("--tls-cert", help="PEM server certificate chain (TLS on with --tls-key)")
    g.add_argument("--tls-key", help="PEM private key of --tls-cert")
    g.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    norm = parser.add_argument_group("normalization")
    norm.add_argument("--normalize", action="store_true",
                      help="by default, z-score the score and rewards against the model's calibration (rewardsvc "
                           "calibrate); a request's own `normalization` wins; raw values stay in every response")  # fmt: skip
    norm.add_argument("--normalize-clip", type=float, default=None, metavar="C",
                      help="with --normalize: clip the default's z-scores to [-C, C] (default: no clip)")  # fmt: skip
    limits = parser.add_argument_group("limits and batching")
    limits.add_argument("--max-message-bytes", type=int, default=d.max_message_bytes, help="largest request (default %(default)s)")
    limits.add_argument("--max-conversations-per-request", type=int, default=d.max_conversations_per_request,
                        help="default %(default)s")  # fmt: skip
    limits.add_argument("--max-group-size", type=int, default=d.max_group_size, help="responses per ScoreGroup (default %(default)s)")
    limits.add_argument("--batch-token-budget", type=int, default=d.token_budget,
                        help="tokens the batcher groups into one scorer call (default %(default)s)")  # fmt: skip
    limits.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                        help="batcher wait for more requests after the first (default %(default)s)")  # fmt: skip
    limits.add_argument("--max-tokens-in-flight", type=int, default=d.max_tokens_in_flight,
                        help="admission control: tokens queued or computing before RESOURCE_EXHAUSTED (default %(default)s)")  # fmt: skip
    limits.add_argument("--handler-threads", type=int, default=d.handler_threads, help="default %(default)s")
    limits.add_argument("--torch-threads", type=int, default=None,
                        help="torch intra-op threads of the model (default: torch's choice, one per core)")  # fmt: skip
    limits.add_argument("--max-connection-age", type=float, default=None, metavar="SECONDS",
                        help="send clients GOAWAY after about this long so that they reconnect and re-resolve "
                             "dns:/// targets (new replicas get traffic); default: off")  # fmt: skip
    limits.add_argument("--grace", type=float, default=d.grace_s,
                        help="seconds in-flight calls get to finish on SIGTERM (default %(default)s)")  # fmt: skip


def _auth_token(args: argparse.Namespace) -> str | None:
    if args.auth_token_file:
        try:
            token = open(args.auth_token_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise InvalidInputError(f"--auth-token-file: cannot read {args.auth_token_file}: {exc}", "auth_token_file") from exc
        if not token:
            raise InvalidInputError(f"--auth-token-file: {args.auth_token_file} is empty", field="auth_token_file")
        return token
    return os.environ.get(TOKEN_ENV) or None  # never a flag: flags show up in `ps`


def server_config(args: argparse.Namespace) -> ServerConfig:
    from .main import parse_weights

    return ServerConfig(
        # flag > environment variable (how a container or a pod passes ports) > default
        host=args.host if args.host is not None else env_host(HOST_ENV, ServerConfig.host),
        port=args.port if args.port is not None else env_port(PORT_ENV, ServerConfig.port),
        metrics_port=args.metrics_port if args.metrics_port is not None else env_port(METRICS_PORT_ENV, None, allow_off=True),
        http_port=args.http_port,
        http_policy_template=args.http_policy_template,
        http_default_weights=parse_weights(args.http_default_weights, "--http-default-weights"),
        openrlhf_scores=ScoresMapping.parse(args.openrlhf_scores),
        max_message_bytes=args.max_message_bytes,
        max_conversations_per_request=args.max_conversations_per_request,
        max_group_size=args.max_group_size,
        token_budget=args.batch_token_budget,
        max_wait_ms=args.max_wait_ms,
        max_tokens_in_flight=args.max_tokens_in_flight,
        handler_threads=args.handler_threads,
        auth_token=_auth_token(args),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        grace_s=args.grace,
        max_connection_age_s=args.max_connection_age,
        normalize=args.normalize,
        normalize_clip=args.normalize_clip,
    )  # max tokens per conversation: the scorer's own --max-tokens


def model_specs(values: list[str] | None) -> list[tuple[str | None, str | None]]:
    """`--model` values -> (name or None, path or None). `NAME=PATH` names a model; a value whose part before the
    first `=` holds a `/` (a path, a hub id) or that is an existing path is a plain PATH (named by its model_id).
    No --model: the packaged default."""
    if not values:
        return [(None, None)]
    specs = []
    for value in values:
        name, sep, path = value.partition("=")
        if sep and "/" not in name and not os.path.exists(value):
            if not name or not path:
                raise InvalidInputError(f"--model: {value!r} must be NAME=PATH with both parts given", field="model")
            specs.append((name, path))
        else:
            specs.append((None, value))
    return specs


def load_models(args: argparse.Namespace):
    """Every --model, as a serving.models.ModelSet; head sets naming the same backbone load it once."""
    from ..serving.models import ModelSet
    from .main import load_scorer

    shared: dict = {}
    models = []
    for name, path in model_specs(args.model):
        scorer = load_scorer(argparse.Namespace(**{**vars(args), "model": path}), shared_backbones=shared)
        models.append((name or scorer.model_id, scorer))
    return ModelSet(models)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # the address, readiness and shutdown lines are the point of this command


def run_serve(args: argparse.Namespace) -> int:
    """Load, serve, block until SIGTERM/SIGINT, stop gracefully. 0 after a clean stop, 1 if loading failed."""
    from ..serving.logs import log_line
    from ..serving.server import build_server
    _setup_logging()
    config = server_config(args)
    model_specs(args.model)  # a malformed --model fails before anything loads
    from ..serving.otel import install_from_env

    install_from_env()  # traces only when OTEL_* variables ask for them (docs/OBSERVABILITY.md)
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, _frame) -> None:
        received.append(signum)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        # Bind first, load in the background: health answers NOT_SERVING while the model loads.
        running = build_server(lambda: load_models(args), config, wait_ready=False)
        while not stop.wait(0.2):
            if running.load_error is not None:
                running.stop(0)
                print(f"error: cannot load the model: {running.load_error}", file=sys.stderr)
                return 1
        log.info(log_line("serve.signal", signal=signal.Signals(received[0]).name if received else "?"))
        running.stop(config.grace_s)
        if running.batcher_running:
            # A scorer call outlived BATCHER_JOIN_S. Exiting the interpreter while a thread is inside torch
            # aborts the process (SIGABRT); leave without running C++ destructors instead.
            log.warning(log_line("serve.exit_forced", reason="the batcher thread is still inside a scorer call"))
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# The cli/main.py extension protocol (`EXTENSIONS`): add_arguments(parser) and run(args) -> int.
add_arguments = add_serve_arguments
run = run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rewardsvc serve", description="Serve the reward model over gRPC")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except RewardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
