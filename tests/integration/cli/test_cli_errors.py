"""Every failure of both CLIs is one line on stderr that names the problem and the setting to
check, with a named exit code; ``--debug`` (or ``TOKIWA_DEBUG=1``) adds the traceback.

Real processes against real servers: a closed port, a redis-server with ``--requirepass``, a
plain server under a ``rediss://`` URL, a TLS server (certificates made with ``openssl``)
under a ``redis://`` URL and with an untrusted CA.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

import pytest

from orchestrator.broker.embedded import EmbeddedRedis, find_redis_server, free_port
from orchestrator.cli import exitcodes
from tests.integration.procs import ROOT

pytestmark = pytest.mark.timeout(120)

PRODUCER = [sys.executable, "-m", "orchestrator.cli"]
WORKER = [sys.executable, "-m", "workers.cli"]
URL_SETTING = "--redis-url / TOKIWA_REDIS_URL"
CHECK_URL = f"check {URL_SETTING}"


def closed_port_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def cli(argv: list[str], env: dict[str, str], *, input_: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          input=input_ if input_ is not None else "", check=False)


def one_line(result: subprocess.CompletedProcess) -> str:
    """The error line: stderr must be exactly one line."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def env(subprocess_env, tmp_path):
    (tmp_path / "raising_app.py").write_text("from orchestrator import Orchestrator\nvalue = 1 / 0\n")
    subprocess_env["PYTHONPATH"] = f"{tmp_path}:{subprocess_env['PYTHONPATH']}"
    return subprocess_env


@pytest.fixture
def password_redis(tmp_path):
    server = EmbeddedRedis(tmp_path / "pw-redis", password="s3cret")
    server.start()
    yield server
    server.stop()


# -- unreachable ------------------------------------------------------------------------------
ONE_SHOT_COMMANDS = [
    PRODUCER + ["publish", "order.created", "--payload", "{}"],
    PRODUCER + ["trigger", "order-report"],
    PRODUCER + ["cron", "list", "--app", "examples.shop:app"],
    PRODUCER + ["inspect", "streams"],
    PRODUCER + ["inspect", "dead", "requeue", "--all"],
    PRODUCER + ["inspect", "events", "purge", "--yes"],
    PRODUCER + ["cancel", "0b3f4c1e-0000-4000-8000-000000000000"],
]


@pytest.mark.parametrize("argv", ONE_SHOT_COMMANDS, ids=lambda a: " ".join(a[3:5]))
def test_an_unreachable_redis_is_one_line_and_exit_69(argv, env):
    url = closed_port_url()
    result = cli([*argv, "--redis-url", url], env)
    assert one_line(result) == f"error: cannot reach Redis at {url} (connection refused): {CHECK_URL}"
    assert result.returncode == exitcodes.UNAVAILABLE == 69


def test_ps_cluster_names_the_address_it_could_not_reach(env):
    port = free_port()
    result = cli(WORKER + ["ps", "--cluster", "--redis-url", f"redis://127.0.0.1:{port}/0"], env)
    assert one_line(result) == f"error: cannot reach Redis at 127.0.0.1:{port} (connection refused): {CHECK_URL}"
    assert result.returncode == exitcodes.UNAVAILABLE


def test_the_producer_run_ends_with_the_line_and_exit_69(env):
    url = closed_port_url()
    result = cli(PRODUCER + ["run", "--app", "examples.shop:app", "--redis-url", url], env)
    assert result.stderr.splitlines()[-1] == f"error: cannot reach Redis at {url} (connection refused): {CHECK_URL}"
    assert "Traceback" not in result.stderr
    assert result.returncode == exitcodes.UNAVAILABLE


def test_a_worker_waits_for_redis_at_start_and_a_signal_stops_it_at_once(env, tmp_path):
    """A worker waits out an unreachable Redis (one warning line); SIGTERM while it waits exits 0."""
    proc = subprocess.Popen(WORKER + ["run", "--app", "examples.shop:app", "--redis-url", closed_port_url()],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)
        assert proc.poll() is None, "the worker should wait for Redis"
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == exitcodes.OK
        assert time.monotonic() - started < 5
        err = proc.stderr.read() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert err.count("redis unreachable") == 1, err
    assert "stopped before it finished starting" in err and "Traceback" not in err


# -- passwords --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    PRODUCER + ["publish", "x", "--payload", "{}"],
    PRODUCER + ["inspect", "streams"],
    WORKER + ["run", "--app", "examples.shop:app"],
    WORKER + ["ps", "--cluster"],
], ids=["publish", "inspect", "worker-run", "ps-cluster"])
def test_a_wrong_password_is_one_line_and_exit_77_with_the_password_hidden(argv, env, password_redis):
    url = f"redis://:wrong@127.0.0.1:{password_redis.port}/0"
    result = cli([*argv, "--redis-url", url], env)
    shown = f"redis://:***@127.0.0.1:{password_redis.port}/0" if argv[3] != "ps" else f"127.0.0.1:{password_redis.port}"
    expected = (f"error: Redis at {shown} refused the password or user (invalid username-password pair "
                f"or user is disabled): {CHECK_URL}")
    if argv[3] == "ps":  # ps --cluster reads the URL itself: redis-py names no address for AUTH
        expected = expected.replace(f" at {shown}", "")
    assert one_line(result) == expected
    assert "wrong" not in result.stderr
    assert result.returncode == exitcodes.NOPERM == 77


def test_a_missing_password_says_how_to_give_one(env, password_redis):
    url = f"redis://127.0.0.1:{password_redis.port}/0"
    result = cli(PRODUCER + ["publish", "x", "--redis-url", url], env)
    assert one_line(result) == (f"error: Redis at {url} requires a password: put it in the URL "
                                f"(redis://:PASSWORD@host:port/db); {CHECK_URL}")
    assert result.returncode == exitcodes.NOPERM


# -- TLS --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [PRODUCER + ["publish", "x"], WORKER + ["run", "--app", "examples.shop:app"]],
                         ids=["publish", "worker-run"])
def test_rediss_to_a_plain_server_is_one_line_and_exit_76(argv, env, redis_server):
    url = f"rediss://127.0.0.1:{redis_server.port}/0"
    env = {**env, "TOKIWA_REDIS_TIMEOUT_MS": "500"}
    result = cli([*argv, "--redis-url", url], env)
    assert one_line(result) == (f"error: TLS: Redis at {url} speaks plain text, not TLS (it never answers a "
                                f"TLS handshake): use redis:// in {URL_SETTING}")
    assert result.returncode == exitcodes.PROTOCOL == 76


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A redis-server that speaks TLS only, with a certificate of its own CA."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: no certificates for a TLS redis-server")
    d = tmp_path_factory.mktemp("tls")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    for name in ("ca", "other"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN=tokiwa-test-{name}")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "srv.pem", "-days", "2", "-extfile", "ext.cnf")
    port = free_port()
    proc = subprocess.Popen([find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(d / "srv.pem"), "--tls-key-file", str(d / "srv.key"),
                             "--tls-ca-cert-file", str(d / "ca.pem"), "--tls-auth-clients", "no",
                             "--save", "", "--appendonly", "no", "--dir", str(d)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.skip(f"this redis-server has no TLS: {proc.stderr.read().decode()[:200] if proc.stderr else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield {"port": port, "ca": d / "ca.pem", "other": d / "other.pem"}
    proc.terminate()
    proc.wait(timeout=10)


def test_tls_with_the_right_ca_works(env, tls_redis):
    url = f"rediss://127.0.0.1:{tls_redis['port']}/0?ssl_ca_certs={tls_redis['ca']}"
    result = cli(PRODUCER + ["publish", "x", "--redis-url", url], env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv", [PRODUCER + ["publish", "x"], WORKER + ["run", "--app", "examples.shop:app"]],
                         ids=["publish", "worker-run"])
def test_an_untrusted_certificate_is_one_line_and_exit_76(argv, env, tls_redis):
    url = f"rediss://127.0.0.1:{tls_redis['port']}/0?ssl_ca_certs={tls_redis['other']}"
    result = cli([*argv, "--redis-url", url], env)
    assert one_line(result) == (f"error: TLS: Redis at {url} sent a certificate that is not trusted (self-signed "
                                f"certificate in certificate chain): check ssl_ca_certs / ssl_check_hostname in "
                                f"{URL_SETTING}")
    assert result.returncode == exitcodes.PROTOCOL


def test_plain_text_to_a_tls_server_is_one_line_and_exit_76(env, tls_redis):
    url = f"redis://127.0.0.1:{tls_redis['port']}/0"
    result = cli(PRODUCER + ["inspect", "streams", "--redis-url", url], env)
    assert one_line(result) == (f"error: TLS: Redis at {url} requires TLS (it drops plain-text clients): use "
                                f"rediss:// in {URL_SETTING}")
    assert result.returncode == exitcodes.PROTOCOL


def test_a_missing_ca_file_is_a_usage_error(env, tls_redis, tmp_path):
    url = f"rediss://127.0.0.1:{tls_redis['port']}/0?ssl_ca_certs={tmp_path}/none.pem"
    result = cli(PRODUCER + ["publish", "x", "--redis-url", url], env)
    assert one_line(result) == ("error: TLS: a certificate or key file named in the Redis URL does not exist "
                                "([Errno 2] No such file or directory): check ssl_ca_certs / ssl_certfile / "
                                f"ssl_keyfile in {URL_SETTING}")
    assert result.returncode == exitcodes.USAGE


# -- trigger --wait ---------------------------------------------------------------------------
def test_a_trigger_wait_that_times_out_prints_the_run_id_and_exits_75(env, redis_url, namespace):
    result = cli(PRODUCER + ["trigger", "order-report", "--app", "examples.shop:app", "--wait", "--timeout", "0.5",
                             "--redis-url", redis_url, "--namespace", namespace], env)
    run_id = json.loads(result.stdout)["run_id"]
    assert json.loads(result.stdout) == {"run_id": run_id, "status": "timed out"}
    assert one_line(result) == (f"error: run {run_id} did not finish within --timeout; it may still run: "
                                f"`tokiwa-producer cancel {run_id}` stops it")
    assert result.returncode == exitcodes.TEMPFAIL == 75


# -- configuration ----------------------------------------------------------------------------
def test_a_config_file_that_is_not_toml(env, tmp_path):
    path = tmp_path / "tokiwa.toml"
    path.write_text("concurrency = \n")
    result = cli(PRODUCER + ["publish", "x", "--config", str(path)], env)
    assert one_line(result) == (f"error: config file {path} is not valid TOML: Invalid value (at line 1, column 15): "
                                "check --config / TOKIWA_CONFIG")
    assert result.returncode == exitcodes.USAGE == 2


def test_a_missing_config_file(env, tmp_path):
    result = cli(WORKER + ["run", "--app", "examples.shop:app", "--config", str(tmp_path / "nope.toml")], env)
    assert one_line(result) == f"error: config file not found: {tmp_path / 'nope.toml'}: check --config / TOKIWA_CONFIG"
    assert result.returncode == exitcodes.USAGE


def test_a_bad_value_names_the_setting_and_where_it_came_from(env, tmp_path):
    path = tmp_path / "tokiwa.toml"
    path.write_text('concurrency = "many"\n')
    result = cli(PRODUCER + ["publish", "x", "--config", str(path)], env)
    assert one_line(result) == (f"error: invalid tokiwa settings: concurrency (from config file {path}): Input "
                                "should be a valid integer, unable to parse string as an integer")
    result = cli(PRODUCER + ["publish", "x"], {**env, "TOKIWA_CRON_TZ": "Mars/Olympus"})
    assert one_line(result) == ("error: invalid tokiwa settings: cron_tz (from TOKIWA_CRON_TZ): Value error, "
                                "unknown time zone 'Mars/Olympus' (use an IANA name such as UTC or Asia/Tokyo)")
    assert result.returncode == exitcodes.USAGE


def test_a_bad_log_format_in_the_environment(env):
    result = cli(PRODUCER + ["inspect", "streams"], {**env, "TOKIWA_LOG_FORMAT": "xml"})
    assert one_line(result) == "error: unknown log format 'xml': use text or json: check --log-format / TOKIWA_LOG_FORMAT"
    assert result.returncode == exitcodes.USAGE


@pytest.mark.parametrize(("spec", "expected"), [
    ("no_such_module:app", "error: cannot import 'no_such_module' for --app no_such_module:app: No module named "
                           "'no_such_module': check --app / TOKIWA_APP"),
    ("examples.shop:nope", "error: module 'examples.shop' has no attribute 'nope' (--app examples.shop:nope): "
                           "check --app / TOKIWA_APP"),
    ("examples.shop", "error: --app must look like 'package.module:app', got 'examples.shop': check --app / TOKIWA_APP"),
    ("raising_app:app", "error: importing 'raising_app' for --app raising_app:app failed: ZeroDivisionError: "
                        "division by zero ({tmp}/raising_app.py:2): check --app / TOKIWA_APP"),
])
def test_an_unknown_or_broken_app(spec, expected, env, tmp_path, redis_url):
    for argv in (WORKER + ["run"], PRODUCER + ["cron", "list"]):
        result = cli([*argv, "--app", spec, "--redis-url", redis_url], env)
        assert one_line(result) == expected.format(tmp=tmp_path)
        assert result.returncode == exitcodes.USAGE


# -- --debug, --version -----------------------------------------------------------------------
@pytest.mark.parametrize("how", ["flag", "flag-after-command", "env"])
def test_debug_adds_the_traceback_before_the_same_line(how, env):
    url = closed_port_url()
    argv = PRODUCER + ["publish", "x", "--redis-url", url]
    if how == "flag":
        argv.insert(3, "--debug")
    elif how == "flag-after-command":
        argv.append("--debug")
    else:
        env = {**env, "TOKIWA_DEBUG": "1"}
    result = cli(argv, env)
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConnectionRefusedError" in result.stderr
    assert result.stderr.splitlines()[-1] == f"error: cannot reach Redis at {url} (connection refused): {CHECK_URL}"
    assert result.returncode == exitcodes.UNAVAILABLE


def test_an_unexpected_error_says_how_to_see_its_traceback(env, tmp_path):
    (tmp_path / "bad_factory.py").write_text("def app():\n    return None\n")
    result = cli(PRODUCER + ["cron", "list", "--app", "bad_factory:app"], env)
    assert one_line(result) == "error: bad_factory:app is a NoneType, not an Orchestrator: check --app / TOKIWA_APP"


@pytest.mark.parametrize(("argv", "program"), [(PRODUCER, "tokiwa-producer"), (WORKER, "tokiwa-worker")])
def test_version_comes_from_the_installed_package(argv, program, env):
    result = cli([*argv, "--version"], env)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout == f"{program} (tokiwa) {version('tokiwa')}\n"


def test_the_console_scripts_report_the_same_way(env):
    scripts = Path(sys.executable).parent
    if not (scripts / "tokiwa-producer").exists():
        pytest.skip("console scripts are not installed next to this interpreter")
    url = closed_port_url()
    result = cli([str(scripts / "tokiwa-producer"), "inspect", "workers", "--redis-url", url], env)
    assert one_line(result) == f"error: cannot reach Redis at {url} (connection refused): {CHECK_URL}"
    assert result.returncode == exitcodes.UNAVAILABLE
