"""Ctrl+C (SIGINT) on real processes: ``tokiwa-producer run-file``, tokiwa's ``Engine.run`` and
the pyoco-compatible ``Engine.run`` each end the run ``cancelled`` with one line on stderr and
exit status 130, within a second, while a sync node loops on ``time.sleep(0.05)``."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.procs import ROOT

CANCELLED_LINE = re.compile(r"🛑 cancelled flow=(?P<flow>\S+) run_id=(?P<run>[0-9a-f-]{36}) \(Ctrl\+C\)")

SPIN = '''
import time
from pathlib import Path

def spin(ctx=None, marker=None):
    Path(marker).write_text("running")
    while True:
        time.sleep(0.05)
'''

WORKFLOW = '''
name: slow-file
steps:
  - id: spin
    type: python
    params:
      callable: "spin.py:spin"
      kwargs: {{marker: "{marker}"}}
  - id: after
    type: python
    depends_on: [spin]
    params:
      callable: "spin.py:spin"
      kwargs: {{marker: "{marker}.after"}}
'''

TOKIWA_SCRIPT = '''
import json, sys, time
from pathlib import Path
from orchestrator.workflow.flow import Engine, Flow, task
from orchestrator.workflow.hooks import WorkflowHooks

class Record(WorkflowHooks):
    def on_run_complete(self, result):
        Path(sys.argv[2]).write_text(json.dumps(
            {"status": result.status, "nodes": {n: r.status for n, r in result.nodes.items()}}))

@task
def spin():
    Path(sys.argv[1]).write_text("running")
    while True:
        time.sleep(0.05)

@task
def after(spin):
    return spin

Engine().run(Flow("slow-engine") >> spin >> after, hooks=Record())
print("not reached")
'''

PYOCO_SCRIPT = '''
import atexit, json, sys, time
from pathlib import Path
import orchestrator.pyoco.alias  # the one line
from pyoco import task
from pyoco.core.models import Flow, RunContext
from pyoco.core.engine import Engine

run = RunContext()
atexit.register(lambda: Path(sys.argv[2]).write_text(json.dumps(
    {"status": run.status.value, "tasks": {n: s.value for n, s in run.tasks.items()}})))

@task
def spin(ctx):
    Path(sys.argv[1]).write_text("running")
    while True:
        time.sleep(0.05)

@task
def after(ctx):
    return 1

Engine().run(Flow("slow-pyoco") >> spin >> after, run_context=run)
print("not reached")
'''


def interrupt_when_running(argv: list[str], marker: Path, env: dict[str, str]) -> tuple[int, str, str, float]:
    """Start ``argv``, SIGINT it once ``marker`` exists; (exit code, stdout, stderr, seconds to exit)."""
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sync node never started"
            time.sleep(0.02)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        return proc.returncode, out, err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def assert_one_cancelled_line(err: str, flow: str) -> None:
    assert "Traceback" not in err and "Aborted!" not in err, err
    lines = [line for line in err.splitlines() if "cancelled" in line]
    assert len(lines) == 1, err
    match = CANCELLED_LINE.fullmatch(lines[0])
    assert match and match["flow"] == flow, lines[0]


@pytest.mark.timeout(60)
def test_ctrl_c_on_run_file_cancels_the_run_with_one_line_and_exit_130(tmp_path, subprocess_env):
    marker = tmp_path / "running"
    (tmp_path / "spin.py").write_text(SPIN)
    path = tmp_path / "slow.yaml"
    path.write_text(WORKFLOW.format(marker=marker))
    code, out, err, took = interrupt_when_running(
        [sys.executable, "-m", "orchestrator.cli.producer", "run-file", str(path)], marker, subprocess_env)
    assert code == 130, err
    assert_one_cancelled_line(err, "slow-file")
    assert took < 1.0, f"exited {took:.2f}s after Ctrl+C"
    assert not Path(f"{marker}.after").exists() and "not reached" not in out


@pytest.mark.timeout(60)
def test_ctrl_c_on_tokiwas_engine_run_cancels_the_run_with_one_line_and_exit_130(tmp_path, subprocess_env):
    marker, record = tmp_path / "running", tmp_path / "record.json"
    script = tmp_path / "engine_script.py"
    script.write_text(TOKIWA_SCRIPT)
    code, out, err, took = interrupt_when_running([sys.executable, str(script), str(marker), str(record)],
                                                  marker, subprocess_env)
    assert code == 130, err
    assert_one_cancelled_line(err, "slow-engine")
    assert took < 1.0, f"exited {took:.2f}s after Ctrl+C"
    assert json.loads(record.read_text()) == {"status": "cancelled", "nodes": {"spin": "cancelled", "after": "cancelled"}}
    assert "not reached" not in out


@pytest.mark.timeout(60)
def test_ctrl_c_on_the_pyoco_engine_run_cancels_the_run_with_one_line_and_exit_130(tmp_path, subprocess_env):
    marker, record = tmp_path / "running", tmp_path / "record.json"
    script = tmp_path / "pyoco_script.py"
    script.write_text(PYOCO_SCRIPT)
    code, out, err, took = interrupt_when_running([sys.executable, str(script), str(marker), str(record)],
                                                  marker, subprocess_env)
    assert code == 130, err
    assert_one_cancelled_line(err, "slow-pyoco")
    assert took < 1.0, f"exited {took:.2f}s after Ctrl+C"
    assert json.loads(record.read_text()) == {"status": "CANCELLED", "tasks": {"spin": "CANCELLED", "after": "CANCELLED"}}
    assert "not reached" not in out
