#!/usr/bin/env python3
"""Offline checks of the Helm chart deploy/helm/ml-pipeline (no cluster here).

Renders the chart with a real Helm (PyPI's helm-python-sdk: Helm v4's library) for the default
values and for tests/helm/values-*.yaml, lints it strictly, validates every rendered object
against the Kubernetes OpenAPI schemas in strict mode (PyPI's kubernetes-validate, Kubernetes 1.28
and the newest it bundles) and the custom resources against their operators' CRD schemas vendored
in tests/helm/crds/, then checks what no schema knows: every env variable is one its binary
accepts (`<binary> --help` of $HELM_CHECK_BIN_DIR, default target/debug), probes hit the port the
container listens on, PARTITIONS is the same everywhere, no secret outside a Secret, metric pods
get distinct instance numbers, the model replicas find the trainer's GET /model, volumes are
where the services write.

    python3 tests/helm/check.py                  # all checks; exit 1 on the first failure
    python3 tests/helm/check.py --dump-env F     # also write each workload's env (default, large)
    python3 tests/helm/check.py --dump-env F --dump-only   # only that (tests/e2e/chart.rs)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy/helm/ml-pipeline"
HERE = ROOT / "tests/helm"
RELEASE, NAMESPACE = "demo", "ml"
KUBE_VERSIONS = ["1.28.0", kubernetes_validate.latest_version()]
# Read by the logging filter, not a command-line setting (docs/configuration.md).
ENV_NOT_IN_HELP = {"RUST_LOG"}
PORTS = {"features": 9101, "model": 9102, "metric": 9103, "trainer": 9104}
# Copies the chart ships (Helm reads no file outside the chart) and their originals.
COPIES = {
    "files/alerts.yml": "monitoring/prometheus/alerts.yml",
    "files/pipeline.json": "monitoring/grafana/dashboards/pipeline.json",
}
CRDS = {
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): "rabbitmq-cluster-operator/rabbitmq.com_rabbitmqclusters.yaml",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheus-operator/monitoring.coreos.com_prometheusrules.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator/monitoring.coreos.com_servicemonitors.yaml",
}
# Secrets the chart reads but does not make: the operator's, and those named in the values files.
EXTERNAL_SECRETS = {
    f"{RELEASE}-rabbitmq-default-user",
    "managed-rabbitmq",
    "managed-rabbitmq-ca",
    "trainer-admin",
    "rabbitmq-tls",
    "rabbitmq-ca",
}


class Checks:
    """Counts passed checks; the first failure ends the run."""

    def __init__(self) -> None:
        self.passed = 0

    def ok(self, condition: bool, what: str) -> None:
        if not condition:
            print(f"FAIL: {what}", file=sys.stderr)
            sys.exit(1)
        self.passed += 1


def render(values: dict | None) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["__source"] = path
                objects.append(doc)
    return objects


def help_settings(binary: str) -> set[str]:
    bin_dir = Path(os.environ.get("HELM_CHECK_BIN_DIR", ROOT / "target/debug"))
    out = subprocess.run(
        [str(bin_dir / binary), "--help"], capture_output=True, text=True, check=True
    ).stdout
    return set(re.findall(r"\[env: ([A-Z0-9_]+)", out))


def strict_schema(schema):
    """A CRD schema with unknown fields refused, as `kubectl --validate=strict` does."""
    if isinstance(schema, dict):
        schema = {k: strict_schema(v) for k, v in schema.items()}
        pattern = schema.get("pattern")
        if isinstance(pattern, str) and "(?i)" in pattern:
            # Go's regexp takes an inline flag anywhere, Python's only at the start.
            schema["pattern"] = "(?i)" + pattern.replace("(?i)", "")
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict_schema(v) for v in schema]
    return schema


def crd_schema(api_version: str, kind: str) -> dict:
    crd = yaml.safe_load((HERE / "crds" / CRDS[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return strict_schema(v["schema"]["openAPIV3Schema"])
    raise SystemExit(f"{kind}: no version {version} in its CRD")


def workloads(objects: list[dict]) -> dict[str, dict]:
    found = {}
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet"):
            component = o["metadata"]["labels"]["app.kubernetes.io/component"]
            found[component] = o
    return found


def container(workload: dict) -> dict:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(workload: dict) -> dict[str, object]:
    env = {}
    for e in container(workload).get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            env[e["name"]] = e["valueFrom"]
    return env


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


SECRET_URL = re.compile(r"amqps?://[^/@\s]+:[^/@\s]+@")
SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|KEY$")


def check_scenario(c: Checks, name: str, values: dict, bins: dict[str, set[str]]) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    merged = chart.merge_values(values)
    report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    c.ok(not problems, f"{name}: helm lint --strict: {problems}")
    objects = render(values)
    c.ok(len(objects) >= 10, f"{name}: only {len(objects)} objects rendered")

    # Schemas: Kubernetes' own in strict mode, the operators' CRDs for their kinds.
    for o in objects:
        body = {k: v for k, v in o.items() if k != "__source"}
        what = f"{name}: {o['kind']} {o['metadata']['name']} ({o['__source']})"
        key = (o["apiVersion"], o["kind"])
        if key in CRDS:
            try:
                jsonschema.validate(body, crd_schema(*key))
            except jsonschema.ValidationError as err:
                c.ok(False, f"{what}: against its CRD: {err.message} at {list(err.absolute_path)}")
            c.ok(True, what)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(body, version, strict=True)
                c.ok(True, what)
            except kubernetes_validate.ValidationError as err:
                c.ok(False, f"{what}: Kubernetes {version}: {err.message} at {list(err.path)}")
            except kubernetes_validate.SchemaNotFoundError:
                c.ok(False, f"{what}: no Kubernetes {version} schema for {key}")
        c.ok(o["metadata"].get("labels", {}).get("app.kubernetes.io/instance") == RELEASE, f"{what}: release label")

    found = workloads(objects)
    expected = {"model", "metric"} | {w for w in ("features", "trainer") if merged[w]["enabled"]}
    c.ok(set(found) == expected, f"{name}: workloads {sorted(found)}, expected {sorted(expected)}")
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    partitions = str(merged["partitions"])

    for component, w in found.items():
        what = f"{name}: {component}"
        ctr = container(w)
        pod = w["spec"]["template"]["spec"]
        env = env_of(w)
        # Every env variable is a setting of the binary (args name the binary).
        binary = ctr["args"][0]
        c.ok(binary == component, f"{what}: runs {binary}")
        for var in env:
            c.ok(var in bins[binary] or var in ENV_NOT_IN_HELP, f"{what}: {binary} does not accept {var} (not in --help)")
        names = [e["name"] for e in ctr["env"]]
        c.ok(len(names) == len(set(names)), f"{what}: an env variable twice: {names}")
        # The same PARTITIONS everywhere.
        c.ok(env.get("PARTITIONS") == partitions, f"{what}: PARTITIONS {env.get('PARTITIONS')} != {partitions}")
        # Ports: HTTP_ADDR's port is the container port the probes and Services use.
        port = int(str(env.get("HTTP_ADDR", "")).rsplit(":", 1)[-1])
        c.ok(port == PORTS[component], f"{what}: HTTP_ADDR port {port}")
        ports = {p["name"]: p["containerPort"] for p in ctr["ports"]}
        c.ok(ports.get("http") == port, f"{what}: container port http {ports} != HTTP_ADDR {port}")
        for probe in ("readinessProbe", "livenessProbe"):
            get = ctr[probe]["httpGet"]
            target = ports.get(get["port"], get["port"])
            c.ok(target == port and get["path"] == "/healthz", f"{what}: {probe} on {get}")
        live = ctr["livenessProbe"]
        c.ok(live["periodSeconds"] * live["failureThreshold"] >= 300, f"{what}: liveness restarts within 5 minutes of a broker outage")
        # Non-root, read-only root, no capabilities, resources.
        sc = ctr["securityContext"]
        c.ok(sc.get("readOnlyRootFilesystem") is True and sc.get("allowPrivilegeEscalation") is False, f"{what}: securityContext {sc}")
        c.ok(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: capabilities {sc}")
        c.ok(pod["securityContext"].get("runAsNonRoot") is True and pod["securityContext"].get("runAsUser", 0) != 0, f"{what}: pod runs as root")
        c.ok(pod["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{what}: seccomp")
        c.ok({"requests", "limits"} <= set(ctr.get("resources", {})), f"{what}: resources")
        mounts = {m["mountPath"]: m["name"] for m in ctr.get("volumeMounts", [])}
        c.ok("/tmp" in mounts, f"{what}: a writable /tmp")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for mount_name in mounts.values():
            c.ok(mount_name in volumes or mount_name in claims, f"{what}: mount {mount_name} has no volume")
        # No secret outside a Secret: values are plain only when they hold none.
        for e in ctr["env"]:
            if "value" in e:
                c.ok(not SECRET_URL.search(e["value"]), f"{what}: {e['name']} holds credentials in plain text")
                c.ok(not SECRET_NAME.search(e["name"]) or e["name"] == "AMQP_CA_FILE", f"{what}: {e['name']} is a secret in plain text")
            else:
                ref = e["valueFrom"].get("secretKeyRef")
                c.ok(ref is not None, f"{what}: {e['name']} from {e['valueFrom']}")
                c.ok(ref["name"] in secrets or ref["name"] in EXTERNAL_SECRETS, f"{what}: {e['name']} from unknown Secret {ref['name']}")
        url = env.get("AMQP_URL")
        c.ok(url is not None, f"{what}: no AMQP_URL")
        if merged["broker"]["cluster"]["enabled"]:
            c.ok(isinstance(env.get("AMQP_PASSWORD"), dict) and isinstance(env.get("AMQP_USERNAME"), dict), f"{what}: credentials from the operator's Secret")
        else:
            c.ok(isinstance(url, dict), f"{what}: AMQP_URL from the existing Secret")
        if merged["broker"]["tls"]["caSecret"]:
            ca = env.get("AMQP_CA_FILE", "")
            c.ok(any(ca.startswith(p + "/") for p in mounts), f"{what}: AMQP_CA_FILE {ca} not mounted")
        if "DATA_PATH" in env and merged["data"]["configMap"]:
            c.ok(any(env["DATA_PATH"].startswith(p + "/") for p in mounts), f"{what}: DATA_PATH {env['DATA_PATH']} not mounted")
        # A Service in front of every workload, selecting its pods on the port the probes use.
        fronts = [s for s in services.values() if labels_match(s["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        c.ok(fronts and all(p["targetPort"] == "http" for s in fronts for p in s["spec"]["ports"]), f"{what}: no Service on its port")
        c.ok(labels_match(w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]), f"{what}: selector")

    # Metric instances: N pods named <sts>-<n>, each its own instance (from the host name).
    metric = found["metric"]
    instances = merged["metric"]["instances"]
    menv = env_of(metric)
    c.ok(metric["kind"] == "StatefulSet" and metric["spec"]["replicas"] == instances, f"{name}: metric StatefulSet of {instances}")
    c.ok(menv.get("METRIC_INSTANCES") == str(instances), f"{name}: METRIC_INSTANCES {menv.get('METRIC_INSTANCES')}")
    c.ok("METRIC_INSTANCE" not in menv, f"{name}: METRIC_INSTANCE set: every pod would be the same instance")
    pods = [f"{metric['metadata']['name']}-{i}" for i in range(instances)]
    numbers = [int(re.search(r"-(\d+)$", p).group(1)) for p in pods]
    c.ok(sorted(numbers) == list(range(instances)), f"{name}: metric instance numbers {numbers}")
    c.ok(instances <= merged["partitions"], f"{name}: more instances than partitions")
    log_dir = menv.get("LOG_DIR")
    claim_mounts = {m["mountPath"] for m in container(metric)["volumeMounts"] if m["name"] in {t["metadata"]["name"] for t in metric["spec"]["volumeClaimTemplates"]}}
    c.ok(log_dir in claim_mounts, f"{name}: LOG_DIR {log_dir} is not on the pod's volume {claim_mounts}")

    # The model replicas read the trainer's GET /model through its Service.
    model_env = env_of(found["model"])
    c.ok(found["model"]["spec"]["replicas"] == merged["model"]["replicas"], f"{name}: model replicas")
    c.ok("MODEL_PATH" not in model_env, f"{name}: the model replicas have a MODEL_PATH")
    if "trainer" in found:
        m = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/model", str(model_env.get("MODEL_URL")))
        c.ok(m is not None, f"{name}: MODEL_URL {model_env.get('MODEL_URL')}")
        svc = services.get(m.group(1))
        c.ok(svc is not None, f"{name}: no Service {m.group(1)} for MODEL_URL")
        c.ok(any(p["port"] == int(m.group(2)) and p["targetPort"] == "http" for p in svc["spec"]["ports"]), f"{name}: MODEL_URL port")
        c.ok(labels_match(svc["spec"]["selector"], found["trainer"]["spec"]["template"]["metadata"]["labels"]), f"{name}: MODEL_URL's Service is not the trainer's")
        tenv = env_of(found["trainer"])
        tmounts = {m["mountPath"]: m["name"] for m in container(found["trainer"])["volumeMounts"]}
        tvolumes = {v["name"]: v for v in found["trainer"]["spec"]["template"]["spec"]["volumes"]}
        models_dir = str(Path(tenv["MODEL_PATH"]).parent)
        c.ok(models_dir in tmounts and "persistentVolumeClaim" in tvolumes[tmounts[models_dir]], f"{name}: MODEL_PATH not on the trainer's claim")
        c.ok(tenv["TRAIN_DIR"].startswith(models_dir + "/"), f"{name}: TRAIN_DIR not on the trainer's claim")
        model_file = values.get("trainer", {}).get("modelFile", "model.json")
        c.ok(Path(tenv["MODEL_PATH"]).name == model_file, f"{name}: MODEL_PATH {tenv['MODEL_PATH']} is not trainer.modelFile {model_file}")
        c.ok(isinstance(tenv.get("ADMIN_TOKEN"), dict), f"{name}: the trainer's POST routes have no token from a Secret")
        c.ok(found["trainer"]["spec"]["replicas"] == 1 and found["trainer"]["spec"]["strategy"]["type"] == "Recreate", f"{name}: one trainer")
        metric_url = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", tenv["METRIC_URL"])
        c.ok(metric_url and metric_url.group(1) in services, f"{name}: METRIC_URL {tenv['METRIC_URL']}")

    # Disruption budgets for model and metric, a NetworkPolicy over every pod.
    for component in ("model", "metric"):
        pdbs = [o for o in objects if o["kind"] == "PodDisruptionBudget" and labels_match(o["spec"]["selector"]["matchLabels"], found[component]["spec"]["template"]["metadata"]["labels"])]
        c.ok(len(pdbs) == 1, f"{name}: PodDisruptionBudget of {component}")
    if merged["networkPolicy"]["enabled"]:
        policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
        c.ok(len(policies) == 1, f"{name}: one NetworkPolicy")
        sel = policies[0]["spec"]["podSelector"]["matchLabels"]
        for component, w in found.items():
            c.ok(labels_match(sel, w["spec"]["template"]["metadata"]["labels"]), f"{name}: {component} outside the NetworkPolicy")
        sources = policies[0]["spec"]["ingress"][0]["from"]
        c.ok(len(sources) == 2 and "namespaceSelector" in sources[1], f"{name}: NetworkPolicy sources {sources}")

    # Credentials only in Secrets: no ConfigMap or other object holds one.
    for o in objects:
        text = json.dumps({k: v for k, v in o.items() if k != "__source"})
        if o["kind"] != "Secret":
            c.ok(not SECRET_URL.search(text), f"{name}: {o['kind']} {o['metadata']['name']} holds a URL with credentials")
            c.ok("guest:guest" not in text, f"{name}: {o['kind']} {o['metadata']['name']} holds the default credentials")
    for o in objects:
        if o["kind"] == "RabbitmqCluster":
            c.ok(o["spec"]["replicas"] == 3, f"{name}: RabbitmqCluster replicas")
        if o["kind"] == "PrometheusRule":
            alerts = {r["alert"] for g in o["spec"]["groups"] for r in g["rules"]}
            source = yaml.safe_load((ROOT / "monitoring/prometheus/alerts.yml").read_text())
            c.ok(alerts == {r["alert"] for g in source["groups"] for r in g["rules"]}, f"{name}: PrometheusRule alerts {alerts}")
        if o["kind"] == "ConfigMap" and o["metadata"]["labels"].get("grafana_dashboard") == "1":
            c.ok(json.loads(next(iter(o["data"].values()))) == json.loads((ROOT / COPIES["files/pipeline.json"]).read_text()), f"{name}: dashboard ConfigMap")
    return objects


def dump_env(objects: list[dict]) -> dict:
    out = {}
    for component, w in workloads(objects).items():
        out[component] = {
            "kind": w["kind"],
            "name": w["metadata"]["name"],
            "replicas": w["spec"]["replicas"],
            "args": container(w)["args"],
            "env": env_of(w),
            "port": container(w)["ports"][0]["containerPort"],
        }
    services = {}
    for o in objects:
        if o["kind"] == "Service":
            services[o["metadata"]["name"]] = {
                "component": o["metadata"]["labels"]["app.kubernetes.io/component"],
                "port": o["spec"]["ports"][0]["port"],
            }
    return {"workloads": out, "services": services}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump-env", type=Path, help="write each workload's env (default and large) as JSON")
    parser.add_argument("--dump-only", action="store_true", help="with --dump-env: render and write, no checks (tests/e2e/chart.rs)")
    args = parser.parse_args()
    if args.dump_only:
        if not args.dump_env:
            parser.error("--dump-only needs --dump-env")
        large = yaml.safe_load((HERE / "values-large.yaml").read_text())
        settings = {"default": render({}), "large": render(large)}
        args.dump_env.write_text(json.dumps({n: dump_env(o) for n, o in settings.items()}, indent=2))
        return
    c = Checks()
    for copy_path, original in COPIES.items():
        c.ok((CHART / copy_path).read_bytes() == (ROOT / original).read_bytes(),
             f"{CHART / copy_path} differs from {original}: copy it again")
    bins = {b: help_settings(b) for b in PORTS}
    for b, settings in bins.items():
        c.ok("AMQP_URL" in settings and "PARTITIONS" in settings, f"{b} --help lists no settings: {settings}")
    scenarios = {"default": {}}
    for path in sorted(HERE.glob("values-*.yaml")):
        scenarios[path.stem.removeprefix("values-")] = yaml.safe_load(path.read_text())
    # Refused values: the schema and the chart's own guards.
    for bad, why in [({"partitions": 0}, "minimum"), ({"metric": {"instances": 4}}, "must not exceed"),
                     ({"broker": {"cluster": {"enabled": False}}}, "existingSecret is required"),
                     ({"unknown": 1}, "additional properties")]:
        try:
            render(bad)
            c.ok(False, f"values {bad} rendered")
        except helm.HelmError as err:
            c.ok(why in str(err), f"values {bad}: {err}")
    rendered = {}
    for name, values in scenarios.items():
        rendered[name] = check_scenario(c, name, copy.deepcopy(values), bins)
        kinds = sorted({o["kind"] for o in rendered[name]})
        print(f"{name}: {len(rendered[name])} objects ({', '.join(kinds)})")
    # The large setting: six partitions over three metric pods, four replicas.
    large = workloads(rendered["large"])
    c.ok(env_of(large["metric"])["PARTITIONS"] == "6" and large["metric"]["spec"]["replicas"] == 3 and large["model"]["spec"]["replicas"] == 4, "large setting")
    if args.dump_env:
        args.dump_env.write_text(json.dumps({n: dump_env(rendered[n]) for n in ("default", "large")}, indent=2))
        print(f"wrote {args.dump_env}")
    print(f"helm chart: {c.passed} checks passed (Kubernetes {', '.join(KUBE_VERSIONS)}; helm-python-sdk {helm.__version__}, Helm {helm.helm_sdk_version()})")


if __name__ == "__main__":
    main()
