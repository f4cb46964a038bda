#!/usr/bin/env python3
"""Lint and render the pier chart offline and validate what it renders.

helm lint (Helm's own SDK, through helm-python-sdk) must find no errors; the chart is rendered
with its defaults plus a cluster secret, and again with the ServiceMonitor and hostPorts on;
every rendered core object is validated against the Kubernetes OpenAPI schema
(kubernetes-validate), and the DaemonSet is checked for what pier needs: host data, the
cluster secret, the join address, probes, resource limits and the containerd hosts.toml init
container with its restore on stop. Exit status 0 only when all of that holds.

    pip install helm-python-sdk==0.2.2 kubernetes-validate==1.37.0
    python3 deploy/helm/check.py
"""
import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pier")
K8S_VERSION = "1.30.0"
failures = []


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        failures.append(what)


def render(values):
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name="pier", namespace="infra")
    docs = []
    for name, text in files.items():
        if not name.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((name, doc))
    return docs


def validate(docs):
    for name, doc in docs:
        kind = doc["kind"]
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # A CRD: kubernetes-validate knows only the core API.
            check(doc["spec"]["endpoints"][0]["port"] == "http", f"{kind} scrapes the http port")
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            check(True, f"{kind} {doc['metadata']['name']} is schema-valid ({name})")
        except kubernetes_validate.ValidationError as e:
            check(False, f"{kind} {doc['metadata']['name']} is schema-valid: {e.message}")


def main():
    lint = helm.lint(CHART, values={"clusterSecret": {"value": "x" * 32}})
    for m in lint.get("messages", []):
        print(f"     lint: {m}")
    # Helm's severities: 1 info, 2 warning, 4 error.
    errors = list(lint.get("errors") or []) + [
        m for m in lint.get("messages", []) if m.get("severity", 0) >= 2
    ]
    check(lint.get("total_charts_linted") == 1 and not errors, f"helm lint: no warnings or errors {errors}")

    base = {"clusterSecret": {"value": "0123456789abcdef0123456789abcdef"}}
    docs = render(base)
    validate(docs)
    kinds = {d["kind"] for _, d in docs}
    check({"DaemonSet", "Service", "ConfigMap", "Secret"} <= kinds, f"renders {sorted(kinds)}")
    ds = next(d for _, d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    main = pod["containers"][0]
    args = main["command"]
    check(pod.get("hostNetwork") is True, "host networking by default")
    check(
        "pier-peers.infra.svc.cluster.local:5001" in args,
        "joins through the headless Service",
    )
    check("--cluster-secret-file" in args, "the cluster secret from the Secret")
    vols = {v["name"]: v for v in pod["volumes"]}
    check(vols["data"]["hostPath"]["path"] == "/var/lib/pier", "data on a hostPath")
    check(vols["cluster-secret"]["secret"]["secretName"] == "pier-cluster", "secret volume")
    check(main["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe on /readyz")
    check(main["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe on /healthz")
    check("memory" in main["resources"]["limits"], "a memory limit")
    init = pod["initContainers"][0]["command"]
    check(init[:3] == ["pier", "config", "containerd"], "init container writes hosts.toml")
    check(
        main["lifecycle"]["preStop"]["exec"]["command"][-1] == "--restore",
        "hosts.toml restored when the pod stops",
    )

    other = dict(base)
    other.update(
        {"hostNetwork": False, "serviceMonitor": {"enabled": True}, "containerd": {"configure": False}}
    )
    docs = render(other)
    validate(docs)
    ds = next(d for _, d in docs if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    ports = pod["containers"][0]["ports"]
    check(all(p.get("hostPort") for p in ports), "hostPorts without host networking")
    check("initContainers" not in pod, "no init container when containerd is not configured")
    check(any(d["kind"] == "ServiceMonitor" for _, d in docs), "a ServiceMonitor on request")

    try:
        render({})
        check(False, "a missing cluster secret is refused")
    except Exception as e:  # Helm's template `fail`
        check("clusterSecret" in str(e), "a missing cluster secret is refused with a message")

    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
