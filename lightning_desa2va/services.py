"""A team's shared services on one machine: PostgreSQL (for Optuna studies and MLflow's runs) and an MLflow
tracking server on it that stores artifacts in a local folder (proxied: clients upload through the server).

``desa2va services start`` (``make services`` installs Debian's PostgreSQL first) keeps everything under one
folder: the database cluster, both logs, the artifacts and the server's process id. Both bind to 127.0.0.1
unless ``--host`` names another address, which then requires a password (``DESA2VA_POSTGRES_PASSWORD``):
loopback connections alone are trusted. Workers then use ``storage: postgresql://...`` in a sweep spec and
``MLFLOW_TRACKING_URI=http://...`` (docs/scale.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from lightning_desa2va.errors import ServiceError

log = logging.getLogger(__name__)

POSTGRES_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
"""Where Debian's packages put the server binaries (newest version first)."""
SUPERUSER = "postgres"
DATABASES = ("optuna", "mlflow")
STATE_FILE = "services.json"
LOOPBACK = "127.0.0.1"
PASSWORD_ENV = "DESA2VA_POSTGRES_PASSWORD"
READY_TIMEOUT_S = 120.0
POLL_S = 0.5
FOLDER_MODE = 0o755  # the postgres user must reach the cluster inside it


@dataclass
class Services:
    """PostgreSQL and the MLflow server of one folder."""

    folder: Path
    host: str = LOOPBACK
    postgres_port: int = 5433
    mlflow_port: int = 5001

    def postgres_url(self, database: str) -> str:
        password = os.environ.get(PASSWORD_ENV)
        credentials = f"{SUPERUSER}:{password}" if password else SUPERUSER
        return f"postgresql://{credentials}@{self.host}:{self.postgres_port}/{database}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.host}:{self.mlflow_port}"

    @property
    def cluster(self) -> Path:
        return self.folder / "postgres"

    def start(self) -> None:
        """Start PostgreSQL (initialising its cluster and databases the first time) and the MLflow server."""
        if self.host != LOOPBACK and not os.environ.get(PASSWORD_ENV):
            raise ServiceError(
                f"--host {self.host}: set {PASSWORD_ENV}; only loopback connections are trusted"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(FOLDER_MODE)
        self._start_postgres()
        self._start_mlflow()
        (self.folder / STATE_FILE).write_text(json.dumps(asdict(self), default=str, indent=2) + "\n")

    def stop(self) -> None:
        """Stop the MLflow server and PostgreSQL (what is not running is left alone)."""
        pid_file = self.folder / "mlflow.pid"
        if pid_file.is_file():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            pid_file.unlink()
        if (self.cluster / "postmaster.pid").is_file():
            self._as_postgres(postgres_binary("pg_ctl"), "-D", str(self.cluster), "-m", "fast", "-w", "stop")

    def running(self) -> dict[str, bool]:
        """Whether each service answers."""
        ready = subprocess.run(
            [postgres_binary("pg_isready"), "-h", self.host, "-p", str(self.postgres_port)],
            capture_output=True,
        )
        return {"postgres": ready.returncode == 0, "mlflow": mlflow_answers(self.mlflow_url)}

    def _start_postgres(self) -> None:
        if not (self.cluster / "PG_VERSION").is_file():
            self.cluster.mkdir(parents=True, exist_ok=True)
            self._own(self.cluster)
            self._initdb()
        if not self.running()["postgres"]:
            options = f"-c listen_addresses={self.host} -p {self.postgres_port} -k {self.cluster}"
            log_file = self.folder / "postgres.log"
            log_file.touch()
            self._own(log_file)
            self._as_postgres(
                postgres_binary("pg_ctl"),
                "-D",
                str(self.cluster),
                "-l",
                str(log_file),
                "-o",
                options,
                "-w",
                "start",
            )
        for database in DATABASES:
            self._create_database(database)

    def _initdb(self) -> None:
        password = os.environ.get(PASSWORD_ENV)
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256" if password else "--auth-host=trust"]
        command = [postgres_binary("initdb"), "-D", str(self.cluster), f"--username={SUPERUSER}", *auth]
        if password:
            password_file = self.folder / ".password"
            password_file.write_text(password)
            self._own(password_file)
            command.append(f"--pwfile={password_file}")
        try:
            self._as_postgres(*command)
        finally:
            (self.folder / ".password").unlink(missing_ok=True)

    def _create_database(self, name: str) -> None:
        connect = ["-h", str(self.cluster), "-p", str(self.postgres_port), "-U", SUPERUSER]
        listed = self._as_postgres(
            postgres_binary("psql"), *connect, "-Atc", "SELECT datname FROM pg_database"
        )
        if name not in listed.split():
            self._as_postgres(postgres_binary("createdb"), *connect, name)

    def _start_mlflow(self) -> None:
        if mlflow_answers(self.mlflow_url):
            return
        artifacts = self.folder / "mlflow-artifacts"
        artifacts.mkdir(exist_ok=True)
        command = [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            f"--backend-store-uri={self.postgres_url('mlflow')}",
            f"--artifacts-destination={artifacts}",
            f"--host={self.host}",
            f"--port={self.mlflow_port}",
            "--workers=1",
        ]
        with open(self.folder / "mlflow.log", "ab") as output:
            process = subprocess.Popen(
                command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        (self.folder / "mlflow.pid").write_text(str(process.pid))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not mlflow_answers(self.mlflow_url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise ServiceError(f"the MLflow server did not start; see {self.folder / 'mlflow.log'}")
            time.sleep(POLL_S)

    def _own(self, path: Path) -> None:
        """Give ``path`` to the postgres user when running as root (PostgreSQL refuses to run as root)."""
        if os.geteuid() == 0:
            shutil.chown(path, SUPERUSER, SUPERUSER)

    def _as_postgres(self, *command: str) -> str:
        """Run a PostgreSQL command (as the postgres user when this is root); its output."""
        prefix = ["runuser", "-u", SUPERUSER, "--"] if os.geteuid() == 0 else []
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, cwd=self.folder)
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise ServiceError(
                f"{Path(command[0]).name} failed: {detail[-1] if detail else result.returncode}"
            )
        return result.stdout


def postgres_binary(name: str) -> str:
    """A PostgreSQL server binary from Debian's package (``make services`` installs it)."""
    for folder in POSTGRES_BIN_DIRS:
        if (folder / name).is_file():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise ServiceError(f"no {name}: install PostgreSQL (make services does: apt-get install postgresql)")
    return found


def mlflow_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=POLL_S * 4) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
