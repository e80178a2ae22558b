"""The trace-viewing stack: docker-compose.yml, deploy/, docs/observability-stack.md and the README block.

No Docker engine is needed.  The compose file is checked against the Compose Specification schema
(vendored in deploy/) and by a real Compose implementation (``docker compose`` or Debian's
``docker-compose``; see deploy/README.md for the CI install step).  Everything else is structural:
pipelines refer to defined components, exporters point at compose services, and the ports agree
everywhere with ``fastdeploy_otel.config``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from fastdeploy_otel.config import DEFAULT_OTLP_GRPC_PORT, DEFAULT_OTLP_HTTP_PORT, DEFAULT_SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
COLLECTOR_FILE = DEPLOY / "otel-collector.yaml"
TEMPO_FILE = DEPLOY / "tempo.yaml"
DATASOURCES_FILE = DEPLOY / "grafana" / "provisioning" / "datasources" / "datasources.yaml"
SCHEMA_FILE = DEPLOY / "compose-spec.schema.json"
DOCS_FILE = ROOT / "docs" / "observability-stack.md"
README_FILE = ROOT / "README.md"

# Service names in docker-compose.yml that the rest of the stack refers to.
COLLECTOR, JAEGER, TEMPO, GRAFANA = "otel-collector", "jaeger", "tempo", "grafana"
# Container ports fixed by the images themselves (not by a file of ours).
JAEGER_UI_PORT = 16686  # Jaeger v2 query/UI extension default
JAEGER_OTLP_GRPC_PORT = 4317  # Jaeger v2 all-in-one built-in OTLP receiver
GRAFANA_PORT = 3000  # Grafana's http_port default

INSTALL_HINT = (
    "apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose"
)


# ---------------------------------------------------------------- helpers


def load_yaml(path: Path):
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(COMPOSE_FILE)


@pytest.fixture(scope="module")
def collector() -> dict:
    return load_yaml(COLLECTOR_FILE)


@pytest.fixture(scope="module")
def tempo() -> dict:
    return load_yaml(TEMPO_FILE)


@pytest.fixture(scope="module")
def datasources() -> list[dict]:
    return load_yaml(DATASOURCES_FILE)["datasources"]


@pytest.fixture(scope="module")
def docs() -> str:
    return DOCS_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def readme_block() -> str:
    return readme_stack_block(README_FILE.read_text(encoding="utf-8"))


def readme_stack_block(text: str) -> str:
    begin, end = "<!-- stack:begin -->", "<!-- stack:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, "README.md must keep exactly one stack:begin/end pair"
    start, stop = text.index(begin) + len(begin), text.index(end)
    assert start < stop, "stack:begin must come before stack:end"
    return text[start:stop]


def parse_port(entry) -> tuple[str | None, int | None, int, str]:
    """(host_ip, published, target, protocol) from the short or long compose port syntax."""
    if isinstance(entry, dict):
        published = entry.get("published")
        return entry.get("host_ip"), int(published) if published is not None else None, int(entry["target"]), entry.get("protocol", "tcp")
    text = str(entry)
    text, _, proto = text.partition("/")
    parts = text.rsplit(":", 2)
    if len(parts) == 1:
        return None, None, int(parts[0]), proto or "tcp"
    if len(parts) == 2:
        return None, int(parts[0]), int(parts[1]), proto or "tcp"
    return parts[0], int(parts[1]), int(parts[2]), proto or "tcp"


def published_ports(compose: dict) -> dict[int, tuple[str, int]]:
    """host port -> (service, container port), over every service; a port published twice fails."""
    out: dict[int, tuple[str, int]] = {}
    for name, service in compose["services"].items():
        for entry in service.get("ports", []):
            _, published, target, _ = parse_port(entry)
            if published is None:
                continue
            assert published not in out, f"host port {published} is published by both {out[published][0]} and {name}"
            out[published] = (name, target)
    return out


def service_ports(compose: dict, service: str) -> dict[int, int]:
    """container port -> host port, for one service."""
    out = {}
    for entry in compose["services"][service].get("ports", []):
        _, published, target, _ = parse_port(entry)
        if published is not None:
            out[target] = published
    return out


def host_port(endpoint: str) -> tuple[str, int]:
    """``host:port`` or ``scheme://host:port/...`` -> (host, port)."""
    parts = urlsplit(endpoint if "://" in endpoint else "//" + endpoint)
    assert parts.hostname and parts.port, f"endpoint {endpoint!r} has no host:port"
    return parts.hostname, parts.port


def components(collector: dict, kind: str) -> dict:
    return collector.get(kind) or {}


def bind_mounts(service: dict) -> list[tuple[str, str, str]]:
    """(source, target, mode) of the relative bind mounts of a service, short syntax."""
    out = []
    for entry in service.get("volumes", []):
        assert isinstance(entry, str), f"use the short volume syntax: {entry!r}"
        parts = entry.split(":")
        if parts[0].startswith("."):
            out.append((parts[0], parts[1], parts[2] if len(parts) > 2 else "rw"))
    return out


def compose_cli() -> list[str] | None:
    """A Compose implementation that can run ``config`` without a daemon, or None."""
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy:
        return [legacy]
    return None


def run_compose_config(cli: list[str], path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*cli, "-f", str(path), "config", "-q"], cwd=path.parent, capture_output=True, text=True, timeout=120
    )


def localhost_ports(text: str) -> set[int]:
    return {int(p) for p in re.findall(r"localhost:(\d+)", text)}


def duration_s(value) -> float:
    """A Collector duration (``500ms``, ``30s``, ``2m``) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)", str(value))
    assert match, f"{value!r} is not a duration"
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60}[match.group(2)]


def yaml_blocks(markdown: str) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", markdown, flags=re.S)


# ---------------------------------------------------------------- the compose file


def test_compose_file_matches_the_compose_spec_schema(compose):
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert schema.get("title") == "Compose Specification", "deploy/compose-spec.schema.json is not the compose-spec schema"
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "docker-compose.yml violates the Compose Specification:\n" + "\n".join(errors)

    # The validator is live: a misspelt key is refused.
    broken = copy.deepcopy(compose)
    broken["services"][TEMPO]["volume"] = broken["services"][TEMPO].pop("volumes")
    assert list(validator.iter_errors(broken)), "the schema accepted an unknown service key"


def test_compose_file_passes_compose_config(tmp_path):
    cli = compose_cli()
    if cli is None:
        if not os.environ.get("CI"):  # .ci/run installs it; on a laptop, say how
            pytest.skip(f"no Compose CLI here; install one to run this check: {INSTALL_HINT}")
        pytest.fail(
            "No Compose implementation found: neither `docker compose` nor `docker-compose` works here. "
            f"Install one (CI: `{INSTALL_HINT}`), see deploy/README.md."
        )
    result = run_compose_config(cli, COMPOSE_FILE)
    assert result.returncode == 0, f"{' '.join(cli)} config -q rejected docker-compose.yml:\n{result.stderr}{result.stdout}"

    # The tool catches what the schema cannot: a dependency on an undefined service.
    broken = load_yaml(COMPOSE_FILE)
    broken["services"][GRAFANA]["depends_on"] = ["no-such-service"]
    copy_path = tmp_path / "docker-compose.yml"
    copy_path.write_text(yaml.safe_dump(broken), encoding="utf-8")
    assert run_compose_config(cli, copy_path).returncode != 0, "compose config accepted an undefined depends_on"


def test_compose_has_the_four_services_with_pinned_images(compose):
    services = compose["services"]
    assert {COLLECTOR, JAEGER, TEMPO, GRAFANA} <= set(services)
    expected_repo = {
        COLLECTOR: "otel/opentelemetry-collector-contrib",
        JAEGER: "jaegertracing/jaeger",
        TEMPO: "grafana/tempo",
        GRAFANA: "grafana/grafana",
    }
    for name, service in services.items():
        image = service["image"]
        repo, sep, tag = image.rpartition(":")
        assert sep and "/" not in tag, f"{name}: image {image!r} has no tag"
        assert tag != "latest" and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: image {image!r} is not pinned to a version"
        if name in expected_repo:
            assert repo == expected_repo[name], f"{name}: expected {expected_repo[name]}, got {repo}"
    assert services[JAEGER]["image"].split(":")[1].startswith("2."), "Jaeger must be v2 (OTLP-native, jaegertracing/jaeger)"


def test_config_files_are_mounted_read_only_where_the_programs_read_them(compose):
    services = compose["services"]
    mounted = set()
    for name, service in services.items():
        for source, target, mode in bind_mounts(service):
            assert mode == "ro", f"{name}: {source} must be mounted read-only"
            path = (ROOT / source).resolve()
            assert path.exists(), f"{name}: mount source {source} does not exist"
            assert DEPLOY in path.parents or path == DEPLOY, f"{name}: config {source} is outside deploy/"
            mounted.add(path)
    # Each program is told to read the file that is mounted.
    coll_mounts = {t: s for s, t, _ in bind_mounts(services[COLLECTOR])}
    (config_arg,) = [a for a in services[COLLECTOR]["command"] if a.startswith("--config=")]
    assert (ROOT / coll_mounts[config_arg.split("=", 1)[1]]).resolve() == COLLECTOR_FILE
    tempo_mounts = {t: s for s, t, _ in bind_mounts(services[TEMPO])}
    (tempo_arg,) = [a for a in services[TEMPO]["command"] if a.startswith("-config.file=")]
    assert (ROOT / tempo_mounts[tempo_arg.split("=", 1)[1]]).resolve() == TEMPO_FILE
    graf_mounts = {t: s for s, t, _ in bind_mounts(services[GRAFANA])}
    assert (ROOT / graf_mounts["/etc/grafana/provisioning/datasources"]).resolve() == DATASOURCES_FILE.parent
    # And every config under deploy/ is actually used.
    for config in (COLLECTOR_FILE, TEMPO_FILE, DATASOURCES_FILE):
        assert config in mounted or config.parent in mounted, f"{config.relative_to(ROOT)} is not mounted by any service"


def test_named_volumes_and_dependencies_are_declared(compose):
    services, volumes = compose["services"], compose.get("volumes") or {}
    for name, service in services.items():
        deps = service.get("depends_on") or []
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on undefined service {dep}"
        for entry in service.get("volumes", []):
            source = entry.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in volumes, f"{name}: named volume {source} is not declared"
    assert set(services[COLLECTOR]["depends_on"]) >= {JAEGER, TEMPO}, "the Collector must start after its backends"


def test_grafana_allows_anonymous_viewing(compose):
    env = compose["services"][GRAFANA]["environment"]
    assert str(env["GF_AUTH_ANONYMOUS_ENABLED"]).lower() == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] in ("Admin", "Editor", "Viewer")


# ---------------------------------------------------------------- the Collector config


def test_collector_pipelines_use_only_defined_components(collector):
    pipelines = collector["service"]["pipelines"]
    assert "traces" in pipelines, "the Collector needs a traces pipeline"
    used = {"receivers": set(), "processors": set(), "exporters": set()}
    for pname, pipeline in pipelines.items():
        assert pipeline.get("receivers") and pipeline.get("exporters"), f"pipeline {pname} needs receivers and exporters"
        for kind in used:
            for comp in pipeline.get(kind, []):
                assert comp in components(collector, kind), f"pipeline {pname} uses undefined {kind[:-1]} {comp!r}"
                used[kind].add(comp)
    for kind, names in used.items():
        unused = set(components(collector, kind)) - names
        assert not unused, f"{kind} defined but in no pipeline: {sorted(unused)}"
    for ext in collector["service"].get("extensions", []):
        assert ext in components(collector, "extensions"), f"undefined extension {ext!r}"


def test_memory_limiter_comes_first_and_batch_after_sampling(collector):
    for pname, pipeline in collector["service"]["pipelines"].items():
        procs = pipeline.get("processors", [])
        assert procs and procs[0].split("/")[0] == "memory_limiter", f"pipeline {pname}: memory_limiter must be first, got {procs}"
        if "tail_sampling" in procs and "batch" in procs:
            assert procs.index("batch") > procs.index("tail_sampling"), f"pipeline {pname}: batch must follow tail_sampling"
    assert "tail_sampling" in collector["service"]["pipelines"]["traces"]["processors"]
    limiter = collector["processors"]["memory_limiter"]
    assert limiter.get("check_interval") and (limiter.get("limit_mib") or limiter.get("limit_percentage"))


def test_memory_limiter_stays_below_the_container_limit(collector, compose):
    limiter = collector["processors"]["memory_limiter"]
    mem_limit = str(compose["services"][COLLECTOR].get("mem_limit", ""))
    match = re.fullmatch(r"(\d+)([mg])", mem_limit.lower())
    assert match, f"give {COLLECTOR} a mem_limit like 2g (got {mem_limit!r})"
    limit_mib = int(match.group(1)) * (1024 if match.group(2) == "g" else 1)
    assert limiter["limit_mib"] < limit_mib, "memory_limiter.limit_mib must stay below the container's mem_limit"
    assert 0 < limiter["spike_limit_mib"] < limiter["limit_mib"]


def test_tail_sampling_keeps_errors_slow_traces_and_a_sample(collector):
    config = collector["processors"]["tail_sampling"]
    policies = config["policies"]
    names = [p["name"] for p in policies]
    assert len(names) == len(set(names)), "tail_sampling policy names must be unique"
    by_type: dict[str, list[dict]] = {}
    for policy in policies:
        assert policy["type"] in policy, f"policy {policy['name']} has no {policy['type']!r} section"
        by_type.setdefault(policy["type"], []).append(policy[policy["type"]])
    assert any("ERROR" in p.get("status_codes", []) for p in by_type.get("status_code", [])), "no policy keeps error traces"
    assert any(p.get("threshold_ms", 0) > 0 for p in by_type.get("latency", [])), "no latency policy keeps slow traces"
    assert any(0 < p.get("sampling_percentage", 0) < 100 for p in by_type.get("probabilistic", [])), "no probabilistic sample of the rest"
    assert 0 < duration_s(config["decision_wait"]) <= 120, "decision_wait must be a duration like 30s"


def test_collector_exporters_point_to_compose_services(collector, compose, tempo):
    services = compose["services"]
    exporters = collector["exporters"]
    targets = {}
    for name, exporter in exporters.items():
        if not isinstance(exporter, dict) or "endpoint" not in exporter:
            continue
        host, port = host_port(exporter["endpoint"])
        assert host in services, f"exporter {name}: {host!r} is not a service in docker-compose.yml"
        assert host != COLLECTOR, f"exporter {name} loops back into the Collector"
        if name.split("/")[0] == "otlp":
            assert exporter.get("tls", {}).get("insecure") is True, f"exporter {name}: plain gRPC inside the compose network needs tls.insecure"
        targets[host] = port
    assert set(targets) >= {JAEGER, TEMPO}, f"the Collector must export to Jaeger and Tempo, exports to {sorted(targets)}"
    # The ports are the backends' OTLP gRPC receivers.
    tempo_grpc = tempo["distributor"]["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
    assert targets[TEMPO] == host_port(tempo_grpc)[1], "the Tempo exporter's port differs from Tempo's OTLP gRPC receiver"
    assert targets[JAEGER] == JAEGER_OTLP_GRPC_PORT


def test_collector_receivers_listen_on_the_default_otlp_ports(collector, compose):
    protocols = collector["receivers"]["otlp"]["protocols"]
    grpc_host, grpc_port = host_port(protocols["grpc"]["endpoint"])
    http_host, http_port = host_port(protocols["http"]["endpoint"])
    assert (grpc_port, http_port) == (DEFAULT_OTLP_GRPC_PORT, DEFAULT_OTLP_HTTP_PORT)
    # localhost inside a container is unreachable through a published port.
    assert grpc_host == http_host == "0.0.0.0", "the OTLP receivers must listen on 0.0.0.0"
    # Published on the host under the same numbers that fastdeploy-otel defaults to.
    ports = service_ports(compose, COLLECTOR)
    assert ports.get(grpc_port) == DEFAULT_OTLP_GRPC_PORT, f"{COLLECTOR} must publish {DEFAULT_OTLP_GRPC_PORT}:{grpc_port}"
    assert ports.get(http_port) == DEFAULT_OTLP_HTTP_PORT, f"{COLLECTOR} must publish {DEFAULT_OTLP_HTTP_PORT}:{http_port}"
    health = collector["extensions"]["health_check"]["endpoint"]
    assert host_port(health)[1] in ports, "the health_check port is not published"


def test_only_the_collector_publishes_the_otlp_ports(compose):
    published = published_ports(compose)
    for port in (DEFAULT_OTLP_GRPC_PORT, DEFAULT_OTLP_HTTP_PORT):
        assert published.get(port, (None,))[0] == COLLECTOR, f"host port {port} must belong to {COLLECTOR}"
    for name in (JAEGER, TEMPO, GRAFANA):
        for target in service_ports(compose, name):
            assert target not in (DEFAULT_OTLP_GRPC_PORT, DEFAULT_OTLP_HTTP_PORT), f"{name} publishes its OTLP port {target}"


# ---------------------------------------------------------------- Tempo, Jaeger and Grafana


def test_tempo_stores_locally_and_serves_its_api(tempo, compose):
    assert tempo["storage"]["trace"]["backend"] == "local"
    assert tempo["storage"]["trace"]["local"]["path"].startswith("/var/tempo")
    tempo_volumes = [v.split(":") for v in compose["services"][TEMPO]["volumes"]]
    assert any(target == "/var/tempo" for _, target, *_ in tempo_volumes), "Tempo's /var/tempo must be a volume"
    for proto in ("grpc", "http"):
        host, _ = host_port(tempo["distributor"]["receivers"]["otlp"]["protocols"][proto]["endpoint"])
        assert host == "0.0.0.0", f"Tempo's OTLP {proto} receiver must listen on 0.0.0.0"
    api = tempo["server"]["http_listen_port"]
    assert service_ports(compose, TEMPO).get(api) == api, f"Tempo's HTTP API {api} must be published as {api}"


def test_jaeger_ui_and_grafana_are_published(compose):
    assert service_ports(compose, JAEGER).get(JAEGER_UI_PORT) == JAEGER_UI_PORT
    assert service_ports(compose, GRAFANA).get(GRAFANA_PORT) == GRAFANA_PORT


def test_grafana_datasources_reach_tempo_and_jaeger(datasources, tempo, compose):
    by_type = {ds["type"]: ds for ds in datasources}
    assert {"tempo", "jaeger"} <= set(by_type)
    defaults = [ds["name"] for ds in datasources if ds.get("isDefault")]
    assert defaults == [by_type["tempo"]["name"]], f"Tempo must be the only default data source, got {defaults}"
    expected_ports = {"tempo": tempo["server"]["http_listen_port"], "jaeger": JAEGER_UI_PORT}
    for kind, ds in by_type.items():
        host, port = host_port(ds["url"])
        assert host in compose["services"], f"data source {ds['name']}: {host!r} is not a compose service"
        if kind in expected_ports:
            assert port == expected_ports[kind], f"data source {ds['name']} uses port {port}, the service listens on {expected_ports[kind]}"
        assert ds.get("access", "proxy") == "proxy", "the browser cannot resolve compose service names: use access: proxy"
    assert len({ds["uid"] for ds in datasources}) == len(datasources)


# ---------------------------------------------------------------- docs and README


def test_docs_and_readme_use_the_published_ports(docs, readme_block, compose):
    published = published_ports(compose)
    for label, text in (("docs/observability-stack.md", docs), ("README stack block", readme_block)):
        stray = localhost_ports(text) - set(published)
        assert not stray, f"{label} mentions localhost ports no service publishes: {sorted(stray)}"
        assert f"OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:{DEFAULT_OTLP_GRPC_PORT}" in text, f"{label}: demo command"
        assert f"http://localhost:{DEFAULT_OTLP_HTTP_PORT}" in text and "http/protobuf" in text, f"{label}: the OTLP/HTTP variant"
        assert f"http://localhost:{JAEGER_UI_PORT}" in text and f"http://localhost:{GRAFANA_PORT}" in text, f"{label}: UI URLs"
        assert f"http://localhost:{JAEGER_UI_PORT}/trace/" in text, f"{label}: trace id -> Jaeger URL"
        assert "docker compose up -d" in text
        assert f"`{DEFAULT_SERVICE_NAME}`" in text, f"{label}: the Jaeger service name {DEFAULT_SERVICE_NAME!r}"
        assert "fastdeploy.request_id=" in text
        assert "fastdeploy-otel demo" in text
    assert "docs/observability-stack.md" in readme_block
    assert f"service={DEFAULT_SERVICE_NAME}&" in docs, "the Jaeger search link must use the default service name"
    tempo_port = compose["services"][TEMPO]["ports"]
    assert any(parse_port(p)[1] in localhost_ports(docs) for p in tempo_port), "docs: Tempo's API URL"


def test_docs_sampling_numbers_match_the_collector(docs, collector, readme_block):
    policies = {p["type"]: p[p["type"]] for p in collector["processors"]["tail_sampling"]["policies"]}
    threshold = policies["latency"]["threshold_ms"]
    percentage = policies["probabilistic"]["sampling_percentage"]
    wait = duration_s(collector["processors"]["tail_sampling"]["decision_wait"])
    assert f"{threshold} ms" in docs, f"docs must state the latency threshold {threshold} ms"
    assert f"{percentage:g}%" in docs and f"{percentage:g}%" in readme_block, f"docs and README must state {percentage:g}%"
    assert f"{wait:g} s (`decision_wait`)" in docs, f"docs must state the decision wait, {wait:g} s"
    assert f"about {wait:g} s" in readme_block, f"README must state the decision wait, {wait:g} s"
    seconds = threshold / 1000
    assert f"{seconds:g} s" in readme_block, f"README must state the {seconds:g} s latency threshold"


def test_docs_have_the_traceql_and_grep_recipes(docs, readme_block):
    for query in (
        '{ event:name = "CACHE_SWAP_IN" }',
        "{ status = error }",
        '{ name = "PREFILL" && duration > 200ms }',
        "{ span.fastdeploy.request_id = ",
    ):
        assert query in docs, f"docs: TraceQL example {query!r}"
    for query in ('{ event:name = "CACHE_SWAP_IN" }', "{ status = error }"):
        assert query in readme_block
    assert re.search(r"grep -r[^\n]*--include='trace\.log\*' 'trace_id=[0-9a-f]{32}' log/", docs), "docs: grep one trace id"
    assert "[request_id=" in docs and "[event=CACHE_SWAP_IN]" in docs


def test_docs_grep_recipes_work_on_mirror_lines(docs, tmp_path):
    """Run the documented grep pipelines over lines in the mirror's format."""
    from fastdeploy_otel.mirror import FIELD_RE, LINE_RE

    line = (
        "INFO     2026-04-28 10:15:02,118 81234 sched.py[line:12] [thread=1] [thread_name=MainThread] "
        "[timestamp=1777342502118] [request_id={rid}] [user_id=None] [event={event}] [stage=SCHEDULE] "
        "[trace_id={tid}] [span_id=00f067aa0ba902b7] "
    )
    wanted, other = "4bf92f3577b34da6a3ce929d0e0e4736", "aaaa2f3577b34da6a3ce929d0e0e4736"
    lines = [
        line.format(rid="chatcmpl-7c1e_0", event="PREPROCESSING_START", tid=wanted),
        line.format(rid="chatcmpl-7c1e_01", event="CACHE_SWAP_IN", tid=other),
    ]
    rotated = [line.format(rid="chatcmpl-7c1e_0", event="CACHE_SWAP_IN", tid=wanted)]
    for text in lines + rotated:
        match = LINE_RE.match(text)
        assert match and dict(FIELD_RE.findall(match["fields"]))["trace_id"] in (wanted, other)
    (tmp_path / "log").mkdir()
    (tmp_path / "log" / "trace.log").write_text("\n".join(lines) + "\n")
    (tmp_path / "log" / "trace.log.2026-04-27").write_text("\n".join(rotated) + "\n")

    section = docs[docs.index("## 5.") : docs.index("## 6.")]
    (script,) = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    if not shutil.which("bash") or not shutil.which("grep"):
        pytest.fail("bash and grep are needed to run the documented recipes")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    # one trace (2 lines, one rotated) + one request (2, not the _01 one) + swap-ins (2)
    assert sum(wanted in o for o in out[:2]) == 2 and all("chatcmpl-7c1e_0]" in o for o in out[2:4])
    assert all("event=CACHE_SWAP_IN" in o for o in out[4:6])
    assert out[6] == f"http://localhost:{JAEGER_UI_PORT}/trace/{wanted}"
    assert out[7:] == [f"http://localhost:{JAEGER_UI_PORT}/trace/{t}" for t in sorted((wanted, other))]


def test_docs_scale_out_config_pieces_parse(docs):
    blocks = [yaml.safe_load(b) for b in yaml_blocks(docs)]
    assert blocks, "docs: no YAML config pieces"
    lb = [b["exporters"]["loadbalancing"] for b in blocks if "loadbalancing" in (b.get("exporters") or {})]
    assert lb and lb[0]["routing_key"] == "traceID", "docs: a loadbalancing exporter keyed by traceID"
    assert "resolver" in lb[0] and "otlp" in lb[0]["protocol"]
    first_tier = next(b for b in blocks if "loadbalancing" in (b.get("exporters") or {}))
    for kind in ("receivers", "processors", "exporters"):
        for comp in first_tier["service"]["pipelines"]["traces"][kind]:
            assert comp in first_tier[kind], f"docs: first-tier pipeline uses undefined {comp}"
    assert any((b.get("storage") or {}).get("trace", {}).get("backend") in ("s3", "gcs", "azure") for b in blocks), (
        "docs: Tempo distributed mode needs an object-storage config piece"
    )
    assert "tempo-distributed" in docs and "loadbalancingexporter" in docs and "-target=" in docs


def test_readme_outside_the_block_is_not_ours():
    text = README_FILE.read_text(encoding="utf-8")
    block = readme_stack_block(text)
    assert block.strip(), "the README stack block is empty"
    outside = text.replace(block, "")
    assert "View traces in Jaeger and Grafana" not in outside
