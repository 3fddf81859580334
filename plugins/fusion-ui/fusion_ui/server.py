"""The web app (Starlette) and its server (uvicorn): JSON endpoints over the registry and the results DB.

Safe by default: binds a loopback address; every request must name a local ``Host`` (a page
from another site that rebinds its DNS name to 127.0.0.1 is refused); requests that do
work (``POST``) must come from this page's own origin with a JSON body; responses forbid
framing and load nothing from other origins.  Only registered component names are
accepted; no shell is ever run.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import socket
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fusion_core import FuseError

STATIC = Path(__file__).with_name("static")
LOCAL_NAMES = ("127.0.0.1", "localhost", "[::1]")
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
                               "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
SAFE_METHODS = ("GET", "HEAD")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: local ``Host`` only; ``POST`` only from our own origin with a JSON body."""

    def __init__(self, app, allowed_hosts: set[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts  # "127.0.0.1:8765", "localhost:8765", ...

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host", "")
        problem = None
        if host not in self.allowed_hosts:
            problem = f"refused: Host {host!r} is not this server's local address"
        elif scope["method"] not in SAFE_METHODS:
            origin = headers.get("origin")
            if origin is None or origin.removeprefix("http://") not in self.allowed_hosts:
                problem = f"refused: Origin {origin!r} is not this page"
            elif not headers.get("content-type", "").startswith("application/json"):
                problem = "refused: requests that do work must send JSON"
        if problem:
            response = JSONResponse({"ok": False, "error": problem}, status_code=403)
            return await response(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def allowed_hosts_for(host: str, port: int) -> set[str]:
    names = set(LOCAL_NAMES) if is_loopback(host) else {host, *LOCAL_NAMES}
    if ":" in host and not host.startswith("["):
        names.add(f"[{host}]")
    return {f"{name}:{port}" for name in names} | ({f"{name}" for name in names} if port == 80 else set())


def create_app(pm, registry, *, db_path: str, allowed_hosts: set[str], allow_runs: bool = True, runs_dir: str = "runs"):
    """The ASGI app; ``allowed_hosts`` are the ``Host`` header values accepted (``name:port``).

    ``allow_runs``: the page may start ``fuse run`` (only when served on a loopback address).
    ``runs_dir``: where the reports of ``fuse run`` are listed from (``runs/<name>/report.json``).
    """
    from . import store
    from .catalog import catalog
    from .compose import compose, dry_run
    from .runner import Runner

    cached_catalog = catalog(registry)
    runner = Runner()

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError as exc:
            raise FuseError(f"request body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise FuseError("request body must be a JSON object")
        return data

    def failing(fn):
        async def endpoint(request: Request):
            try:
                return JSONResponse(await fn(request))
            except FuseError as exc:
                return JSONResponse({"ok": False, "error": str(exc)}, status_code=400)

        return endpoint

    async def index(request: Request):
        return FileResponse(STATIC / "index.html")

    async def get_catalog(request: Request):
        return {**cached_catalog, "db": db_path, "runs": allow_runs}

    def _runs_allowed():
        if not allow_runs:
            raise FuseError("runs can be started only from a page served on 127.0.0.1 (fuse ui without --allow-remote)")

    async def post_run(request: Request):
        _runs_allowed()
        composed = compose(await body(request), registry)
        if composed.config is None:
            raise FuseError(composed.error or "the config is not valid")
        return runner.start(composed.overrides)

    async def post_stop(request: Request):
        _runs_allowed()
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(runner.stop)

    async def get_run_status(request: Request):
        try:
            since = max(0, int(request.query_params.get("since", "0")))
        except ValueError:
            since = 0
        return runner.status(since)

    async def post_compose(request: Request):
        return compose(await body(request), registry).to_json(registry)

    async def post_dry_run(request: Request):
        from starlette.concurrency import run_in_threadpool

        state = await body(request)
        return await run_in_threadpool(dry_run, state, registry, pm)

    def _seed(text: str | None) -> int | None:
        if text in (None, ""):
            return None
        try:
            return int(text)
        except ValueError:
            raise FuseError(f"seed must be an integer, got {text!r}") from None

    async def get_results(request: Request):
        q = request.query_params
        return store.results(db_path, benchmark=q.get("benchmark") or None, method=q.get("method") or None,
                             seed=_seed(q.get("seed")))

    async def get_run(request: Request):
        return store.run_record(db_path, request.query_params.get("id", ""))

    async def get_reports(request: Request):
        return {"runs_dir": runs_dir, "reports": store.reports(runs_dir)}

    async def get_report(request: Request):
        return store.report_record(runs_dir, request.query_params.get("name", ""))

    async def get_diff(request: Request):
        q = request.query_params
        return store.diff(db_path, q.get("a", ""), q.get("b", ""))

    routes = [
        Route("/", index),
        Route("/api/catalog", failing(get_catalog)),
        Route("/api/compose", failing(post_compose), methods=["POST"]),
        Route("/api/dry-run", failing(post_dry_run), methods=["POST"]),
        Route("/api/runs/start", failing(post_run), methods=["POST"]),
        Route("/api/runs/stop", failing(post_stop), methods=["POST"]),
        Route("/api/runs/status", failing(get_run_status)),
        Route("/api/results", failing(get_results)),
        Route("/api/run", failing(get_run)),
        Route("/api/diff", failing(get_diff)),
        Route("/api/reports", failing(get_reports)),
        Route("/api/report", failing(get_report)),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        runner.shutdown()  # Ctrl-C on `fuse ui` also stops a run started from the page

    app = Starlette(routes=routes, lifespan=lifespan)

    async def not_found(request, exc):
        return Response("not found", status_code=404)

    app.add_exception_handler(404, not_found)
    return Guard(app, allowed_hosts)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (``port`` 0: a free one); one clear error when the address cannot be bound."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise FuseError(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --port (0 picks a free one)") from None
    sock.listen(64)
    sock.set_inheritable(True)
    return sock


def serve(pm, registry, *, host: str, port: int, db_path: str, allow_remote: bool = False,
          open_browser: bool = False, runs_dir: str = "runs") -> None:
    """Serve the page until Ctrl-C; prints the URL first."""
    import uvicorn

    if not is_loopback(host) and not allow_remote:
        raise FuseError(f"--host {host} is not a loopback address: anyone who can reach it could use the page; "
                        "use 127.0.0.1, or add --allow-remote on a trusted network")
    sock = bind(host, port)
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    url = f"http://{shown}:{port}/"
    app = create_app(pm, registry, db_path=db_path, allowed_hosts=allowed_hosts_for(host, port), allow_runs=is_loopback(host),
                     runs_dir=runs_dir)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    print(f"fuse ui: {url}  (results: {db_path}; Ctrl-C stops)", flush=True)
    if open_browser:
        import threading
        import webbrowser

        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    server.run(sockets=[sock])
