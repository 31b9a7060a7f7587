"""``sieve console``: the moderators' review console, and ``sieve console users`` to manage its users.

``sieve console TOPOLOGY`` is short for ``sieve console serve TOPOLOGY``.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from sieve.cli.base import console, fail, setup_logging
from sieve.cli.console_users import users_app
from sieve.settings import Settings, get_settings


class _ServeByDefault(TyperGroup):
    """``sieve console TOPOLOGY ...`` runs ``serve``; a subcommand's name runs that subcommand."""

    default_command = "serve"

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


app = typer.Typer(cls=_ServeByDefault, no_args_is_help=True,
                  help="The moderators' review console: `sieve console TOPOLOGY` serves it; "
                       "`sieve console users ...` manages who may sign in.")
app.add_typer(users_app, name="users", help="Add, change and disable the console's users.")


def _dev_settings(settings: Settings, say: Any) -> tuple[Settings, subprocess.Popen[bytes] | None]:
    """Dev: the dev broker (started when it is not running), a one-off session key, a first user."""
    from pydantic import SecretStr

    from sieve.console.users import UserFile
    from sieve.kafka.broker import port_open, start_dev_broker

    host, port = settings.dev_broker.host, settings.dev_broker.port
    broker = None
    if not port_open(host, port):
        Path(".sieve").mkdir(exist_ok=True)
        broker = start_dev_broker(host, port, log_path=Path(".sieve") / "console-broker.log")
        say(f"dev broker (tansu) started on {host}:{port}")
    kafka = settings.kafka.model_copy(update={"bootstrap_servers": f"{host}:{port}"})
    update: dict[str, Any] = {"kafka": kafka}
    console_settings = settings.console
    if console_settings.secret_key is None:
        key = SecretStr(secrets.token_urlsafe(32))
        console_settings = console_settings.model_copy(update={"secret_key": key})
        say("a one-off session key: sessions end when the console stops (set SIEVE_CONSOLE__SECRET_KEY)")
    users = UserFile.load(console_settings.users_file)
    if not users.users():
        password = secrets.token_urlsafe(12)
        users.add("dev", "lead", password)
        users.save()
        say(f"created the lead [bold]dev[/bold] with password [bold]{password}[/bold] in "
            f"{console_settings.users_file}")
    update["console"] = console_settings
    return settings.model_copy(update=update), broker


@app.command()
def serve(
    topology_path: Annotated[Path, typer.Argument(help="Topology YAML, e.g. topologies/moderation.yaml")],
    dev: Annotated[bool, typer.Option(help="On the dev broker (started if needed), with a one-off session "
                                           "key and a first user if the users file has none.")] = False,
    seed: Annotated[int, typer.Option(help="First put this many of the demo's sample messages on the "
                                           "human-review topic as hand-offs (a queue to look at).")] = 0,
    host: Annotated[str | None, typer.Option(help="Address to bind; default: settings console.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Port; default: settings console.port (8088).")] = None,
) -> None:
    """Serve the review console for a topology's human-review topic (settings: SIEVE_CONSOLE__*)."""
    import uvicorn
    from pydantic import SecretStr

    from sieve.console.app import build_app
    from sieve.console.service import ConsoleService
    from sieve.console.users import UserFile, UserFileError
    from sieve.kafka.startup import BrokerUnavailable, wait_for_broker
    from sieve.routeset import RouteSetError
    from sieve.topology import TopologyError, load_topology, load_topology_route_set

    setup_logging()
    try:
        topology = load_topology(topology_path)
        route_set = load_topology_route_set(topology)
    except (TopologyError, RouteSetError) as exc:
        fail(str(exc))
    settings, broker = _dev_settings(get_settings(), console.print) if dev else (get_settings(), None)
    try:
        if settings.console.secret_key is None:
            fail("the console needs a secret key to sign sessions: set SIEVE_CONSOLE__SECRET_KEY "
                 "(or try it with --dev)")
        try:
            if not UserFile.load(settings.console.users_file).users():
                fail(f"no users in {settings.console.users_file}: add one with "
                     "`sieve console users add NAME --role lead`")
        except UserFileError as exc:
            fail(str(exc))
        try:
            asyncio.run(wait_for_broker(settings.kafka))
            if seed > 0:
                asyncio.run(_seed(settings, topology, route_set, seed))
        except BrokerUnavailable as exc:
            fail(str(exc))
        assert isinstance(settings.console.secret_key, SecretStr)
        service = ConsoleService(topology, route_set, settings)
        web = build_app(service, settings.console)
        bind_host, bind_port = host or settings.console.host, port or settings.console.port
        console.print(f"review console for {topology.name} on http://{bind_host}:{bind_port} "
                      f"(hand-offs from {service.topics['handoffs']}, group {service.topics['group']})")
        uvicorn.run(web, host=bind_host, port=bind_port, log_level="warning")
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(10)


async def _seed(settings: Settings, topology: Any, route_set: Any, count: int) -> None:
    from sieve.cli.demo import SAMPLES
    from sieve.console.seed import seed_handoffs
    from sieve.encoders.factory import build_text_encoder
    from sieve.kafka.client import ensure_topics, send_messages
    from sieve.topology import ReviewSpec

    encoder = build_text_encoder(topology.encoder, device=settings.device,
                                 torch_threads=settings.torch_threads, onnx_cache_dir=settings.onnx_cache_dir)
    messages = seed_handoffs(topology, route_set, encoder, SAMPLES, count, settings.llm.model)
    topic = (topology.review or ReviewSpec()).human_review_topic
    output = topology.output
    await ensure_topics(settings.kafka, {topic: output.partitions}, output.replication_factor)
    await send_messages(settings.kafka, messages)
    console.print(f"seeded {len(messages)} hand-offs on {topic}")
