"""Real nginx, with the router site from docs/deploy.md, in front of two router proxy processes.

Two routers run with one proxy.ini whose only section is ``[peer:node]``: a node proxy
process serving the fake llama-server. nginx (foreground, its own prefix in tmp_path) has
the documented ``upstream smart_proxy_routers`` block with the two routers' ports. Requests
through nginx must be spread over both routers (each router's ``/metrics`` counts the
requests it relayed to the node); then one router is killed with SIGKILL and every request
after must still be answered, by the other, with nginx's passive health check and
``proxy_next_upstream`` taking the dead one out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from smart_proxy.process import free_port

from ..conftest import deploy_doc_block
from .test_nginx import Nginx, find_nginx

BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
COUNTED = re.compile(r'smart_proxy_requests_total\{model="m",peer="node",route="/v1/chat/completions",status="200"\} (\S+)')


def render_router_site(router_ports: list[int], nginx_port: int) -> str:
    """The documented router site, listening on 127.0.0.1:nginx_port, with the routers' ports."""
    site = deploy_doc_block("nginx", "upstream smart_proxy_routers")
    for old, new in [
        ("server 127.0.0.1:8081 ", f"server 127.0.0.1:{router_ports[0]} "),
        ("server 127.0.0.1:8082 ", f"server 127.0.0.1:{router_ports[1]} "),
        ("listen 80;", f"listen 127.0.0.1:{nginx_port};"),
    ]:
        assert site.count(old) == 1, f"the documented router site no longer has {old!r}; update this test with it"
        site = site.replace(old, new)
    return site


def relayed(url: str) -> int:
    """Requests a router relayed to the node, by its /metrics."""
    found = COUNTED.search(httpx.get(f"{url}/metrics", timeout=10).text)
    return int(float(found.group(1))) if found else 0


def test_requests_spread_over_two_routers_and_go_on_when_one_is_killed(
    proxy_process, fake_binary: str, tmp_path: Path
) -> None:
    binary = find_nginx()
    model = tmp_path / "m.json"
    model.write_text(json.dumps({"tokens": 3}))
    node = proxy_process(f"[pool]\nllama_server = {fake_binary}\nload_timeout = 10s\n[model:m]\npath = {model}\n")
    router_ini = f"[peer:node]\nurl = {node.url}\nrefresh = 1s\n"
    routers = [proxy_process(router_ini), proxy_process(router_ini)]
    for router in routers:
        assert "(router: 1 peers, no pool)" in router.log()
        assert httpx.get(f"{router.url}/health", timeout=10).json()["role"] == "router"
    ports = [int(router.url.rsplit(":", 1)[1]) for router in routers]
    nginx_port = free_port()
    nginx = Nginx(binary, tmp_path / "nginx", render_router_site(ports, nginx_port), nginx_port)
    try:
        with httpx.Client(base_url=nginx.url, timeout=30) as client:
            for _ in range(20):
                answer = client.post("/v1/chat/completions", json=BODY)
                assert answer.status_code == 200 and answer.headers["x-served-by"] == "peer:node", answer.text
                assert answer.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 "
            spread = [relayed(router.url) for router in routers]
            assert sum(spread) == 20 and min(spread) >= 5, f"nginx did not spread the requests: {spread}"

            routers[0].process.kill()  # SIGKILL: no drain, its connections reset
            routers[0].process.wait(10)
            statuses = [client.post("/v1/chat/completions", json=BODY).status_code for _ in range(20)]
            assert statuses == [200] * 20, statuses
            # nginx met the dead router (its connection refused) and passed the request on
            assert f"127.0.0.1:{ports[0]}" in nginx.error_log() and "failed" in nginx.error_log()
            assert relayed(routers[1].url) == spread[1] + 20
            streamed = client.post("/v1/chat/completions", json={**BODY, "stream": True})
            assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    finally:
        nginx.stop()
