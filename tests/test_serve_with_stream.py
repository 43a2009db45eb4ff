"""``dicomlake serve --with-stream``: one command runs the SQL endpoint and the upload stream;
an image uploaded meanwhile becomes a row the endpoint returns; stopping the server stops
the stream it started.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import trino
from trino.auth import BasicAuthentication

from dicomlake.catalog.sample import Profile, make_sample
from dicomlake.config import Settings
from dicomlake.processes import stop_processes

pytestmark = pytest.mark.slow

FLINK_PYTHON = Path(__file__).resolve().parent.parent / ".venv-flink" / "bin" / "python"
PASSWORD = "stream and serve"


def test_serve_with_stream_serves_uploads_and_stops_the_stream(tmp_path):
    from pydicom import dcmread

    from dicomlake.sql.users import Role, UserStore
    from dicomlake.streaming import runner

    if not FLINK_PYTHON.exists():
        pytest.fail(f"{FLINK_PYTHON} is missing; `make install` builds .venv-flink")
    home = tmp_path / "home"
    UserStore(home).add("root", PASSWORD, Role.ADMIN)
    archive = make_sample(tmp_path / "data", archives=1, files=1, seed=5, profile=Profile.CTMR,
                          workers=1)[0]
    with zipfile.ZipFile(archive) as zf:
        member = next(i for i in zf.infolist() if not i.is_dir())
        data = zf.read(member)
    image = tmp_path / "upload.dcm"
    image.write_bytes(data)
    header = dcmread(io.BytesIO(data), stop_before_pixels=True)
    uid, modality = str(header.SOPInstanceUID), str(header.Modality)

    env = {**os.environ, "DICOMLAKE_HOME": str(home), "DICOMLAKE_SPARK_MASTER": "local[2]",
           "DICOMLAKE_FLINK_PYTHON": str(FLINK_PYTHON)}
    exe = Path(sys.executable).parent / "dicomlake"
    log_path = tmp_path / "serve.log"
    settings = Settings(home=home)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(exe), "serve", "--port", "0", "--with-stream"], env=env,
                                stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        url = None
        assert proc.stdout is not None
        for line in proc.stdout:
            if "listening on" in line:
                url = line.split("listening on", 1)[1].split()[0]
                break
        assert url is not None, log_path.read_text()[-3000:]
        assert runner.status(settings)["job_running"], "serve --with-stream started no job"

        sent = subprocess.run([str(exe), "upload", str(image)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr

        cursor = trino.dbapi.connect(
            host="127.0.0.1", port=int(url.rsplit(":", 1)[1]), user="root",
            http_scheme="http", auth=BasicAuthentication("root", PASSWORD),
            allow_insecure_auth=True, catalog="dicomlake", schema="dicom").cursor()
        deadline = time.monotonic() + 240
        found: list = []
        while not found and time.monotonic() < deadline:
            cursor.execute("SELECT sop_instance_uid, modality FROM instances "
                           "WHERE sop_instance_uid = ?", [uid])
            found = cursor.fetchall()
            if not found:
                time.sleep(1)
        assert found == [[uid, modality]], "the uploaded image never reached dicom.instances"
    finally:
        stop_processes([proc], timeout=120)
        if proc.returncode == -signal.SIGKILL:  # it never got to stop the stream itself
            runner.stop(settings)
    assert proc.returncode == 0, log_path.read_text()[-3000:]
    after = runner.status(settings)
    assert not after["job_running"] and not after["broker_running"]
