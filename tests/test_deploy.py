"""The container image and the deployment files work as shipped (issue 5: Container, Deploy).

No Docker engine runs here, so this proves what can be proven without one:
- the Dockerfile's builder steps, run for real with their paths moved into a temp dir, make a
  fresh venv in which the image's ENTRYPOINT/CMD serves (``/healthz`` 200), its HEALTHCHECK
  command passes (and fails once the gateway is gone), and SIGTERM exits 0;
- deploy/gateway.yaml passes ``gateway check-config`` with the production environment, and
  names an unset variable as FILE:LINE;
- yamllint passes on deploy/, every Kubernetes manifest validates against the Kubernetes
  schemas (kubernetes-validate, offline, strict), HAProxy accepts its config (``haproxy -c``,
  where installed), and compose.yaml, the manifests and the Dockerfile hold together: the
  same ports, paths, labels, required variables and shutdown timings everywhere.
Each linter is also shown a broken file, so a linter that accepts anything fails the test.
"""

from __future__ import annotations

import concurrent.futures
import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter as yamllint_linter

from gateway.config import parse_duration
from tests.ports import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
DOCKERFILE = ROOT / "Dockerfile"
GATEWAY_YAML = DEPLOY / "gateway.yaml"
# Oldest release still widely run that kubernetes-validate ships schemas for; the manifests use
# nothing newer (policy/v1 PDB, autoscaling/v2 HPA, unhealthyPodEvictionPolicy: 1.27+).
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
MOUNTED_CONFIG = "/etc/gateway/gateway.yaml"  # where the image and both deployments put it
KEYS_DIR = "/var/lib/gateway/keys"
REQUIRED_VAR = re.compile(r"\$\{([A-Z0-9_]+)\}")  # ${VAR} without a default


# -- the Dockerfile, parsed -----------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"expected one {keyword} in stage {self.name}, got {found}"
        return found[0]


def dockerfile_stages(text: str) -> list[Stage]:
    """Instructions per stage, continuation lines joined, comments and ARGs before FROM kept out."""
    logical = re.sub(r"\\\n", " ", re.sub(r"(?m)^\s*#.*\n", "", text))
    stages: list[Stage] = []
    for line in logical.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), " ".join(args.split())
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base, name or None))
        elif stages:
            stages[-1].instructions.append((keyword, args))
    return stages


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"(?m)^ARG (\w+)=(\S+)", DOCKERFILE.read_text()))


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


STAGES = dockerfile_stages(DOCKERFILE.read_text())
BUILDER = next(stage for stage in STAGES if stage.name == "builder")
FINAL = STAGES[-1]


def healthcheck_command() -> list[str]:
    spec = FINAL.one("HEALTHCHECK")
    return exec_form(spec[spec.index("CMD ") + 4 :])


# -- deployment files -----------------------------------------------------------------------


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return yaml.safe_load(f)


def kustomize_resources() -> list[Path]:
    return [KUBE / name for name in load_yaml(KUBE / "kustomization.yaml")["resources"]]


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes object of the kustomization, by kind/name."""
    found = {}
    for path in kustomize_resources():
        with path.open(encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def required_vars() -> set[str]:
    return set(REQUIRED_VAR.findall(GATEWAY_YAML.read_text()))


def gateway_container() -> dict[str, Any]:
    pod = manifests()["Deployment/gateway"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def compose() -> dict[str, Any]:
    return load_yaml(DEPLOY / "compose.yaml")


# -- linters --------------------------------------------------------------------------------


YAMLLINT_CONFIG = yamllint_config.YamlLintConfig(file=str(DEPLOY / ".yamllint"))


def yamllint_problems(text: str, path: Path) -> list[str]:
    return [
        f"{path.relative_to(ROOT)}:{p.line}: {p.message} ({p.rule})"
        for p in yamllint_linter.run(text, YAMLLINT_CONFIG, str(path))
        if p.level in ("error", "warning")
    ]


def test_yamllint_passes_on_every_deploy_file() -> None:
    files = sorted(p for p in DEPLOY.rglob("*") if YAMLLINT_CONFIG.is_yaml_file(str(p)))
    assert {DEPLOY / "compose.yaml", GATEWAY_YAML, KUBE / "deployment.yaml"} <= set(files)
    problems = [msg for path in files for msg in yamllint_problems(path.read_text(), path)]
    assert problems == []


def test_yamllint_config_catches_broken_yaml() -> None:
    broken = "services:\n  a: 1\n  a: 2\ntrailing: yes   \n"
    problems = yamllint_problems(broken, DEPLOY / "broken.yaml")
    assert any("duplication of key" in p for p in problems)
    assert any("trailing spaces" in p for p in problems)


def test_kustomization_lists_every_manifest() -> None:
    listed = {p.name for p in kustomize_resources()}
    on_disk = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(p.name for p in kustomize_resources()))
def test_manifest_validates_against_kubernetes_schema(name: str, version: str) -> None:
    with (KUBE / name).open(encoding="utf-8") as f:
        docs = list(yaml.safe_load_all(f))
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "path, value",
    [
        (["spec", "replica"], 3),  # a typo: strict validation refuses unknown fields
        (["spec", "template", "spec", "containers", 0, "ports", 0, "containerPort"], "8080"),
        (["spec", "template", "spec", "containers", 0, "securityContext", "runAsNonRoot"], "y"),
    ],
)
def test_kubernetes_validate_refuses_a_broken_deployment(path: list[Any], value: Any) -> None:
    doc = copy.deepcopy(manifests()["Deployment/gateway"])
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)


@pytest.fixture
def haproxy() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        pytest.fail("haproxy is not installed (scripts/test installs the Debian package)")
    return found


def haproxy_check(haproxy: str, cfg: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [haproxy, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30, check=False
    )


def test_haproxy_accepts_its_config(haproxy: str, tmp_path: Path) -> None:
    ok = haproxy_check(haproxy, DEPLOY / "haproxy.cfg")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = tmp_path / "haproxy.cfg"
    broken.write_text((DEPLOY / "haproxy.cfg").read_text().replace("roundrobin", "roundrobbin"))
    refused = haproxy_check(haproxy, broken)
    assert refused.returncode != 0


def test_haproxy_balances_replicas_on_readiness() -> None:
    cfg = " ".join((DEPLOY / "haproxy.cfg").read_text().split())
    for directive in (
        "balance roundrobin",
        "option httpchk",
        "http-check send meth GET uri /readyz",
        "http-check expect status 200",
        "option redispatch",
        "retries 3",
        # Only connection failures are retried: a request that reached a replica is never
        # replayed, so a POST never runs twice.
        "retry-on conn-failure ",
        "timeout connect",
        "timeout client",
        "timeout server",
        "option forwardfor",
    ):
        assert directive in cfg, directive
    # The servers are the compose service on the gateway's port.
    assert re.search(r"server-template gw \d+ gateway:8080 check", cfg)
    # No ready replica (PostgreSQL down for all): the live ones still verify tokens and proxy.
    assert "use_backend gateways if { nbsrv(gateways) gt 0 } default_backend gateways_alive" in cfg
    assert "http-check send meth GET uri /healthz" in cfg


# -- how the pieces fit ---------------------------------------------------------------------


def test_configmap_carries_deploy_gateway_yaml() -> None:
    configmap = manifests()["ConfigMap/gateway-config"]
    assert configmap["data"]["gateway.yaml"] == GATEWAY_YAML.read_text()


def test_deployment_runs_three_hardened_replicas() -> None:
    deployment = manifests()["Deployment/gateway"]
    pod = deployment["spec"]["template"]["spec"]
    container = gateway_container()
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8080, "admin": 9091}
    probes = {
        kind: container[kind]["httpGet"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes["readinessProbe"] == {"path": "/readyz", "port": "http"}
    assert probes["livenessProbe"] == probes["startupProbe"] == {"path": "/healthz", "port": "http"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["securityContext"]["runAsUser"] == int(FINAL.one("USER").split(":")[0])
    assert pod["automountServiceAccountToken"] is False


def test_pod_termination_outlasts_prestop_and_drain() -> None:
    pod = manifests()["Deployment/gateway"]["spec"]["template"]["spec"]
    container = gateway_container()
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) >= 5
    grace = parse_duration(env_of(container)["GATEWAY_SHUTDOWN_GRACE"])
    # preStop runs inside the termination grace period; SIGTERM comes after it.
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + grace


def test_deployment_mounts_config_and_keys_where_the_image_reads_them() -> None:
    pod = manifests()["Deployment/gateway"]["spec"]["template"]["spec"]
    container = gateway_container()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    config_mount = mounts[str(Path(MOUNTED_CONFIG).parent)]
    assert volumes[config_mount["name"]]["configMap"]["name"] == "gateway-config"
    assert mounts[KEYS_DIR]["readOnly"] is True
    assert volumes[mounts[KEYS_DIR]["name"]]["secret"]["secretName"] == "gateway-keys"
    assert container["args"] == exec_form(FINAL.one("CMD"))
    assert "/tmp" in mounts  # the only writable path under readOnlyRootFilesystem


def test_kubernetes_env_sets_every_required_variable() -> None:
    env = env_of(gateway_container())
    assert required_vars() == {"GATEWAY_PUBLIC_URL", "GATEWAY_DATABASE_URL", "GATEWAY_UPSTREAM"}
    assert required_vars() <= set(env)
    # The database URL holds a password: from a Secret, never inline.
    assert env["GATEWAY_DATABASE_URL"]["secretKeyRef"]["name"] == "gateway-database"


def test_secrets_are_placeholders_without_key_material() -> None:
    for doc in manifests().values():
        if doc["kind"] == "Secret":
            assert not doc.get("data") and not doc.get("stringData"), doc["metadata"]["name"]
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert "PRIVATE KEY-----" not in path.read_text(errors="replace"), path


def test_service_pdb_and_hpa_select_the_gateway_pods() -> None:
    objects = manifests()
    labels = objects["Deployment/gateway"]["spec"]["template"]["metadata"]["labels"]
    container_ports = {p["name"] for p in gateway_container()["ports"]}
    service = objects["Service/gateway"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["ports"]} <= container_ports
    pdb = objects["PodDisruptionBudget/gateway"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = objects["HorizontalPodAutoscaler/gateway"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "gateway",
    }
    assert hpa["spec"]["minReplicas"] >= 3 > pdb["maxUnavailable"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]


def test_compose_runs_postgres_three_gateways_haproxy_and_echo() -> None:
    services = compose()["services"]
    assert {"postgres", "gateway", "haproxy", "echo", "keys-init"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:16")
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    gateway = services["gateway"]
    assert gateway["deploy"]["replicas"] == 3
    assert gateway["command"] == exec_form(FINAL.one("CMD"))
    probe = gateway["healthcheck"]["test"]
    assert probe[:3] == ["CMD", "python", "-c"] and "127.0.0.1:8080/healthz" in probe[3]
    assert gateway["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "keys-init": {"condition": "service_completed_successfully"},
        "echo": {"condition": "service_healthy"},
    }
    assert services["haproxy"]["depends_on"] == {"gateway": {"condition": "service_healthy"}}
    assert services["haproxy"]["image"].startswith("haproxy:")
    assert "./haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in services["haproxy"]["volumes"]
    assert services["echo"]["command"][:1] == ["echo"]
    assert services["echo"]["command"][-2:] == ["--port", "9000"]
    assert "healthcheck" in services["echo"]  # the image's own one asks port 8080


def test_compose_gateways_share_config_keys_and_database() -> None:
    services = compose()["services"]
    gateway, keys_init = services["gateway"], services["keys-init"]
    assert f"./gateway.yaml:{MOUNTED_CONFIG}:ro" in gateway["volumes"]
    # Replicas only read the shared key ring; the one-shot init service writes it once.
    assert f"keys:{KEYS_DIR}:ro" in gateway["volumes"]
    assert f"keys:{KEYS_DIR}" in keys_init["volumes"]
    assert "gateway keys rotate" in keys_init["command"][0]
    env = gateway["environment"]
    assert required_vars() <= set(env)
    assert env["GATEWAY_DATABASE_URL"].startswith("postgresql://")
    assert "@postgres:5432/" in env["GATEWAY_DATABASE_URL"]
    # The gateway believes X-Forwarded-For from HAProxy's fixed address, and no one else's.
    haproxy_ip = services["haproxy"]["networks"]["backend"]["ipv4_address"]
    assert env["GATEWAY_TRUSTED_PROXY"] == f"{haproxy_ip}/32"
    assert parse_duration(gateway["stop_grace_period"]) > parse_duration(
        env["GATEWAY_SHUTDOWN_GRACE"]
    )


def test_every_image_has_a_pinned_tag() -> None:
    images = [s["image"] for s in compose()["services"].values() if "image" in s]
    images += [c["image"] for c in [gateway_container()]]
    images += [
        f"{i['newName']}:{i['newTag']}" for i in load_yaml(KUBE / "kustomization.yaml")["images"]
    ]
    args = dockerfile_args()
    images += [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], s.base) for s in STAGES]
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and "/" not in tag, image


# -- the Dockerfile, statically -------------------------------------------------------------


def test_dockerfile_is_multi_stage_on_slim_python() -> None:
    assert STAGES.index(BUILDER) < STAGES.index(FINAL)
    base = re.sub(r"\$\{(\w+)\}", lambda m: dockerfile_args()[m.group(1)], FINAL.base)
    assert base.startswith("python:3.11-slim")
    assert any(args.startswith("--from=builder /opt/gateway ") for args in FINAL.all("COPY"))
    # Nothing is compiled or installed into the final image: no package manager, no compiler.
    final_runs = " ".join(FINAL.all("RUN"))
    for tool in ("apt-get install", "apk add", "gcc", "build-essential", "pip install"):
        assert tool not in final_runs, tool


def test_dockerfile_runs_the_gateway_as_a_non_root_user() -> None:
    user = FINAL.one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) >= 1000 and gid.isdigit()  # numeric: runAsNonRoot checks it
    assert f"--uid {uid}" in " ".join(FINAL.all("RUN"))


def test_dockerfile_entrypoint_healthcheck_and_signals() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert exec_form(FINAL.one("ENTRYPOINT")) == ["gateway"] and "gateway" in scripts
    assert exec_form(FINAL.one("CMD")) == ["serve", "-c", MOUNTED_CONFIG]
    assert FINAL.one("STOPSIGNAL") == "SIGTERM"
    assert FINAL.one("EXPOSE").split() == ["8080", "9091"]
    assert "/healthz" in healthcheck_command()[-1]
    env = " ".join(FINAL.all("ENV"))
    for setting in (
        "PYTHONDONTWRITEBYTECODE=1",
        "PYTHONUNBUFFERED=1",
        f"GATEWAY_CONFIG={MOUNTED_CONFIG}",
    ):
        assert setting in env
    assert f"deploy/gateway.yaml {MOUNTED_CONFIG}" in " ".join(FINAL.all("COPY"))


def test_dockerignore_keeps_secrets_and_clutter_out() -> None:
    entries = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".git", ".venv", "data", "tests/node/node_modules", "**/*.db", "**/*.pem"):
        assert entry in entries, entry
    assert {".pytest_cache", ".mypy_cache", ".ruff_cache", "**/__pycache__"} <= entries
    # What the Dockerfile copies must stay in the build context.
    for needed in ("pyproject.toml", "README.md", "gateway", "deploy", "deploy/gateway.yaml"):
        assert needed not in entries


# -- the entrypoint in a fresh venv, built as the Dockerfile builds it ---------------------

# Paths of the image, moved into the test's temp dir.
IMAGE_VENV, IMAGE_WHEELS, IMAGE_PYTHON = "/opt/gateway", "/wheels", "/usr/local/bin/python3"


def uv_binary() -> str:
    # The builder copies uv from its image; here it comes from the test extras (PyPI "uv").
    try:
        from uv import find_uv_bin
    except ImportError:
        found = shutil.which("uv")
        assert found, "uv is missing: install the test extras (pip install -e '.[test]')"
        return found
    return str(find_uv_bin())


def builder_runs(venv: Path, wheels: Path) -> dict[str, str]:
    """The builder's RUN commands as shell lines for this machine, by what they do."""
    assert "--from=uv /uv /usr/local/bin/uv" in BUILDER.all("COPY")
    runs = {}
    for command in BUILDER.all("RUN"):
        line = command.replace(IMAGE_VENV, str(venv)).replace(IMAGE_WHEELS, str(wheels))
        line = line.replace(IMAGE_PYTHON, sys.executable)  # the base image's interpreter
        line = re.sub(r"(^|&& )uv ", rf"\g<1>{uv_binary()} ", line)
        kind = "wheel" if " build " in line else "venv" if " venv " in line else "install"
        assert kind not in runs, f"two {kind} RUNs: update the test's map of the builder"
        runs[kind] = line
    assert set(runs) == {"venv", "wheel", "install"}
    assert "--requirement pyproject.toml" in runs["venv"]
    assert "--wheel" in runs["wheel"] and "--no-deps" in runs["install"]
    return runs


def build_env() -> dict[str, str]:
    """The builder's ENV; no venv, PYTHONPATH or config of the test run leaks in."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "GATEWAY_CONFIG"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("UV_")}
    for spec in BUILDER.all("ENV"):
        env |= dict(re.findall(r"(\w+)=(\S+)", spec))
    return env


def sh(line: str, cwd: Path, timeout: float) -> None:
    done = subprocess.run(
        ["/bin/sh", "-c", line],
        cwd=cwd,
        env=build_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture
def image_venv(tmp_path: Path) -> Path:
    """The venv of the final image: the builder's COPYs and RUNs, in tmp_path."""
    src, venv, wheels = tmp_path / "src", tmp_path / "opt-gateway", tmp_path / "wheels"
    runs = builder_runs(venv, wheels)
    src.mkdir()
    # The dependency layer and the wheel need nothing of each other: build both at once,
    # each after its own COPY.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for name in ("pyproject.toml", "README.md"):  # COPY pyproject.toml README.md ./
            shutil.copy(ROOT / name, src / name)
        deps = pool.submit(sh, runs["venv"], src, 120)
        shutil.copytree(
            ROOT / "gateway", src / "gateway", ignore=shutil.ignore_patterns("__pycache__")
        )
        wheel = pool.submit(sh, runs["wheel"], src, 120)
        deps.result()
        wheel.result()
    sh(runs["install"], src, 60)
    return venv


def runtime_env(venv: Path, **values: str) -> dict[str, str]:
    """The final stage's ENV with the image's paths moved, plus the container's -e values."""
    env = {"HOME": str(venv.parent), "LANG": "C.UTF-8", "PATH": os.environ.get("PATH", "")}
    for spec in FINAL.all("ENV"):
        for name, value in re.findall(r"(\w+)=(\S+)", spec):
            value = value.replace(IMAGE_VENV, str(venv)).replace("$PATH", env["PATH"])
            env[name] = value.replace(MOUNTED_CONFIG, str(GATEWAY_YAML))
    return env | values


def production_env(keys: Path) -> dict[str, str]:
    return {
        "GATEWAY_PUBLIC_URL": "https://auth.example.com",
        "GATEWAY_DATABASE_URL": "postgresql://gateway:secret@postgres:5432/gateway",
        "GATEWAY_UPSTREAM": "http://echo:9000",
        "GATEWAY_KEYS_DIR": str(keys),  # the mounted secret, here a temp dir
    }


def run(
    venv: Path, args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    exe = str(venv / "bin" / args[0])
    return subprocess.run(
        [exe, *args[1:]], env=env, cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return err.code


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"gateway exited with {proc.returncode} before {url} answered"
        try:
            if http_status(url) == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {timeout}s")


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "var-lib-gateway"  # WORKDIR /var/lib/gateway
    path.mkdir()
    return path


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_image_entrypoint_serves_from_a_fresh_venv(
    image_venv: Path, workdir: Path, tmp_path: Path, started: list[subprocess.Popen[bytes]]
) -> None:
    venv = image_venv
    # Installed, not imported from the checkout: the venv sees its own copy of the package.
    where = run(
        venv,
        ["python", "-c", "import gateway; print(gateway.__file__)"],
        runtime_env(venv),
        workdir,
    )
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr

    # The operator's one-time step: one key ring, shared read-only by every replica.
    keys = tmp_path / "keys"
    env = runtime_env(venv, **production_env(keys))
    rotated = run(venv, ["gateway", "keys", "rotate"], env, workdir)
    assert rotated.returncode == 0, rotated.stderr
    (kid,) = [p.stem for p in keys.glob("*.pem")]

    checked = run(venv, ["gateway", "check-config", "-c", str(GATEWAY_YAML)], env, workdir)
    assert (checked.returncode, checked.stdout.strip()) == (0, "ok"), checked.stderr
    # Negative control: a missing required variable is named with FILE:LINE.
    unset = {k: v for k, v in env.items() if k != "GATEWAY_DATABASE_URL"}
    refused = run(venv, ["gateway", "check-config", "-c", str(GATEWAY_YAML)], unset, workdir)
    assert refused.returncode == 1
    assert re.search(
        rf"{re.escape(str(GATEWAY_YAML))}:\d+: database.url: .*GATEWAY_DATABASE_URL", refused.stderr
    )

    # ENTRYPOINT + CMD as the image runs them, the config "mounted" from deploy/gateway.yaml,
    # on loopback with SQLite (PostgreSQL replicas are the replica tests' subject).
    port, admin = free_port(), free_port()
    env |= {
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_ADMIN_HOST": "127.0.0.1",
        "GATEWAY_ADMIN_PORT": str(admin),
        "GATEWAY_DATABASE_URL": f"sqlite:///{tmp_path / 'gateway.db'}",
        "GATEWAY_UPSTREAM": f"http://127.0.0.1:{free_port()}",
        "GATEWAY_SHUTDOWN_GRACE": "5s",
    }
    command = [
        arg.replace(MOUNTED_CONFIG, str(GATEWAY_YAML))
        for arg in exec_form(FINAL.one("ENTRYPOINT")) + exec_form(FINAL.one("CMD"))
    ]
    command[0] = str(venv / "bin" / command[0])
    with (tmp_path / "gateway.log").open("wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=workdir, stdout=log, stderr=log)
    started.append(proc)
    base = f"http://127.0.0.1:{port}"
    wait_for(f"{base}/healthz", proc, timeout=20)
    assert http_status(f"{base}/readyz") == 200
    assert http_status(f"http://127.0.0.1:{admin}/metrics") == 200
    # It signs with the operator's key and generated none of its own.
    with urllib.request.urlopen(f"{base}/.well-known/jwks.json", timeout=2) as response:
        assert [k["kid"] for k in json.load(response)["keys"]] == [kid]
    assert [p.stem for p in keys.glob("*.pem")] == [kid]

    healthcheck = healthcheck_command()
    healthcheck[0] = str(venv / "bin" / healthcheck[0])

    def probe() -> int:
        return subprocess.run(
            healthcheck, env=env, timeout=10, capture_output=True, check=False
        ).returncode

    assert probe() == 0

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, (tmp_path / "gateway.log").read_text()[-3000:]
    assert probe() != 0  # the HEALTHCHECK notices a gateway that is gone
