"""The deploy files (Procfile, Dockerfile, compose, systemd, Kubernetes) parse, and every
command, option and ``TOKIWA_*`` variable they use exists in the CLIs and the settings.

No Docker engine or Kubernetes cluster runs here, so these checks are what guards them;
``honcho check``, ``systemd-analyze verify`` and ``kubectl kustomize`` run when installed.
"""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml

from orchestrator.cli.producer import cli as producer_cli
from orchestrator.config import Settings
from workers.cli import cli as worker_cli

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
YAML_FILES = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
K8S_FILES = sorted((DEPLOY / "k8s").glob("*.yaml"))
CLIS: dict[str, click.Group] = {"tokiwa-producer": producer_cli, "tokiwa-worker": worker_cli}
# TOKIWA_* names that are not Settings fields but are read elsewhere, each documented
DOCUMENTED_EXTRAS = {"TOKIWA_CONFIG", "TOKIWA_REDIS_SERVER", "TOKIWA_APP"}
EXTRA_PREFIXES = ("TOKIWA_WEBHOOK_",)
TEXT_FILES = [ROOT / "Procfile", *sorted(p for p in DEPLOY.rglob("*") if p.is_file())]
SHELL_DEFAULT = re.compile(r"\$\{[A-Z_]+:-([^}]*)\}")


def _subcommands(program: str) -> dict[str, click.Command]:
    """Every subcommand of a CLI group, lazily loaded ones included."""
    group = CLIS[program]
    ctx = click.Context(group, info_name=program)
    return {name: group.get_command(ctx, name) for name in group.list_commands(ctx)}


def _known_env_vars() -> set[str]:
    names = {f"TOKIWA_{field.upper()}" for field in Settings.model_fields}
    for program in CLIS:
        for command in _subcommands(program).values():
            for param in command.params:
                envvars = getattr(param, "envvar", None) or []
                names.update([envvars] if isinstance(envvars, str) else envvars)
    return names | DOCUMENTED_EXTRAS


def check_command(argv: list[str], where: str) -> None:
    """``argv`` is a real ``tokiwa-*`` command line: program, subcommand and options all parse."""
    program = Path(argv[0]).name
    assert program in CLIS, f"{where}: {argv[0]!r} is not a tokiwa console script"
    commands = _subcommands(program)
    assert len(argv) > 1 and argv[1] in commands, f"{where}: `{program} {argv[1:2]}` does not exist"
    command = commands[argv[1]]
    try:
        command.make_context(f"{program} {argv[1]}", list(argv[2:]))
    except click.ClickException as exc:
        pytest.fail(f"{where}: `{' '.join(argv)}` does not parse: {exc.format_message()}")


def _shell_words(line: str) -> list[str]:
    """A Procfile line as argv: ``${VAR:-default}`` becomes its default, a leading ``exec`` goes."""
    words = shlex.split(SHELL_DEFAULT.sub(r"\1", line))
    return words[1:] if words[:1] == ["exec"] else words


def _units(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(path)
    return parser


def _k8s_docs() -> list[tuple[str, dict]]:
    return [(p.name, d) for p in K8S_FILES for d in yaml.safe_load_all(p.read_text()) if d]


def test_every_yaml_file_parses():
    assert len(YAML_FILES) >= 6
    for path in YAML_FILES:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_every_tokiwa_variable_in_deploy_files_is_a_setting_or_a_documented_extra():
    known = _known_env_vars()
    used = {name for path in TEXT_FILES for name in re.findall(r"\bTOKIWA_[A-Z0-9_]+", path.read_text())}
    assert "TOKIWA_REDIS_URL" in used
    unknown = {n for n in used - known if not n.startswith(EXTRA_PREFIXES)}
    assert not unknown, f"not settings: {sorted(unknown)}"


def test_a_misspelt_variable_or_option_would_be_caught():
    """The checks above and below can fail: a typo is reported."""
    assert "TOKIWA_REDIS_URI" not in _known_env_vars()
    with pytest.raises(pytest.fail.Exception, match="does not parse"):
        check_command(["tokiwa-worker", "run", "--concurency", "4"], "typo")
    with pytest.raises(AssertionError, match="does not exist"):
        check_command(["tokiwa-worker", "runn"], "typo")


# -- Procfile ---------------------------------------------------------------------------------


def _procfile() -> dict[str, str]:
    entries = {}
    for line in (ROOT / "Procfile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if match:
            entries[match.group(1)] = match.group(2)
    return entries


def test_procfile_runs_producer_and_worker_with_real_commands():
    entries = _procfile()
    assert set(entries) == {"producer", "worker"}
    for name, line in entries.items():
        assert line.startswith("exec "), f"{name}: without exec, SIGTERM kills the shell, not tokiwa"
        argv = _shell_words(line)
        assert argv[:2] == ["tokiwa-producer" if name == "producer" else "tokiwa-worker", "run"]
        assert "examples.shop:app" in argv
        check_command(argv, f"Procfile {name}")


def test_honcho_check_accepts_the_procfile():
    result = subprocess.run([sys.executable, "-m", "honcho", "check"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert "Valid procfile detected (producer, worker)" in result.stderr


# -- systemd ----------------------------------------------------------------------------------


def test_the_two_systemd_units_exist():
    assert [p.name for p in UNITS] == ["tokiwa-producer.service", "tokiwa-worker@.service"]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_units_parse_and_exec_the_console_scripts(path):
    unit = _units(path)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith("/") and Path(argv[0]).name in CLIS
    check_command(argv, path.name)
    assert service["KillSignal"] == "SIGTERM" and service["KillMode"] == "mixed"
    # systemd must wait longer than the worker's own grace period before SIGKILL
    assert float(service["TimeoutStopSec"]) > Settings().grace_period_s


def test_systemd_analyze_verify_finds_nothing_to_report(tmp_path):
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    bin_dir = Path(sys.executable).parent
    copies = []
    for path in UNITS:
        copy = tmp_path / path.name.replace("@.", "@1.")
        copy.write_text(path.read_text().replace("/opt/tokiwa/venv/bin/", f"{bin_dir}/"))
        copies.append(str(copy))
    result = subprocess.run(["systemd-analyze", "verify", "--man=no", *copies], capture_output=True,
                            text=True, timeout=30, check=False)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


# -- Docker -----------------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    return [tuple(line.split(None, 1)) for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_copies_existing_paths_and_runs_a_real_command():
    import json

    instructions = _dockerfile_instructions()
    for keyword, args in instructions:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source}"
    [cmd] = [json.loads(args) for keyword, args in instructions if keyword == "CMD"]
    check_command(cmd, "Dockerfile CMD")
    assert [k for k, _ in instructions].count("FROM") == 2  # build stage + slim runtime
    assert ("USER", "tokiwa") in instructions


def test_docker_compose_runs_redis_two_producers_and_scaled_workers():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "producer", "worker"}
    assert services["producer"]["deploy"]["replicas"] == 2
    assert services["worker"]["deploy"]["replicas"] >= 2
    for name in ("producer", "worker"):
        service = services[name]
        check_command(service["command"], f"compose {name}")
        assert service["environment"]["TOKIWA_REDIS_URL"] == "redis://redis:6379/0"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        grace = float(service["environment"]["TOKIWA_GRACE_PERIOD_S"])
        assert int(service["stop_grace_period"].rstrip("s")) > grace


# -- Kubernetes -------------------------------------------------------------------------------


def test_k8s_manifests_are_namespace_less_and_well_formed():
    docs = _k8s_docs()
    kinds = sorted(d["kind"] for _, d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "Kustomization", "Service", "StatefulSet"]
    for name, doc in docs:
        assert doc.get("apiVersion"), name
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"] and "namespace" not in doc["metadata"], name


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S_FILES if p.name != "kustomization.yaml")


def _workloads() -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _k8s_docs() if d["kind"] in ("Deployment", "StatefulSet")}


def test_k8s_producer_has_two_replicas_and_workloads_run_real_commands_with_the_configmap():
    workloads = _workloads()
    config = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap")
    assert workloads["tokiwa-producer"]["spec"]["replicas"] == 2
    assert set(config["data"]) <= _known_env_vars()
    for name in ("tokiwa-producer", "tokiwa-worker"):
        pod = workloads[name]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert "command" not in container, "command would replace the image's tini ENTRYPOINT; use args"
        check_command(container["args"], f"k8s {name}")
        assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
        assert pod["terminationGracePeriodSeconds"] > float(config["data"]["TOKIWA_GRACE_PERIOD_S"])


def _container(name: str) -> dict:
    [container] = _workloads()[name]["spec"]["template"]["spec"]["containers"]
    return container


def _flag(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


@pytest.mark.parametrize("name", ["tokiwa-producer", "tokiwa-worker"])
def test_k8s_probes_hit_the_http_api_that_the_command_line_turns_on(name):
    container = _container(name)
    config = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap")["data"]
    api_port = _flag(container["args"], "--api-port")
    assert api_port, f"{name}: the probes need the HTTP API (--api-port)"
    assert config["TOKIWA_API_HOST"] == "0.0.0.0", "the kubelet probes the pod's address, not loopback"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == int(api_port)
    paths = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths["livenessProbe"]["path"] == "/healthz" and paths["startupProbe"]["path"] == "/healthz"
    assert paths["readinessProbe"]["path"] == "/readyz"
    assert all(probe["port"] in ("http", int(api_port)) for probe in paths.values())
    # liveness must not fail while a worker waits for Redis at start: the startup probe covers it
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_the_probed_routes_exist_in_the_http_api():
    from orchestrator.ops.http_api import ApiServer

    assert {"healthz", "readyz"} <= set(ApiServer.routes)


@pytest.mark.parametrize("name", ["tokiwa-producer", "tokiwa-worker"])
def test_k8s_metrics_are_on_and_annotated_for_prometheus(name):
    workload = _workloads()[name]
    container = _container(name)
    config = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap")["data"]
    metrics_port = _flag(container["args"], "--metrics-port")
    assert metrics_port and config["TOKIWA_METRICS_HOST"] == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"] == int(metrics_port)
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"prometheus.io/scrape": "true", "prometheus.io/port": metrics_port,
                           "prometheus.io/path": "/metrics"}


def test_compose_turns_metrics_on():
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    for name in ("producer", "worker"):
        assert _flag(services[name]["command"], "--metrics-port") == "9464"
        assert services[name]["environment"]["TOKIWA_METRICS_HOST"] == "0.0.0.0"


def test_k8s_selectors_match_their_pod_labels_and_the_redis_service_matches_redis():
    workloads = _workloads()
    for name, workload in workloads.items():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    service = next(d for _, d in _k8s_docs() if d["kind"] == "Service")
    redis_labels = workloads["tokiwa-redis"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= redis_labels.items()
    config = next(d for _, d in _k8s_docs() if d["kind"] == "ConfigMap")
    assert config["data"]["TOKIWA_REDIS_URL"].startswith(f"redis://{service['metadata']['name']}:6379")


def test_kubectl_kustomize_builds_the_manifests():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    result = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    assert len([d for d in yaml.safe_load_all(result.stdout) if d]) == 5


# -- commands quoted in the docs --------------------------------------------------------------


def test_every_tokiwa_subcommand_quoted_in_deploy_docs_exists():
    docs = [DEPLOY / "README.md", ROOT / "docs" / "operations.md"]
    quoted = set()
    for path in docs:
        found = re.findall(r"\b(tokiwa-(?:producer|worker)) ([a-z][a-z-]*)\b(?![@.-])", path.read_text())
        quoted |= {(program, word) for program, word in found if not word.startswith("tokiwa")}
    assert ("tokiwa-worker", "start") in quoted
    missing = sorted(f"{p} {s}" for p, s in quoted if s not in _subcommands(p))
    assert not missing, f"documented but missing: {missing}"


def test_the_app_that_deploy_files_run_exists_in_the_repository():
    specs = {m for path in TEXT_FILES for m in re.findall(r"--app[ =\"',]+([\w.]+:\w+)", path.read_text())}
    assert specs == {"examples.shop:app"}
    module = specs.pop().split(":")[0]
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} is missing"
