"""`capdec-study ui` serves the study's MLflow store on loopback by default."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from study.cli import build_parser, mlflow_ui_command
from study.settings import StudySettings, save_settings


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ui_binds_loopback_by_default(tmp_path: Path) -> None:
    args = build_parser().parse_args(["ui", str(tmp_path)])
    assert args.host == "127.0.0.1"


def test_ui_serves_study_store(tmp_path: Path) -> None:
    save_settings(StudySettings(name="ui-study"), tmp_path)
    port = _free_port()
    command = mlflow_ui_command(tmp_path, host="127.0.0.1", port=port)
    assert command[command.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    assert response.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not answer within 120 s"
                assert server.poll() is None, "mlflow ui exited early"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
