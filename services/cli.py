"""The `turboserve` command: `up` runs the whole system; one subcommand per service; `client`; `simulate`.

Service modules are imported inside each subcommand, so `turboserve client` does not load torch and a service
never imports another's internals.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence


def _gateway(_: argparse.Namespace) -> int:
    from services.common.config import CommonSettings
    from services.common.service import nats_connection, run_service
    from services.gateway.app import serve_gateway
    from services.gateway.settings import GatewaySettings

    async def main(stop: asyncio.Event) -> None:
        common = CommonSettings.from_env()
        async with nats_connection(common.nats_url, "gateway", stop) as nc:
            await serve_gateway(GatewaySettings.from_env(), nc, stop)

    return run_service("gateway", main)


def _scheduler(_: argparse.Namespace) -> int:
    from services.common.config import CommonSettings
    from services.common.service import nats_connection, run_service
    from services.common.telemetry.fleet import FleetObserver
    from services.scheduler.runner import run_scheduler
    from services.scheduler.settings import SchedulerSettings

    async def main(stop: asyncio.Event) -> None:
        common = CommonSettings.from_env()
        settings = SchedulerSettings.from_env()
        async with (
            nats_connection(common.nats_url, "scheduler", stop) as nc,
            FleetObserver(nc, settings.worker_timeout_s).running(),
        ):
            await run_scheduler(settings, nc, stop)

    return run_service("scheduler", main)


def _worker(_: argparse.Namespace) -> int:
    from services.common.config import CommonSettings
    from services.common.service import nats_connection, run_service
    from services.gpu_worker.app import run_worker
    from services.gpu_worker.settings import WorkerSettings

    async def main(stop: asyncio.Event) -> None:
        settings = WorkerSettings.from_env()
        async with nats_connection(CommonSettings.from_env().nats_url, f"worker-{settings.worker_id}", stop) as nc:
            await run_worker(settings, nc, stop)

    return run_service("worker", main)


def _state_store(_: argparse.Namespace) -> int:
    from services.common.config import CommonSettings
    from services.common.service import nats_connection, run_service
    from services.state_store.service import run_state_store
    from services.state_store.settings import StateStoreSettings

    async def main(stop: asyncio.Event) -> None:
        async with nats_connection(CommonSettings.from_env().nats_url, "state-store", stop) as nc:
            await run_state_store(StateStoreSettings.from_env(), nc, stop)

    return run_service("state-store", main)


def _up(args: argparse.Namespace) -> int:
    from services.launcher import run_up

    return run_up(workers=args.workers, model=args.model, port=gateway_port(args.port))


def gateway_port(flag: int | None, environ: Mapping[str, str] = os.environ) -> int:
    """``up --port`` when given, else TURBOSERVE_GATEWAY_PORT, else 8080 (a ConfigError names a bad value)."""
    from services.common.config import env_int

    return flag if flag is not None else env_int("TURBOSERVE_GATEWAY_PORT", 8080, low=0, high=65535, environ=environ)


def _model_synth(args: argparse.Namespace) -> int:
    from services.gpu_worker.model.config import get_config
    from services.gpu_worker.model.errors import UnknownModelConfig
    from services.gpu_worker.model.synth import write_synthetic_dir

    try:
        config = get_config(args.config)
    except UnknownModelConfig as exc:
        print(f"turboserve model synth: {exc}")
        return 2
    path = write_synthetic_dir(config, args.dir, seed=args.seed)
    print(f"wrote synthetic {config.name!r} weights in the published layouts to {path}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    """The simulator sizes a session's state from a model config as the model itself reports it; the
    scheduler may not import the worker, so the sizes are looked up here and handed over as numbers."""
    from services.scheduler.sim.cli import run_simulate

    if args.model_config is not None:
        from services.gpu_worker.model.config import get_config
        from services.gpu_worker.model.errors import UnknownModelConfig
        from services.gpu_worker.model.model_check import ModelSizes

        try:
            sizes = ModelSizes.of(get_config(args.model_config))
        except UnknownModelConfig as exc:
            print(f"turboserve simulate: {exc}")
            return 2
        args.kv_gb, args.vae_gb = sizes.kv_bytes / 1e9, sizes.vae_cache_bytes / 1e9
    return run_simulate(args)


def _model_check(args: argparse.Namespace) -> int:
    from services.gpu_worker.model.model_check import run_check

    return run_check(args.dir, args.config, args.gpu_memory_gib)


def _client(args: argparse.Namespace) -> int:
    from services.client import run_client_cli

    return run_client_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turboserve", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole system locally (embedded NATS and Postgres by default)")
    up.add_argument("--workers", type=int, default=2, help="worker processes to start (default 2)")
    up.add_argument("--model", default="tiny", help="model config: tiny (CPU, synthetic weights unless "
                    "TURBOSERVE_MODEL_DIR is set), self-forcing, causvid or longlive (GPU, TURBOSERVE_MODEL_DIR)")
    up.add_argument("--port", type=int, default=None,
                    help="gateway port (default TURBOSERVE_GATEWAY_PORT, else 8080)")
    up.set_defaults(run=_up)

    for name, run, text in (
        ("gateway", _gateway, "WebSocket gateway for clients"),
        ("scheduler", _scheduler, "session store and placement control loop"),
        ("worker", _worker, "model worker: batched chunk generation"),
        ("state-store", _state_store, "durable session snapshots"),
    ):
        commands.add_parser(name, help=text).set_defaults(run=run)

    model = commands.add_parser("model", help="model directories: check published files, write synthetic ones")
    model_commands = model.add_subparsers(dest="model_command", required=True)
    synth = model_commands.add_parser("synth", help="write seeded weights in the published layouts (no download)")
    synth.add_argument("--config", default="tiny", help="model config to write (default tiny)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("dir")
    synth.set_defaults(run=_model_synth)
    check = model_commands.add_parser("check", help="validate a model directory without a GPU; size its sessions")
    check.add_argument("--config", default=None, help="model config (default: the directory's turboserve.json, "
                       "else the one whose generator file is present)")
    check.add_argument("--gpu-memory-gib", type=float, default=80.0, help="GPU memory to fit sessions into")
    check.add_argument("dir")
    check.set_defaults(run=_model_check)

    client = commands.add_parser("client", help="stream a session from the terminal and save its frames as JPEG files")
    from services.client import add_client_arguments

    add_client_arguments(client)
    client.set_defaults(run=_client)

    from services.scheduler.sim.cli import add_simulate_parser

    add_simulate_parser(commands).set_defaults(run=_simulate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
