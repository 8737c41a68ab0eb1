"""HTTP for instrument computers (`ccat-dt serve`): FastAPI on uvicorn, behind a TLS proxy.

(No `from __future__ import annotations`: FastAPI reads the dependency annotations of the
endpoints defined inside `create_app` at run time.)

Endpoints follow the original ops-db-api. Every error is `{"detail": message, "errors":
[{"field": ..., "message": ...}]}` with a 4xx status; a rejected request changes nothing.
"""


from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from ccat_dt.config import Config
from ccat_dt.filing import FileSpec, FilingError
from ccat_dt.service.core import Ack, AuthError, Contended, FilingService, JournalUnavailable
from ccat_dt.service.tokens import TokenInfo

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StartRequest(_Body):
    name: str = Field(description="observation name, e.g. obs-0042")
    uuid: str | None = Field(default=None, description="the uuid to give it (default: new)")
    request_id: str | None = Field(default=None, max_length=64,
                                   description="reuse on retries: the request applies once")


class FinishRequest(_Body):
    request_id: str | None = Field(default=None, max_length=64)


class FileItem(_Body):
    path: str = Field(description="relative to the source location's root")
    size: int | None = Field(default=None, ge=0)
    checksum: str | None = Field(default=None, description="xxh3-128, 32 hex digits")
    uuid: str | None = None


class FileRequest(FileItem):
    observation: str
    module: str = Field(description="instrument/module, e.g. primecam/f280")
    site: str | None = None
    location: str | None = None
    request_id: str | None = Field(default=None, max_length=64)


class BulkRequest(_Body):
    observation: str
    module: str
    site: str | None = None
    location: str | None = None
    request_id: str | None = Field(default=None, max_length=64)
    files: list[FileItem] = Field(min_length=1)


def _error(status: int, detail: str, errors: list[tuple[str, str]],
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail,
                         "errors": [{"field": f, "message": m} for f, m in errors]},
                        status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [p for p in loc if p != "body"]
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text.lstrip(".") or "body"


class BodyLimit:
    """413 for a body over the limit, before any of it is parsed (uvicorn sets none)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, total, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            more = message.get("more_body", False)
            if total > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        body, sent = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = _error(413, f"request body larger than {self.max_bytes} bytes "
                          "(service.max_body_bytes); split the files over several requests",
                          [("body", "too large")])
        await response(scope, receive, send)


def create_app(service: FilingService) -> FastAPI:
    settings = service.config.settings.service

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        yield
        service.stop()

    app = FastAPI(title="CCAT filing service", lifespan=lifespan,
                  description=f"Files observations and raw files at site '{service.site}'. "
                  "Writes need `Authorization: Bearer TOKEN`; while OpsDB is out of reach they "
                  "are journaled and acknowledged with 202.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    bearer = HTTPBearer(auto_error=False)

    @app.exception_handler(FilingError)
    async def filing_error(_: Request, exc: FilingError) -> JSONResponse:
        return _error(409 if exc.conflict else 422, str(exc), exc.fields or [("body", str(exc))])

    @app.exception_handler(JournalUnavailable)
    async def journal_unavailable(_: Request, exc: JournalUnavailable) -> JSONResponse:
        return _error(503, str(exc), [("body", "not stored")], {"Retry-After": "5"})

    @app.exception_handler(Contended)
    async def contended(_: Request, exc: Contended) -> JSONResponse:
        # a read OpsDB did not answer for a lock another session holds: not "not found"
        return _error(503, f"OpsDB busy: {exc}; retry", [("body", "OpsDB busy")],
                      {"Retry-After": "5"})

    @app.exception_handler(AuthError)
    async def auth_error(_: Request, exc: AuthError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, str(exc), [(exc.field, str(exc))], headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = list(exc.errors())
        if any(p.get("type") == "json_invalid" for p in problems):
            error = (problems[0].get("ctx") or {}).get("error", "")
            return _error(400, f"body is not valid JSON: {error}", [("body", "malformed JSON")])
        errors = [(_field(tuple(p["loc"])), str(p["msg"])) for p in problems]
        return _error(422, "; ".join(f"{f}: {m}" for f, m in errors[:20]), errors)

    def writer(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                      Depends(bearer)]) -> TokenInfo:
        return service.authenticate(credentials.credentials if credentials else None)

    def reader(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                      Depends(bearer)]) -> None:
        if not settings.public_reads:
            service.authenticate(credentials.credentials if credentials else None)

    Writer = Annotated[TokenInfo, Depends(writer)]

    def answer(ack: Ack) -> JSONResponse:
        return JSONResponse(ack.body, status_code=ack.status)

    def found(body: dict[str, Any] | None, what: str, key: str) -> JSONResponse:
        if body is None:
            hint = "" if service.reachable else " (OpsDB is unreachable; only buffered requests " \
                                                "are visible)"
            return _error(404, f"no {what} '{key}'{hint}", [(what, "not found")])
        return JSONResponse(body)

    @app.post("/executed_obs_units/start", status_code=201,
              responses={200: {"description": "open already (status 'already open', its "
                                              "uuid): nothing changed"},
                         202: {"description": "journaled; applied when OpsDB is reachable"}})
    def start(body: StartRequest, token: Writer) -> JSONResponse:
        """Start (open) an observation; idempotent while it is open: 201 when this request
        opened it, 200 with status 'already open' when it was open already."""
        return answer(service.start_observation(token, body.name, body.uuid, body.request_id))

    @app.put("/executed_obs_units/{name}/finish", status_code=201,
             responses={200: {"description": "finished already (status 'already finished', "
                                             "its finished_at): nothing changed"}})
    def finish(name: str, token: Writer, body: FinishRequest | None = None) -> JSONResponse:
        """Finish an observation: after the files filed before it, none can be added. 201
        when this request finished it, 200 'already finished' when it was finished already."""
        return answer(service.finish_observation(token, name,
                                                 body.request_id if body else None))

    @app.post("/raw_data_files", status_code=201)
    def file_one(body: FileRequest, token: Writer) -> JSONResponse:
        """File one raw file (the service computes its checksum and checks a declared one)."""
        spec = FileSpec(body.path, body.size, body.checksum, body.uuid)
        return answer(service.file(token, observation=body.observation, module=body.module,
                                   files=[spec], site=body.site, location=body.location,
                                   request_id=body.request_id))

    @app.post("/raw_data_files/bulk", status_code=201)
    def file_many(body: BulkRequest, token: Writer) -> JSONResponse:
        """File many raw files of one observation x module, all or none."""
        specs = [FileSpec(f.path, f.size, f.checksum, f.uuid) for f in body.files]
        return answer(service.file(token, observation=body.observation, module=body.module,
                                   files=specs, site=body.site, location=body.location,
                                   request_id=body.request_id))

    @app.get("/executed_obs_units/{name}", dependencies=[Depends(reader)])
    def observation(name: str) -> JSONResponse:
        """An observation as OpsDB has it, merged with requests still in the journal."""
        return found(service.observation(name), "observation", name)

    @app.get("/raw_data_files/{uuid}", dependencies=[Depends(reader)])
    def raw_file(uuid: str) -> JSONResponse:
        """A raw file: size, checksum, package and copies (or its journaled request)."""
        return found(service.raw_file(uuid), "raw_data_file", uuid)

    @app.get("/raw_data_packages/{name}", dependencies=[Depends(reader)])
    def package(name: str) -> JSONResponse:
        """A package: state, checksum and where its copies are."""
        return found(service.package(name), "raw_data_package", name)

    @app.get("/health", dependencies=[Depends(reader)])
    def health() -> JSONResponse:
        """OpsDB reachable?, journal depth and age of its oldest entry, dead letters."""
        return JSONResponse(service.health())

    return app


def serve(config: Config, *, host: str, port: int, site: str | None = None,
          journal: str | None = None, log_level: str = "info") -> None:
    """Run the service in the foreground until SIGTERM/SIGINT."""
    import uvicorn

    app = create_app(FilingService(config, site=site, journal_path=journal))
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=True,
                timeout_graceful_shutdown=10)

