"""``imtext serve`` as a user runs it: a subprocess on 127.0.0.1, its startup log, a query, Ctrl-C."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request

from tests.pipeline.conftest import free_port
from tests.serving import get_json, tiny_export, tiny_gallery
from tests.smoke.test_cli import IMTEXT, imtext


def test_serve_an_export_dir_logs_what_it_loaded_and_stops_on_ctrl_c(tmp_path):
    gallery, export = tiny_gallery(tmp_path / "gallery"), tiny_export(tmp_path / "export")
    port = free_port()
    args = [IMTEXT, "serve", "--export-dir", export, "--gallery", gallery, "--port", port]
    args += ["--cache-dir", tmp_path / "cache", "--index", "hnsw"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(list(map(str, args)), stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=5) as response:
                    ready = json.loads(response.read())
                break
            except OSError:
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        assert ready["index"]["kind"] == "hnsw" and ready["gallery"]["images"] == 4
        status, body = get_json(url + "/api/search?q=red&k=2")
        assert status == 200 and len(body["results"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
    text = log.read_text()
    assert code == 0, text
    assert f"gallery {gallery} (split test): 4 images, 5 captions" in text
    assert f"listening on http://127.0.0.1:{port}" in text
    assert "serving export version sha256-" in text and "index hnsw built and cached" in text
    assert "Traceback" not in text and "faiss.loader" not in text
    assert (tmp_path / "cache/indexes").is_dir()


def test_serve_refuses_bad_settings_in_one_line(tmp_path):
    done = imtext("serve", "--model", "runs:/abc/model", "--gallery", tiny_gallery(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("imtext: error: --model 'runs:/abc")
    done = imtext("serve", "--gallery", tmp_path / "nowhere")
    assert done.returncode == 1 and "expected a Karpathy-format dataset" in done.stderr
    assert "Traceback" not in done.stderr
