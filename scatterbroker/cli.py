"""``scatterbroker`` command line: serve, register, ls, stack, info.

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
    from scatterbroker.server.app import build_app, local_config, new_api_key

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
        api_key = os.environ["SCATTERBROKER_API_KEY"]
        from tiled.config import parse_configs

        from .environment import check_environment

        try:
            check_environment(config)
        except ValueError as err:
            raise typer.BadParameter(str(err)) from None
        parsed = parse_configs(config)
        if parsed.authentication.providers:
            # multi-user (facility.yml): keys live in the authentication database
            if directories:
                raise typer.BadParameter(
                    f"{config} issues its own keys: start it without directories, then "
                    "`scatterbroker keys issue` a write key and `scatterbroker register` with it")
            api_key = None
        if parsed.authentication.allow_anonymous_access and host not in LOOPBACK:
            raise typer.BadParameter(
                f"{config} allows anonymous reads, so it may only bind to loopback, not {host}"
            )
        demo = demo or parsed.authentication.allow_anonymous_access
        web_app = build_app(parsed, freeze_gc=True)
    else:
        if demo:
            from scatterbroker.server.demo import write_demo

            demo_dir = write_demo(data_dir / "demo")
            directories += [demo_dir / "raw", demo_dir / "scans", demo_dir / "wrappers"]
        web_app = build_app(local_config(data_dir, directories, api_key=api_key, public=demo), freeze_gc=True)
    _run(web_app, host, port, api_key, directories, public=demo)


def _run(web_app, host: str, port: int, api_key: Optional[str], directories: list[Path], public: bool) -> None:
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
        if api_key is None:
            console.print(f"  Keys:    ADMIN=$(scatterbroker keys admin {url}); "
                          f"scatterbroker keys issue {url} --proposal P --access read --api-key $ADMIN")
        else:
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

    from .catalog.uris import global_uri

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
        table.add_row(key, family, shape, specs, global_uri(child))
    _console().print(table)


@app.command()
def stack(
    args: list[str] = typer.Argument(
        ..., metavar="[URL NODE | URI] OUT.nxs",
        help="A scan node (server URL + node path, or the node's global URI) and the NeXus "
        "file to write; with --files, only OUT.nxs (plus URL first if --register).",
    ),
    files: Optional[str] = typer.Option(
        None, "--files", help="Stack local frame files instead of a catalog node: a quoted "
        "glob such as 'DIR/scan1_*.cbf', or a directory holding one scan.",
    ),
    codec: str = typer.Option("bitshuffle-lz4", "--codec", help="bitshuffle-lz4, gzip, zstd, lz4 or none."),
    float32: bool = typer.Option(
        False, "--float32", help="Store float32, missing frames as NaN (default: the detector's "
        "integers, missing frames as -1).",
    ),
    workers: Optional[int] = typer.Option(None, "--workers", help="Worker processes (default: one per core)."),
    strict: bool = typer.Option(False, "--strict", help="Write nothing if any frame is missing or unreadable."),
    register_prefix: Optional[str] = typer.Option(
        None, "--register", help="Then register the scan file in the catalog under this node, "
        "e.g. scans/sample1 (the server must be able to read OUT.nxs).",
    ),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Stack a scan's frames into one NeXus file (compressed, chunk = one frame), in parallel."""
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from .catalog.stacking import stack_scan
    from .reduction.stack import stack_files

    if files is not None:
        if len(args) not in (1, 2) or (len(args) == 2) != bool(register_prefix):
            raise typer.BadParameter("with --files give OUT.nxs (and URL first only with --register)")
        url, out = (args[0] if len(args) == 2 else None), Path(args[-1])
    elif len(args) in (2, 3):
        url, out = args[0], Path(args[-1])
    else:
        raise typer.BadParameter("give URL NODE OUT.nxs, a node URI and OUT.nxs, or --files GLOB OUT.nxs")
    console = _console(stderr=True)
    dtype = "float32" if float32 else None
    # No refresh thread: a single-threaded process may fork its workers (fast and safe).
    with Progress(
        TextColumn("[bold]stacking[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("frames"), TimeRemainingColumn(), console=console, transient=True,
        auto_refresh=False,
    ) as bar:
        task = bar.add_task(out.name, total=None)
        shown = [0.0]

        def progress(n: int, total: int) -> None:
            bar.update(task, advance=n, total=total)
            if time.monotonic() - shown[0] > 0.1:
                shown[0] = time.monotonic()
                bar.refresh()

        options = dict(codec=codec, dtype=dtype, workers=workers, progress=progress, strict=strict)
        if files is not None:
            report = stack_files(files, out, **options)
        else:
            node = _client(url, api_key)
            if len(args) == 3 and args[1].strip("/"):
                node = node[args[1].strip("/")]
            report = stack_scan(node, out, **options)
    _console().print(report.summary())
    for number, why in report.missing[:20]:
        console.print(f"  [yellow]missing[/] frame {number}: {why}")
    if len(report.missing) > 20:
        console.print(f"  ... and {len(report.missing) - 20} more (entry/instrument/detector/missing_frames)")
    if register_prefix:
        from .catalog.register import register as register_tree

        root = url.split("/api/", 1)[0].rstrip("/")  # a node URI names the server too
        result = register_tree(_client(root, api_key), out.resolve(), prefix=register_prefix)
        console.print(f"{out}: {result.summary()}")
        for where, why in result.failed:
            console.print(f"  [yellow]not registered[/] {where}: {why}")
        if result.failed:
            raise typer.Exit(1)


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


@app.command()
def watch(
    directory: Path = typer.Argument(..., help="Detector output directory (on the server's file system)."),
    uri: str = typer.Option(..., "--uri", help="Server URL, e.g. http://127.0.0.1:8000"),
    prefix: str = typer.Option("", "--prefix", help="Catalog node for this directory, e.g. raw/proposal-42."),
    poll: bool = typer.Option(False, "--poll", help="Poll with stat (network file systems) instead of inotify."),
    settle: float = typer.Option(0.3, help="Seconds a file must stop growing before it is taken (no close event)."),
    stack_to: Optional[Path] = typer.Option(None, "--stack-to", help="Stack each scan that stops growing "
                                            "into DIR/<scan>.nxs plus a wrapper, and register both."),
    stack_after: float = typer.Option(10.0, "--stack-after", help="Seconds without a new frame before stacking."),
    incomplete_after: float = typer.Option(30.0, "--incomplete-after", help="Seconds a frame may stay "
                                           "shorter than its header says before it is reported as truncated."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Register frames as the detector writes them; resume where the catalog left off."""
    import signal
    import threading

    from .catalog.watch import Watcher

    if not directory.is_dir():
        raise typer.BadParameter(f"{directory} is not a directory")
    console = _console(stderr=True)
    watcher = Watcher(_client(uri, api_key), directory, prefix, poll=poll, settle=settle,
                      on_problem=lambda msg: console.print(f"[yellow]problem[/] {msg}"),
                      stack_to=stack_to, stack_after=stack_after, incomplete_after=incomplete_after)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    console.print(f"watching {directory} -> {uri} {prefix or '/'} ({'polling' if poll else 'inotify'}); Ctrl-C to stop")
    try:
        watcher.run(stop, status=lambda stats: console.print(stats.line(), end="\r" if console.is_terminal else "\n"))
    except KeyboardInterrupt:
        pass
    console.print(f"\nstopped: {watcher.stats.line()}")


@app.command()
def verify(
    url: str = typer.Argument(..., help="Server URL."),
    node: str = typer.Argument("", help="Node to check (recursively), e.g. raw/proposal-42."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Re-check raw files against the checksums recorded at registration."""
    from rich.progress import Progress

    from .catalog.verify import verify as verify_tree

    client = _client(url, api_key)
    target = client[node] if node else client
    console = _console(stderr=True)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("verifying", total=None)
        checked, bad = verify_tree(target, progress=lambda n: bar.update(task, advance=n))
    for mismatch in bad:
        console.print(f"[red]MODIFIED[/] {mismatch}")
    console.print(f"{checked} files checked, {len(bad)} do not match their recorded checksum")
    if bad:
        raise typer.Exit(2)


keys_app = typer.Typer(no_args_is_help=True, help="API keys on a facility server: admin, per-proposal read/write, revoke.")
app.add_typer(keys_app, name="keys")


def _seconds(text: Optional[str]) -> Optional[int]:
    """'90d', '12h', '30m', '45s' or plain seconds; None never expires."""
    if not text:
        return None
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a duration like 90d, 12h, 30m or 3600") from None


@keys_app.command("admin")
def keys_admin(
    url: str = typer.Argument(..., help="Server URL."),
    user: str = typer.Option("admin", help="Admin user name (a tiled_admins identity)."),
    provider: str = typer.Option("local", help="Password provider named in the server config."),
    expires: Optional[str] = typer.Option(None, help="Lifetime, e.g. 30d (default: never)."),
) -> None:
    """Log in as admin (password from $SCATTERBROKER_ADMIN_PASSWORD, else asked) and print an admin key."""
    from scatterbroker.server.keys import admin_key

    password = os.environ.get("SCATTERBROKER_ADMIN_PASSWORD") or typer.prompt(f"{user} password", hide_input=True)
    print(admin_key(url, password, username=user, provider=provider, expires_in=_seconds(expires)))


@keys_app.command("issue")
def keys_issue(
    url: str = typer.Argument(..., help="Server URL."),
    access: str = typer.Option(..., "--access", help="read, write (register, upload, jobs) or admin."),
    proposal: list[str] = typer.Option([], "--proposal", help="Proposal the key may see (repeat for several)."),
    expires: Optional[str] = typer.Option(None, help="Lifetime, e.g. 90d (default: never)."),
    note: Optional[str] = typer.Option(None, help="Label stored with the key."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Issue a key (with an admin key); prints the secret, and on stderr how to revoke it."""
    from scatterbroker.server.keys import issue_key

    if not api_key:
        raise typer.BadParameter("issuing keys needs an admin key (--api-key or $SCATTERBROKER_API_KEY)")
    try:
        key = issue_key(url, api_key, access, proposal, expires_in=_seconds(expires), note=note)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    print(key.secret)
    _console(stderr=True).print(
        f"{access} key {key.first_eight}… for {', '.join(key.proposals) or 'all proposals'}; "
        f"revoke: scatterbroker keys revoke {url} {key.principal} {key.first_eight}")


@keys_app.command("revoke")
def keys_revoke(
    url: str = typer.Argument(..., help="Server URL."),
    principal: str = typer.Argument(..., help="Service principal UUID printed by `keys issue`."),
    first_eight: str = typer.Argument(..., help="First eight characters of the key."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Revoke a key issued by `keys issue` (with an admin key)."""
    from scatterbroker.server.keys import revoke_key

    revoke_key(url, api_key or "", principal, first_eight)
    _console(stderr=True).print(f"revoked {first_eight[:8]}")


jobs_app = typer.Typer(no_args_is_help=True, help="Reduction jobs run by the server: submit, status, ls.")
app.add_typer(jobs_app, name="jobs")


def _parameters(text: str) -> dict:
    """JSON parameters given inline or as @file.json."""
    import json

    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise typer.BadParameter(f"parameters are not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("parameters must be a JSON object")
    return value


def _jobs_api(url: str, api_key: Optional[str]) -> tuple[str, dict]:
    """``<server>/api/v1/jobs`` for a server URL or any node URI on it, and auth headers."""
    base = url.split("/api/", 1)[0].rstrip("/")
    return f"{base}/api/v1/jobs", ({"Authorization": f"Apikey {api_key}"} if api_key else {})


def _post_job(url: str, api_key: Optional[str], operation: str, inputs: list[str], parameters: dict,
              output: Optional[str]) -> dict:
    import httpx

    jobs_url, headers = _jobs_api(url, api_key)
    r = httpx.post(jobs_url, json={"operation": operation, "inputs": inputs,
                                   "parameters": parameters, "output": output},
                   headers=headers, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"server refused the job ({r.status_code}): {r.json().get('detail', r.text)}")
    return r.json()


def _wait(url: str, api_key: Optional[str], job_id: str) -> dict:
    import time

    import httpx

    jobs_url, headers = _jobs_api(url, api_key)
    console = _console(stderr=True)
    with console.status(f"job {job_id} running"):
        while True:
            record = httpx.get(f"{jobs_url}/{job_id}", headers=headers, timeout=30).json()
            if record.get("state") in ("done", "failed"):
                return record
            time.sleep(0.5)


def _report(record: dict) -> None:
    if record["state"] == "failed":
        print(f"scatterbroker: job {record['id']} failed: {record.get('error')}", file=sys.stderr)
        raise typer.Exit(1)
    _console().print(f"job {record['id']} done; product: {record['product']}")


@jobs_app.command("submit")
def jobs_submit(
    url: str = typer.Argument(..., help="Server URL."),
    operation: str = typer.Argument(..., help="transform, project, peaks or orient."),
    inputs: list[str] = typer.Argument(..., help="Input node URIs (…/api/v1/metadata/<path>)."),
    params: str = typer.Option("{}", "--params", help="JSON parameters, inline or @file.json."),
    output: Optional[str] = typer.Option(None, "--output", help="Product node path (default under reduced/)."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the job and print its product URI."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Submit a job; the server runs it as you and writes the product into the catalog."""
    job = _post_job(url, api_key, operation, inputs, _parameters(params), output)
    _console().print(f"job {job['id']} queued: {job['uri']}")
    if wait:
        _report(_wait(url, api_key, job["id"]))


@jobs_app.command("status")
def jobs_status(url: str = typer.Argument(...), job_id: str = typer.Argument(...),
                api_key: Optional[str] = API_KEY) -> None:
    """Show one job's record (state, times, error, product URI)."""
    import json

    import httpx

    jobs_url, headers = _jobs_api(url, api_key)
    r = httpx.get(f"{jobs_url}/{job_id}", headers=headers)
    if r.status_code != 200:
        raise RuntimeError(f"no such job ({r.status_code}): {r.json().get('detail', r.text)}")
    _console().print_json(json.dumps(r.json()))


@jobs_app.command("ls")
def jobs_ls(url: str = typer.Argument(...), api_key: Optional[str] = API_KEY) -> None:
    """List jobs with their state."""
    import httpx
    from rich.table import Table

    jobs_url, headers = _jobs_api(url, api_key)
    r = httpx.get(jobs_url, headers=headers)
    r.raise_for_status()
    table = Table(box=None, header_style="bold")
    for column in ("id", "operation", "state", "submitted", "product / error"):
        table.add_column(column)
    for rec in r.json():
        table.add_row(rec["id"], rec["operation"], rec["state"], rec["submitted"],
                      rec.get("product") or rec.get("error") or "")
    _console().print(table)


@app.command()
def transform(
    uri: str = typer.Argument(..., help="Scan (or frames) node URI."),
    params: str = typer.Option(..., "--params", help="JSON {geometry, grid, ub?} inline or @file.json; "
                               "without ub, the UB of the scan's NeXus sample, or an orient product's URI "
                               "as ub (see docs/geometry.md)."),
    output: Optional[str] = typer.Option(None, "--output", help="Product node path."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Transform a rotation scan to reciprocal space on the server; print the product URI."""
    job = _post_job(uri, api_key, "transform", [uri], _parameters(params), output)
    _report(_wait(uri, api_key, job["id"]))


@app.command()
def wrap(
    uri: str = typer.Argument(..., help="The node's global URI (…/api/v1/metadata/<path>), e.g. a scan file."),
    out: Path = typer.Argument(..., help="Wrapper NeXus file to write."),
    absolute: bool = typer.Option(
        False, "--absolute", help="External links with the server's absolute file paths "
        "(default: relative to OUT's directory)."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Write a portable NeXus wrapper of a node (external links + global URIs).

    The wrapper holds the node's metadata tree and small fields, and for each large
    field both its facility-local external link and its global URI, so that
    scatterbroker.clients.nexus.nxload reads it anywhere.
    """
    from scatterbroker.clients.nexus import wrap as write_wrapper

    report = write_wrapper(uri, out, api_key=api_key, relative=not absolute)
    _console().print(report.summary())
    for problem in report.problems:
        _console(stderr=True).print(f"  [yellow]left out[/] {problem}")


@app.command()
def upload(
    args: list[str] = typer.Argument(
        ..., metavar="FILE.nxs (URI | URL NODE)",
        help="A NeXus file (e.g. a customised wrapper) and the new node: its global URI, "
        "or the server URL and the node path (e.g. users/ana/fit1)."),
    api_key: Optional[str] = API_KEY,
) -> None:
    """Register a (customised) NeXus file as a new catalog node.

    Small data are stored in the server's writable storage, links stay links to
    their URIs; an existing node is never overwritten and nothing goes under raw data.
    """
    from scatterbroker.clients.upload import upload as upload_file

    if len(args) not in (2, 3):
        raise typer.BadParameter("give FILE.nxs and the new node's URI (or URL NODE)")
    path = Path(args[0])
    if not path.is_file():
        raise typer.BadParameter(f"{path} is not a file")
    report = upload_file(path, args[1], node=args[2] if len(args) == 3 else None, api_key=api_key)
    _console().print(report.summary())
    for warning in report.warnings:
        _console(stderr=True).print(f"  [yellow]note[/] {warning}")


def main() -> None:
    """Console-script entry point: run the app, turning errors into one line."""
    import warnings

    warnings.filterwarnings("ignore")
    try:
        from .environment import load_secret_files

        load_secret_files()  # SCATTERBROKER_API_KEY_FILE etc., before options read the environment
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
    if "requires API key" in str(err):
        return "the server wants an API key: pass --api-key or set SCATTERBROKER_API_KEY"
    if isinstance(err, KeyError):
        key = err.args[0] if err.args else ""
        return f"no such node: {'/'.join(key) if isinstance(key, tuple) else key}"
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


@app.command("bench-client")
def bench_client(
    url: str = typer.Argument(..., help="Server URL, e.g. http://beamline-srv:8000"),
    node: str = typer.Argument(..., help="Array node, e.g. raw/p1/s1/scan1/frames"),
    api_key: Optional[str] = API_KEY,
    frames: int = typer.Option(20, "--frames", help="Random single frames to time, one after the other."),
    max_mb: float = typer.Option(1024, "--max-mb", help="Size of the throughput read (leading frames), MB."),
    compare: bool = typer.Option(True, "--compare/--no-compare", help="Also time Tiled's standard endpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
) -> None:
    """Your frame latency and MB/s to your server, for one array node."""
    import json as json_

    from scatterbroker.clients.fast_array import bench

    client = _client(url, api_key)
    result = bench(client[node], frames=frames, max_bytes=int(max_mb * 1e6), compare=compare)
    if as_json:
        print(json_.dumps(result))
        return
    console = _console()
    route = "fast route" if result["fast_route"] else "Tiled's standard endpoints (no fast route)"
    console.print(f"[bold]{node}[/] {tuple(result['shape'])} {result['dtype']}: {result['client']}, {route}"
                  + (f", {result['transport']}, codec {result['codec']}" if result["fast_route"] else ""))
    mb = result["frame_bytes"] / 1e6
    console.print(f"  one frame ({mb:.2f} MB): first {result['first_frame_ms']:.1f} ms, "
                  f"median {result['frame_ms_median']:.1f} ms, p90 {result['frame_ms_p90']:.1f} ms "
                  f"over {frames} random frames ({result['frame_MBps']:.0f} MB/s)")
    slab = result["slab"]
    console.print(f"  {slab['items']} frames at once ({slab['MB']:.0f} MB): {slab['s']:.2f} s, "
                  f"{slab['MBps']:.0f} MB/s (first time in this process: {slab['first_s']:.2f} s, "
                  f"{slab['first_MBps']:.0f} MB/s, including the OS providing fresh memory)")
    if "tiled_frame_ms_median" in result:
        console.print(f"  one frame through Tiled's /array/full: median {result['tiled_frame_ms_median']:.1f} ms")
