"""Behind a real nginx: streams stay unbuffered and a client leaving still closes the upstream."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, assert_unbuffered, assert_upstream_closed_on_leave, free_port, wait_for_port

MESSAGES = [{"role": "user", "content": "say something"}]
# nginx as most operators leave it: proxy_buffering on, no special streaming settings.
DEFAULT_PROXY = """
        location / {{
            proxy_pass http://127.0.0.1:{gateway_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
"""


def nginx_config(tmp: Path, port: int, server_block: str) -> str:
    return f"""
user root;
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
{server_block.replace("listen 80;", f"listen 127.0.0.1:{port};")}
}}
"""


def shipped_server_block(gateway_port: int) -> str:
    """deploy/nginx.conf as shipped, pointed at the test gateway."""
    text = (Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf").read_text()
    return text.replace("server 127.0.0.1:9090;", f"server 127.0.0.1:{gateway_port};")


def start_nginx(tmp: Path, server_block: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not os.path.exists(binary):
        if os.environ.get("CI") == "true":
            pytest.fail(".ci/run must install Debian's nginx package")
        pytest.skip("nginx is not installed")
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config(tmp, port, server_block))
    log = tmp / "nginx.out"
    with log.open("ab") as out:
        proc = subprocess.Popen([binary, "-c", str(conf), "-p", str(tmp)], stdout=out, stderr=subprocess.STDOUT)
    wait_for_port(port, proc, log)
    return proc, port


@pytest.fixture(params=["default-proxy", "shipped-config"])
def nginx(request: pytest.FixtureRequest, gw: Gateway, tmp_path: Path) -> Iterator[int]:
    if request.param == "default-proxy":
        block = "    server {\n        listen 80;\n" + DEFAULT_PROXY.format(gateway_port=gw.proc.port) + "    }\n"
    else:
        block = shipped_server_block(gw.proc.port)
    proc, port = start_nginx(tmp_path, block)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_stream_is_unbuffered_through_nginx(gw: Gateway, nginx: int) -> None:
    assert_unbuffered(f"http://127.0.0.1:{nginx}/v1/chat/completions", gw, "nginx-1")


def test_client_leaving_nginx_closes_the_upstream(gw: Gateway, nginx: int) -> None:
    assert_upstream_closed_on_leave(nginx, gw, "nginx-gone")
