"""The ``registry-agent`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

from registry_agent import ConfigError, RegistryError, __version__, available_backends
from registry_agent._plugins import open_backend

EXIT_ERROR = 1
EXIT_USAGE = 2


async def _list(url: str, service: str, as_json: bool, request_timeout: float) -> int:
    backend = open_backend(url, timeout=request_timeout)
    try:
        snapshot = await backend.list(service)
    finally:
        await backend.close()
    rows = [snapshot.instances[key] for key in sorted(snapshot.instances)]
    if as_json:
        for health in rows:
            print(
                json.dumps(
                    {
                        **health.instance.to_dict(),
                        "healthy": health.healthy,
                        "status": str(health.status),
                    },
                    ensure_ascii=False,
                )
            )
        return 0
    if not rows:
        print(f"no instances of {service}")
        return 0
    print(f"{'ID':30} {'ADDRESS':22} {'STATUS':9} TAGS")
    for health in rows:
        inst = health.instance
        print(
            f"{inst.id:30} {inst.address + ':' + str(inst.port):22} {health.status!s:9} "
            f"{','.join(inst.tags)}"
        )
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="registry-agent",
        description="Self-healing service registration for Consul and etcd.",
    )
    parser.add_argument("--version", action="version", version=f"registry-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    list_cmd = commands.add_parser("list", help="print the instances of a service")
    list_cmd.add_argument("service")
    list_cmd.add_argument(
        "--backend", required=True, metavar="URL", help="consul://host:port or etcd://host:port"
    )
    list_cmd.add_argument("--json", action="store_true", help="one JSON object per line")
    list_cmd.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    commands.add_parser("backends", help="print the installed backend schemes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``registry-agent`` console script."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "backends":
            print("\n".join(available_backends()))
            return 0
        return asyncio.run(_list(args.backend, args.service, args.json, args.timeout))
    except ConfigError as exc:
        print(f"registry-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except RegistryError as exc:
        print(f"registry-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
