"""Settings shared by every service, and the one way services load and validate them."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict
from pymongo.errors import PyMongoError
from pymongo.uri_parser_shared import _validate_uri

from eventaudit.serving import ServerLimits, parse_listen_address

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _listen_address(value: str) -> str:
    parse_listen_address(value)
    return value


ListenAddress = Annotated[str, AfterValidator(_listen_address)]
""" `HOST:PORT`, checked at start-up with every other setting."""


def validate_mongo_uri(uri: str) -> str:
    """Check a MongoDB URI's syntax and options without any network or DNS lookup; the
    ValueError's text never contains any part of the URI's user name or password."""
    # A URI is printable ASCII (RFC 3986: anything else percent-encoded); pymongo itself would
    # read a port written in fullwidth or Arabic-Indic digits as that number.
    if not uri.isascii() or any(c.isspace() or not c.isprintable() for c in uri):
        raise ValueError(
            "MongoDB URI must be printable ASCII without spaces (percent-encode the rest)"
        )
    try:
        # parse_uri() would resolve a mongodb+srv:// host in DNS; this is its syntax check.
        _validate_uri(uri)
    except (PyMongoError, ValueError):
        raise ValueError(f"invalid MongoDB URI: {_reason_without_credentials(uri)}") from None
    return uri


_BAD_CREDENTIALS = (
    "the user name or password is malformed: the user name must not be empty, and both must "
    "be percent-encoded (urllib.parse.quote_plus): ':', '/', '?', '#', '[', ']', '@' and '%' "
    "in them are read as URI syntax"
)


def _reason_without_credentials(uri: str) -> str:
    """Why pymongo rejects `uri`, in words that hold no part of its credentials.

    pymongo quotes pieces of the URI in its errors, and a password with an unescaped '/' or
    '?' moves its tail into the database name or the options it quotes (`Bad database name
    "et@host/"`). So the reason comes from the URI with everything between `://` and the last
    '@' (the most the credentials can span) replaced by a placeholder; when that URI is valid,
    the fault is in the credentials.
    """
    scheme, sep, rest = uri.partition("://")
    at = rest.rfind("@")
    checked = f"{scheme}://user:password@{rest[at + 1 :]}" if sep and at >= 0 else uri
    try:
        _validate_uri(checked)
    except (PyMongoError, ValueError) as exc:
        return str(exc)
    return _BAD_CREDENTIALS


# Numbers as people type them in ASCII, matched whole: no sign, exponent, `_`, `nan` or `inf`,
# and no other script's digits (pydantic alone reads ' 8', '8.0', '3_0' and '1e1').
_WHOLE_NUMBER = re.compile(r"[0-9]{1,18}")
_DECIMAL_NUMBER = re.compile(r"[0-9]{1,15}(?:\.[0-9]{1,15})?")
# A Google Cloud project id (6 to 30 of a-z 0-9 -, a letter first, no hyphen last), or a
# legacy domain-scoped one (`example.com:my-project`).
_PROJECT_ID = re.compile(r"(?:[a-z0-9][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
# A database name both MongoDB (no `/\. "$`, under 64 bytes) and FerretDB accept.
_DATABASE = re.compile(r"[A-Za-z0-9_-]{1,63}")
_UNPRINTABLE = "must be printable, without control characters or surrounding whitespace"


def text_problem(value: str) -> str | None:
    """Why a setting's text cannot be taken as typed (a newline, a tab, an escape, surrounding
    whitespace), or None. Never quotes the value (it may be a URI with a password)."""
    if value != value.strip() or not value.isprintable():
        return _UNPRINTABLE
    return None


def split_list(text: str) -> list[str]:
    """Items of a comma-separated setting, spaces around them dropped; "" is no items.
    ValueError for an empty item (`a,,b`, a trailing comma): a typo, not a shorter list."""
    if not text:
        return []
    items = [part.strip(" ") for part in text.split(",")]
    if "" in items:
        raise ValueError("empty item in the comma-separated list")
    return items


class CommonSettings(BaseSettings):
    """Store, Pub/Sub project and logging: what every eventaudit process needs.

    Every field is also an environment variable `EVENTAUDIT_<NAME>` and a flag `--<name>`
    (underscores become dashes); flags win over the environment.
    """

    model_config = SettingsConfigDict(
        env_prefix="EVENTAUDIT_",
        frozen=True,
        extra="forbid",
        cli_kebab_case=True,
        cli_implicit_flags=True,
    )

    prog: ClassVar[str] = "eventaudit"

    mongo_uri: str = Field(
        "mongodb://127.0.0.1:27017/", description="MongoDB URI of the audit store"
    )
    database: str = Field("eventaudit", min_length=1, description="audit database name")
    project: str = Field("eventaudit-local", min_length=1, description="Google Cloud project id")
    store_timeout_seconds: float = Field(5.0, gt=0, le=120, description="store operation timeout")
    log_level: LogLevel = Field("INFO", description="log level")
    shutdown_timeout_seconds: float = Field(
        20.0,
        gt=0,
        le=600,
        description="longest stop on SIGTERM/SIGINT (requests in progress, then buffered records)",
    )
    http_connection_limit: int = Field(
        1000, ge=1, le=100_000, description="open HTTP connections; more wait in the backlog"
    )
    http_request_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="longest time to receive one request (else 408)"
    )
    http_idle_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="an HTTP connection idle this long is closed"
    )

    @field_validator("*", mode="before")
    @classmethod
    def _as_typed(cls, value: Any, info: ValidationInfo) -> Any:
        # Every setting from a flag or the environment arrives as text: take it only as typed.
        if not isinstance(value, str) or info.field_name is None:
            return value
        problem = text_problem(value)
        if problem is not None:
            raise ValueError(problem)
        annotation = cls.model_fields[info.field_name].annotation
        if annotation is int and not _WHOLE_NUMBER.fullmatch(value):
            raise ValueError("must be a whole number in ASCII digits, like 8")
        if annotation is float and not _DECIMAL_NUMBER.fullmatch(value):
            raise ValueError("must be a number in ASCII digits, like 8 or 2.5")
        return value

    @field_validator("mongo_uri")
    @classmethod
    def _mongo_uri(cls, value: str) -> str:
        return validate_mongo_uri(value)

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        if not _PROJECT_ID.fullmatch(value):
            raise ValueError(
                "not a Google Cloud project id (6 to 30 of a-z 0-9 -, starting with a letter)"
            )
        return value

    @field_validator("database")
    @classmethod
    def _database(cls, value: str) -> str:
        if not _DATABASE.fullmatch(value):
            raise ValueError("a database name is 1 to 63 of A-Z a-z 0-9 _ -")
        return value

    @model_validator(mode="after")
    def _shutdown_fits_a_store_write(self) -> CommonSettings:
        if self.shutdown_timeout_seconds <= self.store_timeout_seconds:
            raise ValueError(
                "shutdown-timeout-seconds must exceed store-timeout-seconds "
                "(stopping may wait out one store write)"
            )
        return self

    def server_limits(self, threads: int, max_body_bytes: int = 65_536) -> ServerLimits:
        """The HTTP server's limits from these settings."""
        return ServerLimits(
            threads=threads,
            connection_limit=self.http_connection_limit,
            request_timeout_seconds=self.http_request_timeout_seconds,
            idle_timeout_seconds=self.http_idle_timeout_seconds,
            max_body_bytes=max_body_bytes,
        )


S = TypeVar("S", bound=CommonSettings)


def _flag_values(args: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(flag, value) of each value in `args`, as typed: `--flag=value` and `--flag value`."""
    flag = None
    for arg in args:
        if arg.startswith("--"):
            flag, sep, value = arg.partition("=")
            if sep:
                yield flag.lower(), value
                flag = None
        elif flag is not None:
            yield flag.lower(), arg
            flag = None


def load_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Parse flags and environment into `cls`; report every invalid value and exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    # pydantic-settings cuts `--flag=value` at a newline (`value\nmore` is read as `value`):
    # the values are checked as typed here, before it parses them.
    problems = {flag: p for flag, value in _flag_values(args) if (p := text_problem(value))}
    errors = [(flag, f"Value error, {problem}") for flag, problem in problems.items()]
    try:
        settings = cls(_cli_parse_args=args, _cli_prog_name=cls.prog)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            flag = "--" + where.replace("_", "-")
            if flag not in problems:
                errors.append((flag, err["msg"]))
    else:
        if not errors:
            return settings
    print(f"{cls.__name__}: {len(errors)} invalid setting(s):", file=sys.stderr)
    for flag, msg in errors:
        print(f"  {flag}: {msg}", file=sys.stderr)
    raise SystemExit(1) from None


def configure_logging(level: str) -> None:
    """One format for every service: time, level, logger, message."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
