"""deploy/: the container recipe, the compose file, Prometheus' scrape config and the Grafana dashboard.

Docker has no daemon on these machines, so the recipe is checked by running its own commands: the Dockerfile's
ENTRYPOINT + CMD start `llmkit serve`, its HEALTHCHECK command decides when it is healthy, and a real Prometheus
(Debian's package; .ci/run installs it) scrapes it under load while every PromQL expression of the dashboard is
evaluated through Prometheus' HTTP API and must return data.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from llmkit.serve.metrics import Metrics
from tests.serve.conftest import openai

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "llmkit.json"
RATE_WINDOW = "10s"  # what Grafana substitutes for $__rate_interval; 10 scrapes at the test's 1 s interval


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [target["expr"] for panel in panels for target in panel["targets"]]


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads (identifiers that are neither functions nor keywords)."""
    without_labels = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels))
    return {w for w in words if w.startswith("llmkit_")}


def exported_names() -> set[str]:
    """Every sample name the server's /metrics can show (each labelled metric given one label value)."""
    metrics = Metrics()
    metrics.requests.labels(finish_reason="stop").inc()
    text = metrics.render().decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_the_dashboard_reads_is_one_the_server_exports() -> None:
    exprs = dashboard_exprs()
    used = set().union(*(metric_names(e) for e in exprs))
    assert len(exprs) >= 12 and len(used) >= 8, used
    missing = used - exported_names()
    assert not missing, f"the dashboard reads metrics llmkit serve does not export: {sorted(missing)}"
    # what the issue asks the dashboard to show: the latency quantiles come from the histograms
    for histogram in ("time_to_first_token", "inter_token_latency", "e2e_request_latency", "request_queue_time"):
        assert f"llmkit_{histogram}_seconds_bucket" in used, histogram
    assert {"llmkit_requests_running", "llmkit_requests_waiting", "llmkit_requests_total"} <= used


def test_a_renamed_metric_would_be_caught() -> None:
    renamed = "histogram_quantile(0.5, sum by (le) (rate(llmkit_ttft_bucket[$__rate_interval])))"
    assert metric_names(renamed) == {"llmkit_ttft_bucket"}
    assert "llmkit_ttft_bucket" not in exported_names()


def test_compose_provisioning_and_scrape_config_fit_together() -> None:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"llmkit", "prometheus", "grafana"}
    assert (DEPLOY.parent / services["llmkit"]["build"]["dockerfile"]).is_file()
    for service in services.values():  # every file a service mounts ships in deploy/
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), volume
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["metrics_path"] == "/metrics" and scrape["static_configs"][0]["targets"] == ["llmkit:8000"]
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]}
    assert uids == {datasource["uid"]}, "panels must name the provisioned datasource"


def dockerfile() -> dict[str, str]:
    """The Dockerfile's instructions (continuation lines joined), last one of each kind."""
    joined = re.sub(r"\\\n\s*", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return {line.split(None, 1)[0]: line.split(None, 1)[1] for line in lines}


def test_the_container_runs_as_a_user_with_the_server_as_entry_point() -> None:
    recipe = dockerfile()
    assert recipe["USER"] not in ("root", "0")
    assert json.loads(recipe["ENTRYPOINT"])[:2] == ["llmkit", "serve"]
    assert "/health" in recipe["HEALTHCHECK"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _container_command(ckpt: Path, port: int) -> tuple[list[str], list[str]]:
    """ENTRYPOINT + CMD as the container runs them, on loopback and a free port, with the test's model;
    and the HEALTHCHECK command aimed at that port."""
    recipe = dockerfile()
    entry = [arg.replace("host=0.0.0.0", "host=127.0.0.1").replace("port=8000", f"port={port}")
             for arg in json.loads(recipe["ENTRYPOINT"])]
    cmd = [f"ckpt={ckpt}" if arg.startswith("ckpt=") else arg for arg in json.loads(recipe["CMD"])]
    serve = [str(Path(sys.executable).parent / entry[0]), *entry[1:], *cmd, "model_name=llmkit"]
    check = shlex.split(recipe["HEALTHCHECK"].split(" CMD ", 1)[1].replace(":8000/", f":{port}/"))
    return serve, [sys.executable if check[0] == "python" else check[0], *check[1:]]


@pytest.fixture
def container_server(serve_checkpoint: Path) -> Iterator[int]:
    port = _free_port()
    serve, healthcheck = _container_command(serve_checkpoint, port)
    server = subprocess.Popen(serve, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(healthcheck, capture_output=True).returncode != 0:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, "the HEALTHCHECK never passed"
            time.sleep(0.5)
        yield port
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


@pytest.fixture
def prometheus(tmp_path: Path, container_server: int) -> Iterator[str]:
    """A real Prometheus scraping the server every second, with the shipped scrape config aimed at it."""
    if shutil.which("prometheus") is None:
        pytest.skip("needs Prometheus (apt-get install prometheus; .ci/run installs it)")
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{container_server}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = _free_port()
    command = ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
               f"--web.listen-address=127.0.0.1:{port}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _ready(url):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "Prometheus did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _load(port: int, seconds: float) -> None:
    """Bounded load on loopback: 2 clients, short completions, for `seconds` (and at most 200 requests)."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
    end, sent = time.monotonic() + seconds, [0]

    def user(stream: bool) -> None:
        while time.monotonic() < end and sent[0] < 200:
            sent[0] += 1
            reply = client.completions.create(model="llmkit", prompt="def ", max_tokens=8, stream=stream)
            list(reply) if stream else reply.choices[0].text

    threads = [threading.Thread(target=user, args=(s,)) for s in (False, True)]
    [t.start() for t in threads]
    [t.join() for t in threads]


@pytest.mark.extended
def test_prometheus_scrapes_the_server_and_every_dashboard_query_returns_data(prometheus: str, container_server: int) -> None:
    _wait_for_a_scrape(prometheus)
    _load(container_server, seconds=6)
    time.sleep(3)  # the last scrapes after the load
    empty = []
    for expr in dashboard_exprs():
        query = expr.replace("$__rate_interval", RATE_WINDOW)
        body = httpx.get(f"{prometheus}/api/v1/query", params={"query": query}, timeout=10).json()
        assert body["status"] == "success", (query, body)
        values = [float(sample["value"][1]) for sample in body["data"]["result"]]
        if not values or all(v != v for v in values):  # no series, or only NaN (no observation in the window)
            empty.append(query)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty) + f"\ntargets: {_targets(prometheus)}"
    assert [t["health"] for t in _targets(prometheus)] == ["up"]


def _targets(prometheus: str) -> list[dict]:
    return httpx.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]


def _wait_for_a_scrape(prometheus: str) -> None:
    """Prometheus starts scraping within an interval of starting, but on a loaded machine that can take
    seconds: wait (at most a minute) until the server has been scraped once."""
    deadline = time.monotonic() + 60
    while not [t for t in _targets(prometheus) if t["health"] == "up"]:
        assert time.monotonic() < deadline, f"Prometheus never scraped the server: {_targets(prometheus)}"
        time.sleep(0.5)
