"""The `forwarder` command: run, status, reload, check-config, send, dlq, spool, mock-remote…"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from forwarder import __version__
from forwarder.cli.daemonclient import Target, Unreachable, request_once
from forwarder.cli.dlq import add_commands
from forwarder.cli.events import add_events_commands
from forwarder.cli.fleet import add_command as add_fleet_command
from forwarder.cli.status import add_command as add_status_command
from forwarder.config.load import DEFAULT_CONFIG_PATH, load_config
from forwarder.config.render import render_effective
from forwarder.config.schema import DEFAULT_ACCOUNT, Config, ConfigError
from forwarder.config.validate import check_exposure
from forwarder.intake.accounts import NO_DEFAULT_KEY, Account, load_accounts
from forwarder.ops.credentials import (
    ApiKey,
    resolve_account_keys,
    resolve_api_key,
    resolve_intake_token,
)

EXIT_CONFIG = 2
# Set to 1 (or any value but 0) to run on asyncio's own loop even when uvloop is installed.
NO_UVLOOP_ENV = "FORWARDER_NO_UVLOOP"


# Every subcommand's --config help, naming the default the loader reads.
CONFIG_HELP = f"TOML config file (default {DEFAULT_CONFIG_PATH})"


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    print(f"forwarder: {message}", file=sys.stderr)
    return code


def _load(config_path: str | None) -> tuple[Config, dict[str, Account]]:
    # Called again on every reload, so it reads the file and the keys afresh each time.
    config = load_config(Path(config_path) if config_path else None)
    return config, load_accounts(config)


def _intake_token(config: Config) -> ApiKey | None:
    """The intake token; ConfigError if a TCP listener is not loopback and there is none.

    Only the configured listener is checked here; the daemon checks systemd's sockets too.
    """
    token = resolve_intake_token(config)
    tcp = config.intake.tcp_address
    check_exposure([("intake.http_listen", tcp[0])] if tcp else [], token is not None)
    return token


@dataclass(frozen=True)
class EventLoopChoice:
    """Which event loop `forwarder run` and `forwarder mock-remote` run on, and why."""

    name: str  # "uvloop" or "asyncio"
    version: str
    reason: str
    factory: Callable[[], asyncio.AbstractEventLoop] | None

    def log_fields(self) -> dict[str, str]:
        """For the one log line saying which loop runs."""
        return {"loop": self.name, "version": self.version, "reason": self.reason}

    def describe(self) -> str:
        """One line for a terminal: "uvloop 0.21.0 (installed)"."""
        return f"{self.name} {self.version} ({self.reason})"


def choose_event_loop(environ: Mapping[str, str] | None = None) -> EventLoopChoice:
    """uvloop's loop when it can be imported (`pip install 'forwarder[speed]'`), else asyncio's.

    FORWARDER_NO_UVLOOP=1 in the environment keeps asyncio's loop with uvloop installed.
    """
    env = os.environ if environ is None else environ
    stdlib = sys.version.split()[0]
    if env.get(NO_UVLOOP_ENV, "") not in ("", "0"):
        return EventLoopChoice("asyncio", stdlib, f"{NO_UVLOOP_ENV} is set", None)
    try:
        import uvloop
    except ImportError:
        return EventLoopChoice(
            "asyncio", stdlib, "uvloop not installed (pip install 'forwarder[speed]')", None
        )
    # __version__ is there at run time but not in uvloop's stubs' exports.
    version = str(vars(uvloop).get("__version__", "?"))
    return EventLoopChoice("uvloop", version, "installed", uvloop.new_event_loop)


def _event_loop_runner(choice: EventLoopChoice | None = None) -> asyncio.Runner:
    """An asyncio.Runner on the chosen loop (see `choose_event_loop`)."""
    choice = choice or choose_event_loop()
    return asyncio.Runner(loop_factory=choice.factory)


# Allocations between young-generation collections (CPython's default is 700). Every accepted
# event allocates a handful of tracked objects, so with the default the collector ran every
# hundred or so events and rescanned what they left in the queue: in a burst into a large queue
# that doubled intake's cost per event (tests/benchmarks, "batch"). Cycles are rare here (the
# objects are plain records), so collecting less often costs little memory.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_gc() -> None:
    """Collect less often, and leave what start-up made (modules, config) out of every scan."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground (systemd keeps it in the background)."""
    import structlog

    from forwarder.daemon.lifecycle import Daemon
    from forwarder.ops.logs import configure_logging

    try:
        config, accounts = _load(args.config)
        token = _intake_token(config)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    configure_logging(
        config.log.level,
        config.log.format,
        secrets=[account.key.reveal() for account in accounts.values()]
        + ([token.secret.reveal()] if token else []),
    )
    daemon = Daemon(config, accounts, loader=lambda: _load(args.config))
    tune_gc()
    loop = choose_event_loop()
    structlog.get_logger("forwarder.cli").info("event_loop", **loop.log_fields())
    with _event_loop_runner(loop) as runner:
        return runner.run(daemon.run())


def cmd_reload(args: argparse.Namespace) -> int:
    """Ask the running daemon to reload its configuration (SIGHUP)."""
    from forwarder.daemon.listeners import PID_FILE
    from forwarder.ops.statedir import read_state_file

    try:
        config = load_config(Path(args.config) if args.config else None)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    path = config.state.path / PID_FILE
    try:
        pid = int(read_state_file(path).decode("ascii").strip())
    except FileNotFoundError:
        return _fail(f"no running forwarder found ({path} does not exist)", 1)
    except (OSError, ValueError) as exc:
        return _fail(f"cannot read {path}: {exc}", 1)
    try:
        comm = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return _fail(f"no running forwarder found (PID {pid} from {path} is gone)", 1)
    if b"forwarder" not in comm:
        return _fail(f"PID {pid} from {path} is not a forwarder process; not signalling it", 1)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return _fail(f"cannot signal PID {pid}: {exc.strerror}", 1)
    print(
        f"forwarder: asked PID {pid} to reload; its log says how it went "
        "(reloaded or reload_refused)"
    )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config and print it as it takes effect, with the key masked."""
    try:
        config = load_config(Path(args.config) if args.config else None)
        key = resolve_api_key(config)
        account_keys = resolve_account_keys(config)
        token = _intake_token(config)
    except ConfigError as exc:
        return _fail(f"config error: {exc}")
    print(render_effective(config, key, account_keys, token), end="")
    if key is None and config.remote.default_account == DEFAULT_ACCOUNT:
        return _fail(NO_DEFAULT_KEY)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """Post one event to a running daemon, as an app would."""
    form = {"recipient_id": args.recipient_id, "name": args.name}
    for field in ("value", "data", "ref", "event_id"):
        if getattr(args, field) is not None:
            form[field] = getattr(args, field)
    if args.conversion:
        form["conversion"] = "1"
    # The daemon's intake token, if it requires one: from the same variable as the setting.
    token = os.environ.get("FORWARDER_INTAKE_AUTH_TOKEN", "")
    return asyncio.run(_send(args.url, args.socket, form, args.timeout, token))


async def _send(
    url: str, socket_path: str | None, form: dict[str, str], timeout: float, token: str = ""
) -> int:
    target = Target(url, socket_path, token)
    try:
        status, body = await request_once(
            target, "POST", "/v1/recipientEvents/create", timeout_s=timeout, data=form
        )
    except Unreachable as exc:
        return _fail(f"cannot reach forwarder at {target.describe()}: {exc}", 1)
    print(body.decode(errors="replace"))
    return 0 if status in (200, 202) else 1  # intake.drop_in_answer "remote" or "accepted"


def cmd_mock_remote(args: argparse.Namespace) -> int:
    """Serve the fake remote API."""
    from forwarder.testing.mock_options import MockOptions
    from forwarder.testing.mock_server import serve_mock

    try:
        options = MockOptions(
            api_key=args.api_key,
            rate_limit=args.rate_limit,
            window_s=args.window_s,
            latency_ms=args.latency_ms,
            fail_rate=args.fail_rate,
            reset_rate=args.reset_rate,
            timeout_rate=args.timeout_rate,
            throttle_rate=args.throttle_rate,
            seed=args.seed,
        )
    except ValueError as exc:
        # E.g. --window-s 0 or --rate-limit -1: a usage error, not a traceback.
        return _fail(f"mock-remote: {exc}")
    loop = choose_event_loop()
    with _event_loop_runner(loop) as runner:
        runner.run(serve_mock(options, args.host, args.port, event_loop=loop.describe()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a mock remote and the daemon together and show events flowing."""
    from forwarder.testing.demo import run_demo

    return asyncio.run(run_demo(events=args.events))


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("must be between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forwarder",
        description="Forward recipient events from local apps to the remote API.",
        # A path in the repository: there is no hosted site (`make docs` builds one into site/).
        epilog="Docs: docs/index.md; every command and option: docs/reference/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"forwarder {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon", epilog="Docs: docs/reference/cli.md")
    run.add_argument("--config", help=CONFIG_HELP)
    run.set_defaults(func=cmd_run)

    add_commands(sub, CONFIG_HELP)
    add_status_command(sub, CONFIG_HELP)
    add_fleet_command(sub, CONFIG_HELP)

    reload = sub.add_parser(
        "reload",
        help="make the running daemon re-read its config (SIGHUP)",
        epilog="Docs: docs/how-to/reload.md",
    )
    reload.add_argument("--config", help=CONFIG_HELP)
    reload.set_defaults(func=cmd_reload)

    check = sub.add_parser(
        "check-config",
        help="validate and print the effective config",
        epilog="Docs: docs/reference/configuration.md",
    )
    check.add_argument("--config", help=CONFIG_HELP)
    check.set_defaults(func=cmd_check_config)

    send = sub.add_parser(
        "send",
        help="send one event to a running daemon (token: $FORWARDER_INTAKE_AUTH_TOKEN, if set)",
        epilog="Docs: docs/tutorial.md#send-events-by-hand",
    )
    where = send.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8787", help="daemon's HTTP address")
    where.add_argument("--socket", help="daemon's Unix socket path")
    send.add_argument("--recipient-id", required=True)
    send.add_argument("--name", required=True, help="e.g. PURCHASE, SIGNUP, PAGE_VIEW")
    send.add_argument("--value")
    send.add_argument("--conversion", action="store_true", help="mark it a conversion")
    send.add_argument("--data", help="extended data (usually JSON)")
    send.add_argument("--ref", help="campaign or mailpiece reference")
    send.add_argument("--event-id", help="idempotency key (10-255 of letters, digits, -_.:)")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    send.set_defaults(func=cmd_send)

    add_events_commands(sub)

    mock = sub.add_parser(
        "mock-remote",
        help="serve a faithful fake of the remote API",
        epilog="Docs: docs/reference/remote-api.md",
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8788, help="0 picks a free port")
    mock.add_argument(
        "--api-key",
        default=os.environ.get("FORWARDER_MOCK_API_KEY", "test-key"),
        help="key the mock accepts (default $FORWARDER_MOCK_API_KEY or 'test-key')",
    )
    mock.add_argument("--rate-limit", type=int, default=300, help="requests/minute; 0 = none")
    mock.add_argument(
        "--window-s",
        type=float,
        default=60.0,
        # A real multiplication sign on purpose: it reads better in --help than an "x".
        help=(
            "length of the rate-limit window in seconds; the per-window quota is "
            "rate-limit × window-s / 60 (default 60: the real API's minute)"  # noqa: RUF001
        ),
    )
    mock.add_argument("--latency-ms", type=float, default=0.0)
    mock.add_argument("--fail-rate", type=_rate, default=0.0, help="share answered 5xx")
    mock.add_argument("--reset-rate", type=_rate, default=0.0, help="share of dropped connections")
    mock.add_argument("--timeout-rate", type=_rate, default=0.0, help="share never answered")
    mock.add_argument(
        "--throttle-rate",
        type=_rate,
        default=0.0,
        help="share answered 429 (Retry-After: the rest of the window), nothing created",
    )
    mock.add_argument("--seed", type=int, default=None, help="seed for reproducible faults")
    mock.set_defaults(func=cmd_mock_remote)

    demo = sub.add_parser(
        "demo",
        help="run a mock remote and the daemon, and send events",
        epilog="Docs: docs/tutorial.md",
    )
    demo.add_argument("--events", type=int, default=40, help="how many events (default 40)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `forwarder` console script."""
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
