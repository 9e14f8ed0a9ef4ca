"""Settings shared by every service, and the one way services load and validate them."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Annotated, ClassVar, Literal, TypeVar

from pydantic import AfterValidator, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from eventaudit.http import parse_listen_address

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


def _listen_address(value: str) -> str:
    parse_listen_address(value)
    return value


ListenAddress = Annotated[str, AfterValidator(_listen_address)]
""" `HOST:PORT`, checked at start-up with every other setting."""


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


S = TypeVar("S", bound=CommonSettings)


def load_settings(cls: type[S], argv: Sequence[str] | None = None) -> S:
    """Parse flags and environment into `cls`; report every invalid value and exit 1."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return cls(_cli_parse_args=args, _cli_prog_name=cls.prog)
    except ValidationError as exc:
        print(f"{cls.__name__}: {exc.error_count()} invalid setting(s):", file=sys.stderr)
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"  --{where.replace('_', '-')}: {err['msg']}", file=sys.stderr)
        raise SystemExit(1) from None


def configure_logging(level: str) -> None:
    """One format for every service: time, level, logger, message."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
