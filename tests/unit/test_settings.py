"""Settings validation: every bad value reported at start-up, exit 1."""

from __future__ import annotations

import re

import pytest

from eventaudit.exporter.config import ExporterSettings
from eventaudit.publisher.config import PublisherSettings
from eventaudit.settings import load_settings
from eventaudit.subscriber.config import SubscriberSettings


def test_exporter_defaults() -> None:
    s = load_settings(ExporterSettings, [])
    assert [w.label for w in s.window_list] == ["1m", "5m", "1h"]
    assert s.settle_delta.total_seconds() == 30 and s.bucket_delta.total_seconds() == 10
    assert s.expected_map == {"create-user": set()}
    assert (s.missed_concurrency, s.threads) == (2, 8)
    assert load_settings(ExporterSettings, ["--missed-concurrency", "7"]).missed_concurrency == 7


def test_exporter_pairs_and_flags() -> None:
    s = load_settings(
        ExporterSettings,
        [
            "--expected-subscriptions", "t-1:sub-a,t-1:sub-b,t-2:sub-c",
            "--excluded-subscriptions", "t-1:dead",
            "--topics", "t-1",
            "--no-list-subscriptions",
        ],
    )  # fmt: skip
    assert s.expected_map == {"t-1": {"sub-a", "sub-b"}, "t-2": {"sub-c"}}
    assert s.excluded_set == {("t-1", "dead")}
    assert s.list_subscriptions is False


def test_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EVENTAUDIT_DATABASE", "from_env")
    assert load_settings(ExporterSettings, []).database == "from_env"
    assert load_settings(ExporterSettings, ["--database", "from_flag"]).database == "from_flag"


@pytest.mark.parametrize(
    ("argv", "reported"),
    [
        (["--windows", "15s"], "whole number"),
        (["--settle-delay", "soon"], "duration"),
        (["--expected-subscriptions", "no-colon"], "TOPIC:SUBSCRIPTION"),
        (["--retention", "1m"], "retention must cover"),
        (["--windows", "1m,1m"], "duplicate window"),
        # Durations that overflow datetime arithmetic are start-up errors, not a dead thread.
        (["--retention", "9999999d"], "duration"),
        (["--retention", "3651d"], "duration"),
        (["--settle-delay", "9999999d"], "duration"),
        (["--bucket", "9999999h"], "duration"),
        (["--windows", "1m,9999999d"], "duration"),
        (["--retention", "7d\n"], "must be printable"),
        (["--retention", "\u0667d"], "duration"),
        (["--settle-delay", "1 m"], "duration"),
        (["--bucket", "10s\n"], "must be printable"),
        (["--settle-delay", "\u00b2s"], "duration"),
        (["--windows", "1m,\uff15m"], "duration"),
        # Retention covers the longest window, the settle delay and one more bucket.
        (
            ["--windows", "1h", "--settle-delay", "30s", "--bucket", "10s", "--retention", "3639s"],
            "retention must cover",
        ),
        # Topic leases: at least 3 buckets (each evaluation renews), at most 600 s; a replica
        # id is ASCII letters, digits and . _ : -, 128 at most.
        (["--lease-seconds", "29"], "at least 3 buckets"),
        (["--lease-seconds", "601"], "--lease-seconds"),
        (["--lease-seconds", "\u0663\u0660"], "--lease-seconds"),
        (["--lease-seconds", "nan"], "--lease-seconds"),
        (["--lease-seconds", "1e400"], "--lease-seconds"),
        (["--replica-id", "r0\n"], "must be printable"),
        (["--replica-id", "r\u0660"], "replica id"),
        (["--replica-id", "a b"], "replica id"),
        (["--replica-id", "r" * 129], "replica id"),
        (["--topics", "create-user\nx"], "must be printable"),
        (["--topics", "ab"], "Pub/Sub id"),
        (["--topics", "bad topic/x"], "Pub/Sub id"),
        (["--topics", "goog-topic"], "Pub/Sub id"),
        (["--expected-subscriptions", "t-1:bad sub"], "Pub/Sub id"),
        (["--excluded-subscriptions", "t-1\n:sub-1"], "must be printable"),
        (["--subscription-refresh-seconds", "inf"], "subscription-refresh-seconds"),
        (["--subscription-refresh-seconds", "nan"], "subscription-refresh-seconds"),
        (["--subscription-refresh-seconds", "1e12"], "subscription-refresh-seconds"),
        (["--listen-address", "9800"], "HOST:PORT"),
        (["--listen-address", "127.0.0.1:99999"], "HOST:PORT"),
        # Listings of missed events may never take every HTTP thread.
        (["--missed-concurrency", "0"], "missed-concurrency"),
        (["--missed-concurrency", "\u0662"], "missed-concurrency"),
        (["--missed-concurrency", "8"], "missed-concurrency must be less than --threads"),
        (["--threads", "2", "--missed-concurrency", "2"], "less than --threads (2)"),
        (["--threads", "1"], "missed-concurrency must be less than --threads"),
    ],
)
def test_exporter_invalid_values_exit_1(argv, reported, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(ExporterSettings, argv)
    assert exc.value.code == 1
    assert reported in capsys.readouterr().err


def test_the_removed_late_lookback_is_refused_not_ignored(capsys) -> None:
    # Gone with the journal: late records are folded whenever they are written.
    with pytest.raises(SystemExit) as exc:
        load_settings(ExporterSettings, ["--late-lookback", "60s"])
    assert exc.value.code == 2
    assert "unrecognized arguments: --late-lookback" in capsys.readouterr().err


def test_exporter_retention_boundary_is_window_plus_settle_plus_one_bucket() -> None:
    argv = ["--windows", "1m,1h", "--settle-delay", "30s", "--bucket", "10s"]
    s = load_settings(ExporterSettings, [*argv, "--retention", "3640s"])
    assert s.retention_delta.total_seconds() == 3600 + 30 + 10


def test_all_errors_reported_together(capsys) -> None:
    with pytest.raises(SystemExit):
        load_settings(PublisherSettings, ["--threads", "0", "--store-timeout-seconds", "-1"])
    err = capsys.readouterr().err
    assert "2 invalid setting(s)" in err
    assert "--threads" in err and "--store-timeout-seconds" in err


def test_subscriber_requires_subscription_and_valid_fraction(capsys) -> None:
    with pytest.raises(SystemExit):
        load_settings(SubscriberSettings, [])
    assert "--subscription" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(SubscriberSettings, ["--subscription", "abc", "--lose-fraction", "2"])
    assert "--lose-fraction" in capsys.readouterr().err
    s = load_settings(SubscriberSettings, ["--subscription", "abc", "--lose-fraction", "0.02"])
    assert s.lose_fraction == 0.02


@pytest.mark.parametrize("value", ["9", "601", "\u0661\u0660", "10.5", "-10", ""])
def test_subscriber_lease_extension_is_within_pubsubs_range(value: str, capsys) -> None:
    with pytest.raises(SystemExit):
        load_settings(
            SubscriberSettings, ["--subscription", "abc", "--lease-extension-seconds", value]
        )
    assert "--lease-extension-seconds" in capsys.readouterr().err


def test_subscriber_lease_extension_default_and_bounds() -> None:
    assert (
        load_settings(SubscriberSettings, ["--subscription", "abc"]).lease_extension_seconds == 10
    )
    for value in (10, 600):
        args = ["--subscription", "abc", "--lease-extension-seconds", str(value)]
        assert load_settings(SubscriberSettings, args).lease_extension_seconds == value


def test_unknown_flag_is_rejected() -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(ExporterSettings, ["--bogus", "1"])
    assert exc.value.code == 2


def test_help_names_the_command(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(ExporterSettings, ["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: python -m eventaudit.exporter")


@pytest.mark.parametrize(
    ("argv", "reported"),
    [
        (["--users-topic", "bad topic/x"], "--users-topic"),
        (["--users-topic", "goog-topic"], "--users-topic"),
        (["--users-topic", "ab"], "--users-topic"),
        (["--users-topic", "tópico"], "--users-topic"),
        (["--topics", "orders,bad topic"], "--topics"),
        (["--topics", "orders," + "t" * 256], "--topics"),
    ],
)
def test_publisher_topics_must_be_pubsub_ids(argv, reported, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(PublisherSettings, argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert reported in err
    assert "not a Pub/Sub topic id" in err


@pytest.mark.parametrize("threads", ["1", "0", "257", "\u0661\u0666", "\u00b2", "1e1"])
def test_publisher_threads_leave_one_for_health(threads: str, capsys) -> None:
    # Publishes take at most threads - 2 (at least 1): one thread must stay for /healthz.
    with pytest.raises(SystemExit) as exc:
        load_settings(PublisherSettings, ["--threads", threads])
    assert exc.value.code == 1
    assert "--threads" in capsys.readouterr().err


def test_publisher_topic_allow_list() -> None:
    assert load_settings(PublisherSettings, []).topic_allow_list == frozenset()
    s = load_settings(
        PublisherSettings, ["--topics", "orders, audit.events", "--users-topic", "u-1"]
    )
    assert s.topic_allow_list == {"orders", "audit.events"}
    assert s.users_topic == "u-1"


@pytest.mark.parametrize(
    "uri",
    [
        "notamongo://x",
        "mongodb://[bad",
        "mongodb://",
        "mongodb://h:99999",
        "mongodb://h:abc",
        "mongodb://h:８０",  # fullwidth digits  # noqa: RUF001
        "mongodb://h:2701\u0662",  # an Arabic-Indic digit
        "mongodb://h\n",
        "mongodb://h /db",
        "mongodb://h\x00/db",
        "mongodb://h/?foo=bar",
        "mongodb://h/db?tls=maybe",
        "mongodb://h/a b",
        "mongodb+srv://cluster.example.invalid:27017/",
        "mongodb+srv://a.example.invalid,b.example.invalid/",
        "mongodb://user:s3cr%t@h/",
        "mongodb://user:s3cret@[bad/",
        "mongodb://user:s3cret@h:99999/",
    ],
)
def test_invalid_mongo_uri_is_one_settings_error(uri: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(PublisherSettings, ["--mongo-uri", uri])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "1 invalid setting(s)" in err
    assert "--mongo-uri: Value error, " in err
    assert "s3cr" not in err  # the password is never printed


# Passwords as people write them, unescaped: each shape moves part of the credentials into
# what pymongo quotes in its errors (the database name, an option, a host).
PASSWORD_SHAPES = [
    "S3cr/Et9x",
    "S3cr/Et9x/Zq7w",
    "S3cr/Et9x.Col4",
    "S3cr/Et9x@More5",
    "S3cr@Et9x",
    "S3cr:Et9x",
    "S3cr?Et9x",
    "S3cr?Et9x=Val7",
    "S3cr/Et9x?Opt8=1",
    "S3cr#Et9x",
    "S3cr[Et9x]",
    "S3cr%2FEt9x",
    "S3cr%zzEt9x",
    "S3cr\u00e9Et9x",
    "S3cr\u0661Et9x",
    "77777/Et9x",
]
# Each is invalid whatever the password: a bad port, host, option or host list.
BROKEN_URIS = [
    "mongodb://Us3rX:{pw}@host:99999/",
    "mongodb://Us3rX:{pw}@[bad/",
    "mongodb://Us3rX:{pw}@host/db?tls=maybe",
    "mongodb://Us3rX:{pw}@h1,h2:x/",
    "mongodb+srv://Us3rX:{pw}@a.example.invalid,b.example.invalid/",
]


def _secrets(password: str) -> list[str]:
    """Every run of 3+ letters or digits of the user name and password, lower-cased."""
    return [t.lower() for t in re.split(r"[^A-Za-z0-9]+", f"Us3rX {password}") if len(t) >= 3]


def _assert_no_credentials(uri: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        load_settings(PublisherSettings, ["--mongo-uri", uri])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert "--mongo-uri: Value error, " in err
    leaked = [t for t in _secrets(uri.split("Us3rX:")[1].rpartition("@")[0]) if t in err.lower()]
    assert leaked == [], err
    return err


@pytest.mark.parametrize("password", PASSWORD_SHAPES)
@pytest.mark.parametrize("template", BROKEN_URIS)
def test_no_part_of_the_credentials_is_ever_printed(template: str, password: str, capsys) -> None:
    _assert_no_credentials(template.format(pw=password), capsys)


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("s3cr/et", "password is malformed"),  # was: Bad database name "et@host/"
        ("s3cr/et.coll", "password is malformed"),
        ("s3cr/et@more", "password is malformed"),
        ("s3cr?et", "password is malformed"),
        ("s3cr?et=x&w=1", "password is malformed"),  # was: Unknown option: et...
        ("s3cr@et", "password is malformed"),
        ("s3cr:et", "password is malformed"),
        ("s3cr%zzet", "password is malformed"),
        ("s3cr\u00e9t", "printable ASCII"),
    ],
)
def test_a_malformed_password_is_named_not_quoted(password: str, reason: str, capsys) -> None:
    err = _assert_no_credentials(f"mongodb://Us3rX:{password}@host/", capsys)
    assert reason in err


def test_a_malformed_uri_without_credentials_keeps_the_drivers_reason(capsys) -> None:
    with pytest.raises(SystemExit):
        load_settings(PublisherSettings, ["--mongo-uri", "mongodb://host/bad.db?tls=maybe"])
    assert "The value of tls must be 'true' or 'false'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(PublisherSettings, ["--mongo-uri", "mongodb://@host/"])
    assert "password is malformed" in capsys.readouterr().err


@pytest.mark.parametrize(
    "uri",
    [
        "mongodb://127.0.0.1:27017/",
        "mongodb://user:p%40ss@h1,h2:27018/db?replicaSet=rs&authSource=admin",
        "mongodb://[::1]:27017/",
        "mongodb+srv://cluster.example.invalid/db?retryWrites=true",
    ],
)
def test_valid_mongo_uri_is_accepted_without_any_lookup(
    uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import dns.resolver

    def no_lookup(*_: object, **__: object) -> None:
        raise AssertionError("settings validation must not look anything up")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    monkeypatch.setattr(dns.resolver, "resolve", no_lookup)
    monkeypatch.setattr(dns.resolver.Resolver, "resolve", no_lookup)
    assert load_settings(ExporterSettings, ["--mongo-uri", uri]).mongo_uri == uri


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1:８０", "host:0", "host:65536", "host:٨٠", "::1:80"],  # noqa: RUF001
)
@pytest.mark.parametrize("cls", [PublisherSettings, ExporterSettings])
def test_hostile_listen_addresses_are_settings_errors(cls, address: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(cls, ["--listen-address", address])
    assert exc.value.code == 1
    assert "--listen-address: Value error, listen address must be HOST:PORT" in (
        capsys.readouterr().err
    )


def test_ipv6_listen_address_is_accepted() -> None:
    assert load_settings(ExporterSettings, ["--listen-address", "[::1]:80"]).listen_address == (
        "[::1]:80"
    )


def test_shutdown_budget_must_exceed_one_store_timeout(capsys) -> None:
    with pytest.raises(SystemExit):
        load_settings(
            PublisherSettings,
            ["--shutdown-timeout-seconds", "5", "--store-timeout-seconds", "5"],
        )
    assert "shutdown-timeout-seconds must exceed store-timeout-seconds" in capsys.readouterr().err


def test_http_limits_come_from_the_settings() -> None:
    s = load_settings(
        PublisherSettings,
        [
            "--threads", "3",
            "--max-body-bytes", "2048",
            "--http-connection-limit", "50",
            "--http-request-timeout-seconds", "7.5",
            "--http-idle-timeout-seconds", "9",
        ],
    )  # fmt: skip
    limits = s.server_limits(s.threads, s.max_body_bytes)
    assert (
        limits.threads,
        limits.max_body_bytes,
        limits.connection_limit,
        limits.request_timeout_seconds,
        limits.idle_timeout_seconds,
    ) == (3, 2048, 50, 7.5, 9.0)
    assert s.shutdown_timeout_seconds == 20.0


E, P, S = ExporterSettings, PublisherSettings, SubscriberSettings
SUB = ["--subscription", "sub-1"]

# Every flag is parsed from a string (issue 18): taken only as typed, or refused with one line
# naming the flag. (settings, argv, flag reported)
HOSTILE_FLAG_STRINGS = [
    # numbers: ASCII digits matched whole
    (E, ["--threads", "8\n"], "--threads"),
    (E, ["--threads", " 8"], "--threads"),
    (E, ["--threads=8\n"], "--threads"),
    (E, ["--threads", "8.0"], "--threads"),
    (E, ["--threads", "+8"], "--threads"),
    (E, ["--lease-seconds", " 30"], "--lease-seconds"),
    (E, ["--lease-seconds", "3_0"], "--lease-seconds"),
    (E, ["--store-timeout-seconds", "5\n"], "--store-timeout-seconds"),
    (E, ["--http-connection-limit", "1000\t"], "--http-connection-limit"),
    (P, ["--max-body-bytes", "2048 "], "--max-body-bytes"),
    (P, ["--publish-timeout-seconds", "1e1"], "--publish-timeout-seconds"),
    (S, [*SUB, "--lose-fraction", " 0.5"], "--lose-fraction"),
    (S, [*SUB, "--batch-size=500\n"], "--batch-size"),
    # strings in --flag=value form: pydantic-settings cut them at the newline
    (E, ["--database=eventaudit\n"], "--database"),
    (E, ["--project=eventaudit-local\n"], "--project"),
    (E, ["--replica-id=r0\n"], "--replica-id"),
    (E, ["--windows=1m\n"], "--windows"),
    (E, ["--topics=create-user\nx"], "--topics"),
    (E, ["--bucket=10s\n"], "--bucket"),
    (E, ["--log-level=INFO\n"], "--log-level"),
    (E, ["--listen-address=127.0.0.1:9800\n"], "--listen-address"),
    (E, ["--mongo-uri=mongodb://h/\n"], "--mongo-uri"),
    (P, ["--users-topic=create-user\n"], "--users-topic"),
    (S, ["--subscription=sub-1\n"], "--subscription"),
    (E, ["--database", "audit\x1b[2J"], "--database"),
    (E, ["--listen-address", ":80\n"], "--listen-address"),
    (P, ["--listen-address", ":80\n"], "--listen-address"),
    (P, ["--users-topic", "create-user\n"], "--users-topic"),
    # what Pub/Sub, MongoDB and the leases would refuse later, or never
    (E, ["--project", "Bad Project"], "--project"),
    (E, ["--project", "ab"], "--project"),
    (E, ["--project", "my-project-"], "--project"),
    (E, ["--database", "d" * 200], "--database"),  # started, then every write failed
    (E, ["--database", "audit.db"], "--database"),
    (E, ["--database", "a b"], "--database"),
    (E, ["--replica-id", ""], "--replica-id"),
    (S, ["--subscription", "a b c"], "--subscription"),
    (S, ["--subscription", "goog-sub"], "--subscription"),
    (S, [*SUB, "--topic", ""], "--topic"),
    (S, [*SUB, "--topic", "bad topic"], "--topic"),
    # lists: an empty item is a typo, not a shorter list
    (E, ["--windows", "1m,,5m"], "--windows"),
    (E, ["--windows", "1m,5m,"], "--windows"),
    (E, ["--topics", "t-1,,t-2"], "--topics"),
    (E, ["--expected-subscriptions", "t-1:s-1,"], "--expected-subscriptions"),
    (P, ["--topics", " orders, audit.events ,"], "--topics"),
    (P, ["--topics", "orders,,audit"], "--topics"),
]


@pytest.mark.parametrize(("cls", "argv", "flag"), HOSTILE_FLAG_STRINGS)
def test_a_flag_is_taken_only_as_typed(cls, argv: list[str], flag: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        load_settings(cls, argv)
    assert exc.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"{cls.__name__}: 1 invalid setting(s):"
    assert len(lines) == 2 and lines[1].startswith(f"  {flag}: "), lines


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EVENTAUDIT_THREADS", "8\n"),
        ("EVENTAUDIT_DATABASE", "eventaudit\n"),
        ("EVENTAUDIT_REPLICA_ID", ""),
        ("EVENTAUDIT_PROJECT", "eventaudit-local "),
    ],
)
def test_the_environment_is_taken_only_as_typed(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exc:
        load_settings(ExporterSettings, [])
    assert exc.value.code == 1
    flag = "--" + name.removeprefix("EVENTAUDIT_").lower().replace("_", "-")
    assert capsys.readouterr().err.splitlines()[1].startswith(f"  {flag}: ")


def test_flags_typed_well_are_taken() -> None:
    s = load_settings(
        ExporterSettings,
        [
            "--threads=8", "--lease-seconds", "30.5", "--database=audit_1",
            "--project", "example.com:my-project", "--replica-id=r-0",
            "--windows", "1m, 5m", "--topics=",
        ],
    )  # fmt: skip
    assert (s.threads, s.lease_seconds, s.database, s.project, s.replica_id) == (
        8, 30.5, "audit_1", "example.com:my-project", "r-0"
    )  # fmt: skip
    assert ([w.label for w in s.window_list], s.expected_map) == (["1m", "5m"], {})
    assert load_settings(ExporterSettings, []).replica_id is None  # host-pid-random
    sub = load_settings(SubscriberSettings, ["--subscription=sub-1", "--topic", "t-1"])
    assert (sub.subscription, sub.topic) == ("sub-1", "t-1")
