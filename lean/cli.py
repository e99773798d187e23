"""`lean serve`, `lean check-config`, `lean chat`: the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from lean import __version__, logs
from lean.config import Config, ConfigError, load_config
from lean.tools import Tools


def _load(path: str, port: int | None = None, instance: str | None = None) -> Config | None:
    """The config, with its python tools importable; None (and one line) when not."""
    try:
        config = load_config(path, port=port, instance=instance)
        Tools(config.tools)
    except ConfigError as exc:
        print(f"lean: {exc}", file=sys.stderr)
        return None
    return config


def _run(config: Config) -> int:
    from lean.app import serve

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        asyncio.run(serve(config))
        return 0
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(config))
    except ConfigError as exc:  # found while starting: the store, say
        print(f"lean: {exc}", file=sys.stderr)
        return 2
    return 0


def _chat(args: argparse.Namespace) -> int:
    from lean.chat import ChatError, Options, chat, server_settings

    inputs = []
    for item in args.input:
        name, equals, value = item.partition("=")
        if not equals or not name:
            print(f"lean chat: --input {item!r}: expected NAME=VALUE", file=sys.stderr)
            return 2
        inputs.append((name, value))
    try:
        url, token = server_settings(args.config, dict(os.environ))
    except ChatError as exc:
        print(f"lean chat: {exc}", file=sys.stderr)
        return 2
    # LEAN_TOKEN (one token) is what lean chat read before it shared the server's variable.
    token = args.token or token or os.environ.get("LEAN_TOKEN") or None
    options = Options(
        args.url or url, args.scene, args.ws, token, args.show_ids, args.message, tuple(inputs)
    )
    return chat(options)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lean", description="a small streaming gateway for LLM chat"
    )
    parser.add_argument("--version", action="version", version=f"lean {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", default="config.ini", help="path of config.ini")
    check = commands.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("path", nargs="?", default="config.ini")
    # One config file for every instance of a systemd template (lean@.service): these two
    # are what differs between them (docs/deploy.md "More than one instance").
    for command in (serve, check):
        command.add_argument("--port", type=int, help="instead of [server] port")
        command.add_argument(
            "--instance", help="this instance's name, instead of [cluster] instance"
        )
    talk = commands.add_parser("chat", help="chat with a scene from the terminal")
    talk.add_argument("--url", help="lean's address (default: from the config file)")
    talk.add_argument("--config", default="config.ini", help="where --url and --token default from")
    talk.add_argument("--scene", default="chat", help="the scene to run")
    talk.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a template input of the scene (repeat for several)",
    )
    talk.add_argument("--ws", action="store_true", help="one WebSocket instead of SSE per run")
    talk.add_argument(
        "--token", help="default: the first token in the variable [auth] tokens_env names"
    )
    talk.add_argument("--show-ids", action="store_true", help="conversation id to stderr")
    talk.add_argument("message", nargs="?", help="send one message and exit (else: stdin)")
    args = parser.parse_args(argv)

    if args.command == "chat":
        return _chat(args)

    if args.command == "check-config":
        config = _load(args.path, args.port, args.instance)
        if config is None:
            return 2
        print(
            f"{args.path}: ok ({len(config.providers)} providers, {len(config.models)} models, "
            f"{len(config.scenes)} scenes)"
        )
        return 0
    config = _load(args.config, args.port, args.instance)
    if config is None:
        return 2
    logs.setup(config.server.log_format)
    return _run(config)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
