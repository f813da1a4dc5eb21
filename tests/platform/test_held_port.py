"""Prefect's temporary server listens on a port its process holds (tasks/platform/held_port.py):
another process already answering on the port it was given cannot stand in for it."""

import http.server
import json
import threading

import httpx


class _Impostor(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # http.server calls it by this name
        body = b'"impostor"'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_server_given_a_taken_port_is_its_own(tmp_path, monkeypatch):
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_HOME, temporary_settings

    from distill.tasks.platform.held_port import launch_on_held_port

    impostor = http.server.HTTPServer(("127.0.0.1", 0), _Impostor)  # another process's server
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    taken = impostor.server_address[1]
    with temporary_settings({PREFECT_HOME: tmp_path}):
        server = SubprocessASGIServer(port=taken)
        monkeypatch.setattr(server, "_run_uvicorn_command", lambda: launch_on_held_port(server))
        try:
            # Prefect's own launch polls /health on `taken`, where the impostor answers 200, and
            # reports started while its uvicorn fails to bind and exits
            server.start(timeout=90)
            assert server.port != taken
            assert server.server_process.poll() is None  # its own uvicorn serves
            health = httpx.get(f"{server.api_url}/health", timeout=30)
            assert health.status_code == 200 and json.loads(health.text) is True
        finally:
            server.stop()
            impostor.shutdown()
