"""Pure parts of the container lifecycle: signals, times, logs, health state, records."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import pytest

from lstore.cli_runner import parse_duration
from lstore.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from lstore.runner import containers, limits
from lstore.runner.containers import Container
from lstore.runner.health import (
    HEALTHY,
    STARTING,
    UNHEALTHY,
    HealthConfig,
    apply_result,
    health_config,
    initial_state,
)
from lstore.runner.lifecycle import parse_signal
from lstore.runner.logs import MAX_LINE, LogWriter, read_entries
from lstore.store.meta import Meta


@pytest.mark.parametrize("text, number", [
    ("SIGUSR1", signal.SIGUSR1), ("USR1", signal.SIGUSR1), ("usr1", signal.SIGUSR1),
    ("10", 10), ("SIGTERM", 15), ("KILL", 9), (9, 9),
])
def test_parse_signal_accepts_docker_forms(text: str, number: int) -> None:
    assert parse_signal(text) == number


@pytest.mark.parametrize("text", ["", "SIGNOPE", "0", "999", "SIG_DFL", "-1"])
def test_parse_signal_rejects_unknown(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_signal(text)


@pytest.mark.parametrize("text, seconds", [
    ("30s", 30.0), ("1m30s", 90.0), ("500ms", 0.5), ("2", 2.0), ("1.5", 1.5), ("1h", 3600.0),
])
def test_parse_duration_go_forms(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "s", "10x", "1m30", "abc"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        parse_duration(text)


HOST_CPUS = len(os.sched_getaffinity(0))


@pytest.mark.parametrize("parse, text, value", [
    (limits.parse_memory, "0", None),
    (limits.parse_memory, "6m", 6 << 20),
    (limits.parse_memory, "1g", 1 << 30),
    (limits.parse_cpus, "0.01", 0.01),
    (limits.parse_cpus, str(HOST_CPUS), float(HOST_CPUS)),
    (limits.parse_cpu_quota, "1000", 1000),
    (limits.parse_cpu_quota, "0", None),
    (limits.parse_cpu_quota, "-1", None),
    (limits.parse_cpu_period, "1000000", 1_000_000),
    (limits.parse_cpu_period, "0", None),
    (limits.parse_pids_limit, "64", 64),
    (limits.parse_pids_limit, "0", None),
    (limits.parse_pids_limit, "-1", None),
    (limits.parse_memory, None, None),
])
def test_limits_parse_docker_values(parse, text: str | None, value: object) -> None:
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, message", [
    (limits.parse_memory, "1k", "minimum memory limit allowed is 6MB"),
    (limits.parse_memory, "6291455b", "minimum memory limit allowed is 6MB"),
    (limits.parse_memory, "junk", "invalid --memory 'junk'"),
    (limits.parse_cpus, "0", f"from 0.01 to {HOST_CPUS}.00"),
    (limits.parse_cpus, "-1", f"only {HOST_CPUS} CPUs available"),
    (limits.parse_cpus, str(HOST_CPUS + 1), f"only {HOST_CPUS} CPUs available"),
    (limits.parse_cpus, "nan", "range of CPUs"),
    (limits.parse_cpus, "many", "invalid --cpus 'many'"),
    (limits.parse_cpu_quota, "999", "cannot be less than 1ms"),
    (limits.parse_cpu_quota, "1ms", "invalid --cpu-quota '1ms': expected an integer"),
    (limits.parse_cpu_period, "999", "from 1ms to 1s"),
    (limits.parse_cpu_period, "1000001", "from 1ms to 1s"),
    (limits.parse_pids_limit, "x", "invalid --pids-limit 'x'"),
])
def test_limits_reject_out_of_range(parse, text: str, message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        parse(text)


def test_rfc3339_nano_trims_zeros_like_go() -> None:
    assert containers.rfc3339_nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    assert containers.rfc3339_nano(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    assert containers.rfc3339_nano(1_700_000_000_000_000_001) == (
        "2023-11-14T22:13:20.000000001Z")


def test_parse_rfc3339_inverts_format() -> None:
    text = containers.rfc3339_nano(1_700_000_000_250_000_000)
    assert containers.parse_rfc3339(text) == pytest.approx(1_700_000_000.25)


def test_log_writer_splits_lines_and_keeps_newlines(tmp_path) -> None:
    path = str(tmp_path / "log")
    writer = LogWriter(path)
    writer.write("stdout", b"one\ntw")
    writer.write("stderr", b"err\n")
    writer.write("stdout", b"o\nrest")
    writer.close()

    entries = list(read_entries(path))
    assert [(e["stream"], e["log"]) for e in entries] == [
        ("stdout", "one\n"), ("stderr", "err\n"), ("stdout", "two\n"), ("stdout", "rest")]
    assert all(e["time"].endswith("Z") for e in entries)


def test_log_writer_splits_long_lines(tmp_path) -> None:
    path = str(tmp_path / "log")
    writer = LogWriter(path)
    writer.write("stdout", b"x" * (MAX_LINE * 2 + 5) + b"\n")
    writer.close()

    sizes = [len(e["log"]) for e in read_entries(path)]
    assert sizes == [MAX_LINE, MAX_LINE, 6]


def test_log_lines_are_docker_json(tmp_path) -> None:
    path = str(tmp_path / "log")
    writer = LogWriter(path)
    writer.write("stdout", "grüße\n".encode())
    writer.close()

    with open(path) as handle:
        entry = json.loads(handle.readline())
    assert set(entry) == {"log", "stream", "time"}
    assert entry["log"] == "grüße\n"


def test_follow_reads_entries_written_before_finish(tmp_path) -> None:
    path = str(tmp_path / "log")
    writer = LogWriter(path)
    done = threading.Event()

    def produce() -> None:
        for index in range(5):
            writer.write("stdout", f"line {index}\n".encode())
            time.sleep(0.02)
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    lines = [e["log"] for e in read_entries(path, follow=True, finished=done.is_set)]
    thread.join()
    assert lines == [f"line {index}\n" for index in range(5)]


def test_health_config_from_image_and_flags() -> None:
    image_check = {"Test": ["CMD", "true"], "Interval": 5_000_000_000, "Retries": 2}
    assert health_config(image_check, {}) == HealthConfig(["true"], 5.0, 30.0, 0.0, 2)

    flags = {"health_cmd": "test -f /ok", "health_interval": 0.5}
    config = health_config(image_check, flags)
    assert config is not None
    assert config.args == ["/bin/sh", "-c", "test -f /ok"]
    assert config.interval == 0.5


def test_health_config_none_disables() -> None:
    assert health_config({"Test": ["NONE"]}, {}) is None
    assert health_config(None, {}) is None


def _result(exit_code: int) -> dict:
    return {"Start": "", "End": "", "ExitCode": exit_code, "Output": ""}


def test_health_turns_unhealthy_after_retries() -> None:
    config = HealthConfig(["false"], retries=3)
    state = initial_state()
    statuses = []
    for _ in range(3):
        state = apply_result(state, _result(1), config, in_start_period=False)
        statuses.append(state["Status"])
    assert statuses == [STARTING, STARTING, UNHEALTHY]
    assert state["FailingStreak"] == 3


def test_health_success_resets_streak() -> None:
    config = HealthConfig(["true"], retries=3)
    state = apply_result(initial_state(), _result(1), config, in_start_period=False)
    state = apply_result(state, _result(0), config, in_start_period=False)
    assert state["Status"] == HEALTHY
    assert state["FailingStreak"] == 0


def test_health_start_period_failures_do_not_count() -> None:
    config = HealthConfig(["false"], retries=1, start_period=60)
    state = apply_result(initial_state(), _result(1), config, in_start_period=True)
    assert state["Status"] == STARTING
    assert state["FailingStreak"] == 0


def test_health_log_keeps_last_five() -> None:
    config = HealthConfig(["true"])
    state = initial_state()
    for code in range(8):
        state = apply_result(state, _result(code), config, in_start_period=False)
    assert [entry["ExitCode"] for entry in state["Log"]] == [3, 4, 5, 6, 7]


def _record(name: str) -> Container:
    return Container(id=containers.new_id(), name=name, image="busybox", image_digest="",
                     created=containers.rfc3339_nano(), path="/nonexistent", options={})


def test_reserve_rejects_taken_name(tmp_path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    first = _record("web")
    containers.reserve(meta, first)
    with pytest.raises(AlreadyExistsError, match="web"):
        containers.reserve(meta, _record("web"))
    assert [c.id for c in containers.list_all(meta)] == [first.id]


@pytest.mark.parametrize("name, message", [
    ("bad/name", "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"),
    ("../../x", "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"),
    ("-web", "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"),
    ("a", "(at least 2 characters)"),
    ("web server", "only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"),
    ("w" * 129, "at most 128 are allowed"),
])
def test_reserve_rejects_invalid_name(tmp_path, name: str, message: str) -> None:
    meta = Meta(str(tmp_path / "meta"))
    with pytest.raises(InvalidArgumentError, match=re.escape(message)):
        containers.reserve(meta, _record(name))
    assert containers.list_all(meta) == []


@pytest.mark.parametrize("name", ["web", "db.1", "a-b_c", "0x", "W" * 128])
def test_reserve_accepts_docker_names(tmp_path, name: str) -> None:
    meta = Meta(str(tmp_path / "meta"))
    containers.reserve(meta, _record(name))
    assert containers.resolve(meta, name).name == name


def test_resolve_by_name_id_and_prefix(tmp_path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    record = _record("db")
    containers.reserve(meta, record)
    assert containers.resolve(meta, "db").id == record.id
    assert containers.resolve(meta, record.id).id == record.id
    assert containers.resolve(meta, record.id[:5]).id == record.id
    with pytest.raises(NotFoundError):
        containers.resolve(meta, "nothing")


def test_update_checks_expected_state(tmp_path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    record = _record("app")
    containers.reserve(meta, record)
    containers.update(meta, record.id, expect=(containers.CREATED,), state=containers.RUNNING)
    with pytest.raises(Exception, match="running"):
        containers.update(meta, record.id, expect=(containers.CREATED,), pid=1)
    assert containers.load(meta, record.id).pid == 0


def test_delete_frees_the_name(tmp_path) -> None:
    meta = Meta(str(tmp_path / "meta"))
    record = _record("tmp")
    containers.reserve(meta, record)
    containers.delete(meta, record)
    containers.reserve(meta, _record("tmp"))


def test_status_dead_when_supervisor_gone() -> None:
    record = _record("x")
    record.state = containers.RUNNING
    record.supervisor_pid = os.getpid()
    record.supervisor_start = containers.process_start_ticks(os.getpid()) or 0
    assert record.status() == containers.RUNNING
    record.supervisor_start += 1  # a different process that reused the pid
    assert record.status() == containers.DEAD
