"""``scatterbroker`` command line: serve, register, ls, info.

Heavy modules are imported inside each command so ``--help`` is instant.
Every failure is one clear line on stderr and a non-zero exit, not a traceback
(set ``SCATTERBROKER_DEBUG=1`` for the traceback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Catalog and serve X-ray/neutron scattering data (CBF, TIFF, NeXus) over Tiled.",
)

API_KEY = typer.Option(
    None, "--api-key", envvar="SCATTERBROKER_API_KEY",
    help="API key (default: $SCATTERBROKER_API_KEY).", show_envvar=False,
)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _console(stderr: bool = False):
    from rich.console import Console

    console = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not console.is_terminal:
        console.width = 200  # logs and pipes: do not fold URLs and keys
    return console


@app.command()
def serve(
    directories: Optional[list[Path]] = typer.Argument(
        None, help="Directories to serve: each becomes a readable root and is registered "
        "under its own name (incrementally: a restart only adds what changed)."
    ),
    config: Optional[Path] = typer.Option(None, "--config", help="Tiled YAML config (see server_config/)."),
    demo: bool = typer.Option(False, "--demo", help="Write and serve demo data; anonymous read on loopback."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind."),
    port: int = typer.Option(8000, help="Port to bind (0 picks a free one)."),
    api_key: Optional[str] = API_KEY,
    data_dir: Path = typer.Option(
        Path("scatterbroker-data"), envvar="SCATTERBROKER_DATA",
        help="Catalog database and written data (embedded SQLite profile).",
    ),
) -> None:
    """Serve a catalog over HTTP (embedded SQLite unless --config says otherwise)."""
    from .server import build_app, local_config, new_api_key

    directories = [Path(d) for d in directories or []]
    for d in directories:
        if not d.is_dir():
            raise typer.BadParameter(f"{d} is not a directory")
    if demo and host not in LOOPBACK:
        raise typer.BadParameter("--demo allows anonymous reads, so it binds to loopback only")
    api_key = api_key or new_api_key()
    if config is not None:
        # Configs name their secrets and paths as ${VARIABLES}; fill the ones we know.
        os.environ.setdefault("SCATTERBROKER_API_KEY", api_key)
        os.environ.setdefault("SCATTERBROKER_DATA", str(data_dir.resolve()))
        (Path(os.environ["SCATTERBROKER_DATA"]) / "files").mkdir(parents=True, exist_ok=True)
        api_key = os.environ["SCATTERBROKER_API_KEY"]
        web_app = build_app(config)
    else:
        if demo:
            from .demo import write_demo

            demo_dir = write_demo(data_dir / "demo")
            directories += [demo_dir / "raw", demo_dir / "scans", demo_dir / "wrappers"]
        web_app = build_app(local_config(data_dir, directories, api_key=api_key, public=demo))
    _run(web_app, host, port, api_key, directories, public=demo)


def _run(web_app, host: str, port: int, api_key: str, directories: list[Path], public: bool) -> None:
    import asyncio

    import anyio
    import uvicorn

    console = _console(stderr=True)
    server = uvicorn.Server(uvicorn.Config(web_app, host=host, port=port, log_level="warning"))

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task  # re-raise a failed start (e.g. port in use)
                return
            await asyncio.sleep(0.05)
        bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
        url = f"http://{bound_host}:{bound_port}"
        console.print(f"[bold]scatterbroker[/] serving {url}")
        console.print(f"  API key: {api_key}" + ("  (needed to write; reading is open on loopback)" if public else ""))
        console.print(f"  Python:  from tiled.client import from_uri; c = from_uri('{url}', api_key='{api_key}')")
        console.print(f"  Browser: {url}/ui/?api_key={api_key}")
        for d in directories:
            await anyio.to_thread.run_sync(_register_with_progress, url, api_key, d, d.name)
        console.print("Ready. Ctrl-C to stop.")
        await task

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


def _client(url: str, api_key: str | None):
    """A Tiled client, after one quick probe so a wrong URL fails fast and clearly
    (the Tiled client would otherwise retry for a while)."""
    import httpx
    from tiled.client import from_uri

    base = url.split("/api/", 1)[0].rstrip("/")
    httpx.get(f"{base}/api/v1/", timeout=10).raise_for_status()
    return from_uri(url, api_key=api_key)


def _register_with_progress(url: str, api_key: str, path: Path, prefix: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .catalog.register import register as register_tree
    from .catalog.walk import walk

    total = 0
    for _, listing in walk(path):
        total += len(listing.unknown) + len(listing.singles) + sum(len(s.numbers) for s in listing.sequences)
    client = _client(url, api_key)
    console = _console(stderr=True)
    with Progress(
        TextColumn("[bold]registering[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("files"), TimeRemainingColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task(str(path), total=total)
        report = register_tree(
            client, path, prefix=prefix,
            progress=lambda n, label: bar.update(task, advance=n, description=label),
        )
    console.print(f"{path}: {report.summary()}")
    for where, why in report.failed:
        console.print(f"  [yellow]skipped[/] {why}" if where in why or Path(where).name in why else f"  [yellow]skipped[/] {where}: {why}")
    return report


@app.command()
def register(
    url: str = typer.Argument(..., help="Server URL, e.g. http://127.0.0.1:8000"),
    path: Path = typer.Argument(..., help="Directory (or file) on the server's file system."),
    prefix: str = typer.Option("", "--prefix", help="Catalog node to register under, e.g. raw/proposal-42."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Register a directory tree (incremental: re-running adds only new or changed files)."""
    if not path.exists():
        raise typer.BadParameter(f"{path} does not exist")
    report = _register_with_progress(url, api_key, path, prefix)
    if report.failed and not (report.created or report.updated or report.unchanged):
        raise typer.Exit(1)


@app.command("ls")
def ls(
    url: str = typer.Argument(..., help="Server URL, or a node's global URI."),
    node: str = typer.Argument("", help="Node path below the URL, e.g. raw/demo-2026."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """List a node's children with their structure and global URI."""
    from rich.table import Table

    client = _client(url, api_key)
    target = client[node] if node else client
    table = Table(box=None, header_style="bold")
    for column in ("name", "kind", "shape / size", "specs", "uri"):
        table.add_column(column)
    children = target.items() if hasattr(target, "items") else [(node.rsplit("/", 1)[-1], target)]
    for key, child in children:
        family = getattr(child.structure_family, "value", child.structure_family)
        if family == "array":
            shape = f"{tuple(child.shape)} {child.dtype}"
        elif family == "container":
            shape = f"{len(child)} items"
        else:
            shape = ""
        specs = ",".join(s.name for s in child.specs)
        table.add_row(key, family, shape, specs, child.uri)
    _console().print(table)


@app.command()
def info() -> None:
    """Show the version, installed adapter plug-ins and configuration."""
    from importlib.metadata import version

    from rich.table import Table

    from .adapters import registry

    console = _console()
    console.print(f"scatterbroker {version('scatterbroker')}  (tiled {version('tiled')})")
    table = Table(title="adapter plug-ins (entry points 'scatterbroker.adapters')", box=None)
    for column in ("mimetype", "class", "extensions"):
        table.add_column(column)
    for mimetype, cls in sorted(registry.adapters_by_mimetype().items()):
        table.add_row(mimetype, f"{cls.__module__}.{cls.__qualname__}", " ".join(getattr(cls, "extensions", ())))
    console.print(table)
    console.print(f"data dir (SCATTERBROKER_DATA): {os.environ.get('SCATTERBROKER_DATA', 'scatterbroker-data')}")
    console.print(f"API key set (SCATTERBROKER_API_KEY): {'yes' if os.environ.get('SCATTERBROKER_API_KEY') else 'no'}")
    configs = Path(__file__).resolve().parent.parent / "server_config"
    if configs.is_dir():
        console.print(f"server configs: {', '.join(str(p) for p in sorted(configs.glob('*.yml')))}")


def main() -> None:
    """Console-script entry point: run the app, turning errors into one line."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        app(standalone_mode=True)
    except SystemExit:
        raise
    except Exception as err:
        if os.environ.get("SCATTERBROKER_DEBUG"):
            raise
        message = _explain(err)
        print(f"scatterbroker: error: {message}", file=sys.stderr)
        sys.exit(1)


def _explain(err: Exception) -> str:
    """One line saying what went wrong, for the exceptions users actually hit."""
    import httpx

    if isinstance(err, httpx.ConnectError):
        return f"cannot connect to the server ({err}); is it running, and is the URL right?"
    response = getattr(err, "response", None)
    if response is not None:
        try:
            detail = response.json().get("detail", response.text)
        except Exception:
            detail = response.text
        if response.status_code == 401:
            return "the server wants an API key: pass --api-key or set SCATTERBROKER_API_KEY"
        return f"server answered {response.status_code}: {detail}"
    if isinstance(err, KeyError):
        key = err.args[0] if err.args else ""
        return f"no such node: {'/'.join(key) if isinstance(key, tuple) else key}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
