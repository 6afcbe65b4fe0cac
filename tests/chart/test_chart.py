"""The Helm chart, rendered by a real `helm` with realistic value sets.

What is checked, and why:
- `helm lint --strict` passes and every rendered document validates against the
  Kubernetes schemas (offline, strict: unknown fields fail), the sidecar template too;
- RBAC is least privilege: exactly the rules the operator uses, no wildcards, Secrets
  read-only, no built-in admin roles; namespaced mode grants nothing cluster-wide but
  TokenReviews;
- every container is hardened (non-root, read-only root, no privilege escalation, no
  capabilities, RuntimeDefault seccomp) and probed on /live and /ready;
- the operator and the ingress dataplane get the flags of api.md, the shared token,
  an emptyDir for --state-dir, PodDisruptionBudgets; the Service type, HPA and
  webhooks follow the values;
- the webhook TLS is consistent (Helm's CA signs the serving certificate for the
  Service's name, and is the webhooks' caBundle; or cert-manager does it all);
- bad values fail `helm template` with a message that names the key;
- monitoring: the ServiceMonitor reaches the dataplanes' admin port through a Service of
  its own (never the public one), and the Grafana dashboard is valid JSON whose queries
  name only metrics the dataplane exports.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import re
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.chart.conftest import (
    CHART,
    NAMESPACE,
    REPO,
    VALUE_SETS,
    Helm,
    Rendered,
    values_args,
)

KUBERNETES_VERSION = "1.33.0"
SETS = list(VALUE_SETS)
RenderFn = Callable[[str], Rendered]

# Kinds from other projects' CRDs the chart may render (cert-manager mode).
EXTERNAL_KINDS = {("cert-manager.io/v1", "Issuer"), ("cert-manager.io/v1", "Certificate"),
                  ("monitoring.coreos.com/v1", "ServiceMonitor")}

HARDENED = {
    "runAsNonRoot": True,
    "readOnlyRootFilesystem": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}

OPERATOR_RULES = [
    {"apiGroups": ["kanal.dev"], "resources": ["routes", "upstreams", "egresspolicies"],
     "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": ["kanal.dev"],
     "resources": ["routes/status", "upstreams/status", "egresspolicies/status"],
     "verbs": ["get", "patch", "update"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
     "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
    {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
]
TOKENREVIEW_RULES = [
    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
]
LEADER_ELECTION_ROLE = "kanal-operator-leader-election"


def leader_election_rules(operator: str) -> list[dict[str, Any]]:
    return [
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "resourceNames": [operator, f"{operator}-dataplanes"],
         "verbs": ["get", "update", "patch"]},
    ]


@pytest.fixture(params=SETS)
def rendered(request: pytest.FixtureRequest, render: RenderFn) -> Rendered:
    return render(request.param)


def deployment(r: Rendered, component: str) -> dict[str, Any]:
    return r.one("Deployment", f"-{component}")


def pod_containers(pod_spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from pod_spec.get("initContainers", [])
    yield from pod_spec["containers"]


def sidecar_template(r: Rendered) -> dict[str, Any]:
    config_map = r.one("ConfigMap", "-sidecar")
    template: dict[str, Any] = yaml.safe_load(config_map["data"]["sidecar.yaml"])
    return template


def args_of(container: dict[str, Any]) -> dict[str, str | bool]:
    """`--flag=value` and bare `--flag` arguments as a dict (the sub-command excluded)."""
    out: dict[str, str | bool] = {}
    for arg in container["args"][1:]:
        name, sep, value = arg.partition("=")
        out[name] = value if sep else True
    return out


def mount_of(pod_spec: dict[str, Any], container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mounted in `container` at the folder holding `path` (or at `path`)."""
    for mount in container.get("volumeMounts", []):
        if path == mount["mountPath"] or path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volumes = {v["name"]: v for v in pod_spec["volumes"]}
            return volumes[mount["name"]]
    raise AssertionError(f"{container['name']}: nothing mounted at {path}")


# --------------------------------------------------------------------------- lint, schemas


def test_helm_lint_strict_with_every_value_set(helm: Helm) -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(SETS, pool.map(
            lambda name: helm.run("lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                                  *values_args(VALUE_SETS[name])), SETS), strict=True))
    failed = {name: r.stdout + r.stderr for name, r in results.items() if r.returncode != 0}
    assert not failed, failed


@functools.cache
def _schema_file(filename: str) -> Any:
    return _original_schema_contents(filename, KUBERNETES_VERSION)


# kubernetes_validate re-reads its 1 MB definitions file for every document: cache it.
_original_schema_contents = kubernetes_validate.utils.schema_contents


def validate_kubernetes(doc: dict[str, Any], where: str) -> None:
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(kubernetes_validate.utils, "schema_contents",
                          lambda filename, _version: _schema_file(filename))
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        raise AssertionError(f"{where}: {doc['kind']}/{doc['metadata']['name']}: "
                             f"{path}: {exc.message}") from None


def test_every_document_validates_against_the_kubernetes_schemas(rendered: Rendered) -> None:
    kinds = set()
    for doc in rendered.docs:
        kinds.add(doc["kind"])
        if (doc["apiVersion"], doc["kind"]) in EXTERNAL_KINDS:
            if doc["kind"] == "ServiceMonitor":
                assert rendered.values["serviceMonitor"]["enabled"], doc
            else:
                assert rendered.values["webhook"]["certManager"]["enabled"], doc
            continue
        validate_kubernetes(doc, rendered.name)
    assert {"CustomResourceDefinition", "Deployment", "Service", "ServiceAccount",
            "PodDisruptionBudget", "Secret"} <= kinds


def test_the_sidecar_template_makes_a_valid_pod(rendered: Rendered) -> None:
    if not rendered.values["webhook"]["enabled"]:
        assert not rendered.of_kind("ConfigMap")
        return
    template = sidecar_template(rendered)
    assert set(template) <= {"containers", "initContainers", "volumes", "appEnv", "inbound"}
    app = {"name": "app", "image": "example/app:1"}
    pod = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "injected"},
        "spec": {"containers": [app, *template.get("containers", [])],
                 "initContainers": template.get("initContainers", []),
                 "volumes": template["volumes"]},
    }
    validate_kubernetes(pod, f"{rendered.name} sidecar template")
    mounted = {m["name"] for c in pod_containers(pod["spec"]) for m in c.get("volumeMounts", [])}
    assert mounted == {v["name"] for v in template["volumes"]}
    (sidecar,) = [c for c in pod_containers(pod["spec"]) if c["name"] == "kanal-sidecar"]
    native = rendered.values["sidecar"]["native"]
    assert (sidecar in template.get("initContainers", [])) is native
    assert (sidecar.get("restartPolicy") == "Always") is native
    # What the webhook gives the app: the forward listener as its proxy, and the inbound
    # port the sidecar listens on when the pod names its app port.
    ports = rendered.values["sidecar"]["ports"]
    assert template["inbound"] == {"port": ports["inbound"]}
    if ports["forward"]:
        proxy = f"http://127.0.0.1:{ports['forward']}"
        assert args_of(sidecar)["--forward-listen"] == f"127.0.0.1:{ports['forward']}"
        assert template["appEnv"] == [
            {"name": "HTTP_PROXY", "value": proxy}, {"name": "HTTPS_PROXY", "value": proxy},
            {"name": "NO_PROXY", "value": "localhost,127.0.0.1,::1"}]
    else:
        assert "appEnv" not in template
    assert args_of(sidecar)["--listen"] == f"127.0.0.1:{ports['listen']}"
    assert args_of(sidecar)["--mode"] == "sidecar"


# --------------------------------------------------------------------------- RBAC


def rbac_rules(r: Rendered) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(kind, namespace, rule) for every rule of every Role and ClusterRole."""
    return [(doc["kind"], doc["metadata"].get("namespace"), rule)
            for doc in r.docs if doc["kind"] in ("Role", "ClusterRole")
            for rule in doc.get("rules", [])]


def test_rbac_has_no_wildcards_and_secrets_are_read_only(rendered: Rendered) -> None:
    for kind, _, rule in rbac_rules(rendered):
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule.get(key, []), (kind, rule)
        assert not rule.get("nonResourceURLs"), rule
        assert not rule.get("resourceNames") or rule["resources"] == ["leases"], rule
        assert not {"escalate", "bind", "impersonate", "delete", "deletecollection"} \
            & set(rule["verbs"]), rule
        if "secrets" in rule["resources"]:
            assert set(rule["verbs"]) <= {"get", "list", "watch"}, rule
        if "create" in rule["verbs"]:
            assert set(rule["resources"]) <= {"events", "tokenreviews", "leases"}, rule
        if "leases" in rule["resources"]:  # only in the release namespace
            assert kind == "Role", rule


def test_rbac_binds_no_builtin_role_and_only_the_operator(rendered: Rendered) -> None:
    roles = {(doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace"))
             for doc in rendered.docs if doc["kind"] in ("Role", "ClusterRole")}
    operator_sa = deployment(rendered, "operator")["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = [doc for doc in rendered.docs if doc["kind"] in ("RoleBinding", "ClusterRoleBinding")]
    assert bindings
    for binding in bindings:
        ref = binding["roleRef"]
        assert ref["name"] not in ("cluster-admin", "admin", "edit", "view"), binding
        namespace = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        assert (ref["kind"], ref["name"], namespace) in roles, binding
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": operator_sa, "namespace": NAMESPACE}]


def test_rbac_grants_exactly_what_the_operator_uses(rendered: Rendered) -> None:
    namespaced = rendered.values["rbac"]["namespaced"]
    cluster = [rule for kind, _, rule in rbac_rules(rendered) if kind == "ClusterRole"]
    election = [doc for doc in rendered.docs if doc["kind"] in ("Role", "RoleBinding")
                and doc["metadata"]["name"] == LEADER_ELECTION_ROLE]
    if rendered.values["operator"]["leaderElection"]["enabled"]:
        role = next(doc for doc in election if doc["kind"] == "Role")
        assert role["metadata"]["namespace"] == NAMESPACE
        assert role["rules"] == leader_election_rules("kanal-operator")
        binding = next(doc for doc in election if doc["kind"] == "RoleBinding")
        assert binding["metadata"]["namespace"] == NAMESPACE
        assert binding["roleRef"]["name"] == LEADER_ELECTION_ROLE
    else:
        assert not election
    rendered = Rendered(rendered.name, [doc for doc in rendered.docs if doc not in election],
                        rendered.values)
    if namespaced:
        assert cluster == TOKENREVIEW_RULES
        watched = rendered.values["watchNamespaces"]
        roles = rendered.of_kind("Role")
        assert sorted(role["metadata"]["namespace"] for role in roles) == sorted(watched)
        for role in roles:
            assert role["rules"] == OPERATOR_RULES
        assert {b["metadata"]["namespace"] for b in rendered.of_kind("RoleBinding")} == set(watched)
    else:
        assert not rendered.of_kind("Role") and not rendered.of_kind("RoleBinding")
        assert sorted(map(str, cluster)) == sorted(map(str, OPERATOR_RULES + TOKENREVIEW_RULES))
    # No kopf peering, no namespace or CRD scanning, no webhook self-registration.
    granted = {(group, resource) for _, _, rule in rbac_rules(rendered)
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert not {group for group, _ in granted} & {
        "kopf.dev", "zalando.org", "admissionregistration.k8s.io", "apiextensions.k8s.io"}
    assert ("", "namespaces") not in granted


def test_the_dataplane_has_no_kubernetes_api_rights(rendered: Rendered) -> None:
    if not rendered.values["dataplane"]["enabled"]:
        return
    pod = deployment(rendered, "dataplane")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    subjects = [s["name"] for doc in rendered.docs
                if doc["kind"] in ("RoleBinding", "ClusterRoleBinding") for s in doc["subjects"]]
    assert pod["serviceAccountName"] not in subjects


# --------------------------------------------------------------------------- pods


def all_pod_specs(r: Rendered) -> list[tuple[str, dict[str, Any]]]:
    specs = [(doc["metadata"]["name"], doc["spec"]["template"]["spec"])
             for doc in r.of_kind("Deployment")]
    if r.values["webhook"]["enabled"]:
        template = sidecar_template(r)
        specs.append(("sidecar", {"containers": template.get("containers", []),
                                  "initContainers": template.get("initContainers", [])}))
    return specs


def test_every_container_is_hardened_and_probed(rendered: Rendered) -> None:
    checked = 0
    for name, pod in all_pod_specs(rendered):
        if name != "sidecar":
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod_containers(pod):
            where = f"{rendered.name}: {name}/{container['name']}"
            context = container["securityContext"]
            for key, value in HARDENED.items():
                assert context.get(key) == value, f"{where}: securityContext.{key}"
            assert context.get("privileged") is False, where
            assert context.get("runAsUser", 10001) != 0, where
            for probe, path in (("livenessProbe", "/live"), ("readinessProbe", "/ready")):
                assert container[probe]["httpGet"]["path"] == path, f"{where}: {probe}"
            port = container["readinessProbe"]["httpGet"]["port"]
            ports = {p["name"]: p["containerPort"] for p in container["ports"]}
            assert port in ports or port in ports.values(), where
            admin = args_of(container)["--admin"]
            assert isinstance(admin, str) and admin.endswith(f":{ports.get(port, port)}"), where
            assert container["resources"]["requests"] and container["resources"]["limits"]
            checked += 1
    assert checked >= 2


def test_pod_disruption_budgets_cover_operator_and_dataplane(rendered: Rendered) -> None:
    pdbs = rendered.of_kind("PodDisruptionBudget")
    components = ["operator"] + (["dataplane"] if rendered.values["dataplane"]["enabled"] else [])
    assert len(pdbs) == len(components)
    for component in components:
        pdb = rendered.one("PodDisruptionBudget", f"-{component}")
        labels = deployment(rendered, component)["spec"]["template"]["metadata"]["labels"]
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items()
        assert pdb["spec"]["minAvailable"] == \
            rendered.values[component]["podDisruptionBudget"]["minAvailable"]


def test_operator_runs_replicas_with_the_flags_of_api_md(rendered: Rendered) -> None:
    values = rendered.values
    deploy = deployment(rendered, "operator")
    assert deploy["spec"]["replicas"] == values["operator"]["replicas"] >= 2
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "operator"
    assert container["image"] == image_of(values)
    args = args_of(container)
    assert args["--config-listen"] == "0.0.0.0:9000"
    assert args["--admin"] == "0.0.0.0:9901"
    assert args.get("--allow-loopback-endpoints", False) is values["operator"]["allowLoopbackEndpoints"]
    if values["watchNamespaces"]:
        assert args["--namespaces"] == ",".join(values["watchNamespaces"])
    else:
        assert "--namespaces" not in args
    token = mount_of(pod, container, str(args["--token-file"]))
    assert token["secret"]["secretName"] == token_secret_name(rendered)
    env = {item["name"]: item.get("value") for item in container["env"]}
    election = values["operator"]["leaderElection"]
    if election["enabled"]:
        assert env["KANAL_LEADER_ELECTION"] == "true"
        assert env["KANAL_LEASE_NAME"] == "kanal-operator"
        assert env["KANAL_LEASE_DURATION"] == str(election["leaseDuration"])
        assert {"POD_NAME", "POD_NAMESPACE"} <= env.keys()  # identity, Lease namespace
    else:
        assert not {name for name in env if name.startswith("KANAL_LEASE")} \
            and "KANAL_LEADER_ELECTION" not in env


def test_the_config_service_reaches_the_operator(rendered: Rendered) -> None:
    service = rendered.one("Service", "-config")
    labels = deployment(rendered, "operator")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["type"] == "ClusterIP"
    (config,) = [p for p in service["spec"]["ports"] if p["name"] == "config"]
    assert config["port"] == 9000 and config["targetPort"] == "config"
    url = f"http://{service['metadata']['name']}.{NAMESPACE}.svc:9000"
    if rendered.values["dataplane"]["enabled"]:
        (dp,) = deployment(rendered, "dataplane")["spec"]["template"]["spec"]["containers"]
        assert args_of(dp)["--control-plane"] == url
    if rendered.values["webhook"]["enabled"]:
        sidecar = next(c for _, pod in all_pod_specs(rendered)[-1:] for c in pod_containers(pod))
        assert args_of(sidecar)["--control-plane"] == url


def test_the_ingress_dataplane(rendered: Rendered) -> None:
    values = rendered.values["dataplane"]
    if not values["enabled"]:
        assert not [d for d in rendered.docs if d["metadata"]["name"].endswith("-dataplane")
                    and d["kind"] != "ServiceAccount"]
        return
    deploy = deployment(rendered, "dataplane")
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = args_of(container)
    assert container["args"][0] == "dataplane"
    assert container["image"] == image_of(rendered.values)
    assert args["--mode"] == "ingress"
    assert args["--listen"] == "0.0.0.0:8080" and args["--tls-listen"] == "0.0.0.0:8443"
    assert args["--trusted-hops"] == str(values["trustedHops"])
    assert "emptyDir" in mount_of(pod, container, str(args["--state-dir"]))
    token = mount_of(pod, container, str(args["--token-file"]))
    assert token["secret"]["secretName"] == token_secret_name(rendered)
    assert deploy["spec"]["template"]["metadata"]["labels"]["kanal.dev/inject"] == "false"

    service = rendered.one("Service", "-dataplane")
    assert service["spec"]["type"] == values["service"]["type"]
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["http"]["port"] == values["service"]["httpPort"]
    assert ports["https"]["port"] == values["service"]["httpsPort"]
    for name in ("http", "https"):
        assert ports[name].get("nodePort") == values["service"]["nodePorts"][name]

    hpas = rendered.of_kind("HorizontalPodAutoscaler")
    if values["autoscaling"]["enabled"]:
        (hpa,) = hpas
        assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
        assert hpa["spec"]["minReplicas"] == values["autoscaling"]["minReplicas"]
        assert "replicas" not in deploy["spec"]
    else:
        assert not hpas
        assert deploy["spec"]["replicas"] == values["replicas"]


def image_of(values: dict[str, Any]) -> str:
    return f"{values['image']['repository']}:{values['image']['tag'] or '0.1.0'}"


def token_secret_name(r: Rendered) -> str:
    existing: str = r.values["token"]["existingSecret"]
    if existing:
        return existing
    secret = r.one("Secret", "-token")
    assert len(base64.b64decode(secret["data"]["token"])) >= 32
    name: str = secret["metadata"]["name"]
    return name


# --------------------------------------------------------------------------- webhooks


def test_webhooks(rendered: Rendered) -> None:
    values = rendered.values["webhook"]
    mutating = rendered.of_kind("MutatingWebhookConfiguration")
    validating = rendered.of_kind("ValidatingWebhookConfiguration")
    if not values["enabled"]:
        assert not mutating and not validating
        return
    (mutating_config,) = mutating
    (validating_config,) = validating
    service = rendered.one("Service", "-webhook")
    operator = deployment(rendered, "operator")["spec"]["template"]
    assert service["spec"]["selector"].items() <= operator["metadata"]["labels"].items()

    hooks = mutating_config["webhooks"]
    assert [h["failurePolicy"] for h in hooks] == [values["mutating"]["failurePolicy"]] * 2
    by_pod, by_namespace = hooks
    inject = values["paths"]["inject"]
    assert by_pod["clientConfig"]["service"]["path"] == inject
    assert by_namespace["clientConfig"]["service"]["path"] == inject + "-namespace"
    assert by_pod["objectSelector"] == {"matchLabels": {"kanal.dev/inject": "true"}}
    assert by_namespace["namespaceSelector"] == {"matchLabels": {"kanal.dev/inject": "true"}}
    assert by_namespace["objectSelector"]["matchExpressions"] == [
        {"key": "kanal.dev/inject", "operator": "NotIn", "values": ["true", "false"]}]
    for hook in hooks:
        assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"],
                                  "operations": ["CREATE"], "resources": ["pods"],
                                  "scope": "Namespaced"}]
    (check,) = validating_config["webhooks"]
    assert check["failurePolicy"] == values["validating"]["failurePolicy"]
    assert check["rules"][0]["resources"] == ["routes", "upstreams", "egresspolicies"]
    assert "DELETE" not in check["rules"][0]["operations"]
    for hook in [*hooks, check]:
        assert hook["sideEffects"] == "None"
        assert hook["clientConfig"]["service"]["name"] == service["metadata"]["name"]
        assert hook["clientConfig"]["service"]["namespace"] == NAMESPACE

    secret_name = next(v["secret"]["secretName"] for v in operator["spec"]["volumes"]
                       if v["name"] == "webhook-tls")
    if values["certManager"]["enabled"]:
        certificate = rendered.one("Certificate")
        assert certificate["spec"]["secretName"] == secret_name
        assert f"{service['metadata']['name']}.{NAMESPACE}.svc" in certificate["spec"]["dnsNames"]
        inject = f"{NAMESPACE}/{certificate['metadata']['name']}"
        for config in (mutating_config, validating_config):
            assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == inject
            assert all("caBundle" not in h["clientConfig"] for h in config["webhooks"])
        assert not [s for s in rendered.of_kind("Secret") if s["metadata"]["name"] == secret_name]
        issuers = rendered.of_kind("Issuer")
        assert len(issuers) == (0 if values["certManager"]["issuerRef"] else 1)
    else:
        assert not rendered.of_kind("Certificate")
        secret = rendered.one("Secret", "-webhook-tls")
        assert secret["metadata"]["name"] == secret_name
        assert secret["type"] == "kubernetes.io/tls"
        for hook in [*hooks, check]:
            assert hook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
        check_serving_certificate(secret["data"], f"{service['metadata']['name']}.{NAMESPACE}.svc")


def check_serving_certificate(data: dict[str, str], dns_name: str) -> None:
    """The CA signed the serving certificate, for the Service's name, with the key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    ca = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(data["tls.crt"]))
    key = serialization.load_pem_private_key(base64.b64decode(data["tls.key"]), password=None)
    assert cert.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, rsa.RSAPublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(),
                  cert.signature_hash_algorithm)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert dns_name in names.get_values_for_type(x509.DNSName)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert cert.not_valid_after_utc > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=365)


def test_namespaced_mode_scopes_the_validating_webhook(render: RenderFn) -> None:
    rendered = render("namespaced")
    (check,) = rendered.one("ValidatingWebhookConfiguration")["webhooks"]
    assert check["namespaceSelector"]["matchExpressions"] == [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop", "payments"]}]


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(("setting", "named", "says"), [
    ("dataplane.service.type=Ingress", "/dataplane/service/type", "LoadBalancer"),
    ("webhook.mutating.failurePolicy=Sometimes", "/webhook/mutating/failurePolicy", "Ignore"),
    ("operator.replicas=0", "/operator/replicas", "minimum"),
    ("dataplane.ports.http=80000", "/dataplane/ports/http", "maximum"),
    ("dataplane.autoscaling.enabled=maybe", "/dataplane/autoscaling/enabled", "boolean"),
    ("operator.replica=3", "/operator", "replica"),
    ("watchNamespaces[0]=Not_A_Namespace", "/watchNamespaces/0", "does not match"),
    ("rbac.namespaced=true", "/watchNamespaces", "minItems"),
    ("serviceMonitor.interval=often", "/serviceMonitor/interval", "does not match"),
    ("grafanaDashboard.enabled=yes", "/grafanaDashboard/enabled", "boolean"),
])
def test_bad_values_fail_and_name_the_key(helm: Helm, setting: str, named: str, says: str) -> None:
    # --show-only: the schema is checked before anything renders; skip the CA generation.
    result = helm.template("--set", setting, "--show-only", "templates/rbac.yaml")
    assert result.returncode != 0, f"--set {setting} was accepted"
    message = result.stderr
    assert "values don't meet the specifications of the schema" in message, message
    assert named in message and says in message, message


def test_the_values_file_documents_every_key_the_schema_allows(helm: Helm) -> None:
    """values.yaml itself satisfies the schema (so the defaults are legal)."""
    result = helm.template("--values", str(CHART / "values.yaml"))
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- monitoring


def test_the_service_monitor_scrapes_the_dataplanes_admin_port(rendered: Rendered) -> None:
    monitors = rendered.of_kind("ServiceMonitor")
    wanted = rendered.values["serviceMonitor"]
    if not (wanted["enabled"] and rendered.values["dataplane"]["enabled"]):
        assert not monitors
        assert not [d for d in rendered.of_kind("Service")
                    if d["metadata"]["name"].endswith("-metrics")]
        return
    (monitor,) = monitors
    (service,) = [d for d in rendered.of_kind("Service")
                  if d["metadata"]["name"].endswith("-dataplane-metrics")]
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert wanted["labels"].items() <= monitor["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["interval"]) == (
        "admin", "/metrics", wanted["interval"])
    # The Service selects the dataplane pods and names their admin port...
    pod = deployment(rendered, "dataplane")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (port,) = service["spec"]["ports"]
    (container,) = pod["spec"]["containers"]
    admin = {p["name"]: p["containerPort"] for p in container["ports"]}["admin"]
    assert (port["name"], port["targetPort"], port["port"]) == ("admin", "admin", admin)
    assert args_of(container)["--admin"] == f"0.0.0.0:{admin}"
    # ...which the public Service never exposes.
    public = rendered.one("Service", "-dataplane")
    assert "admin" not in {p["name"] for p in public["spec"]["ports"]}
    assert service["spec"]["type"] == "ClusterIP"


def _exported_metric_names() -> set[str]:
    """Every metric family the dataplane exposes, as Prometheus names them."""
    names: set[str] = set()
    for source in (REPO / "dataplane").glob("*.py"):
        text = source.read_text()
        for kind, name in re.findall(r'(Counter|Gauge|Histogram)MetricFamily\(\s*"(kanal_\w+)"',
                                     text):
            if kind == "Counter":
                names.add(name + "_total")
            elif kind == "Histogram":
                names.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
            else:
                names.add(name)
    return names


def test_the_grafana_dashboard_queries_metrics_the_dataplane_exports(rendered: Rendered) -> None:
    maps = [d for d in rendered.of_kind("ConfigMap") if d["metadata"]["name"].endswith("-dashboard")]
    wanted = rendered.values["grafanaDashboard"]
    if not wanted["enabled"]:
        assert not maps
        return
    (config_map,) = maps
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == (wanted["namespace"] or NAMESPACE)
    (document,) = config_map["data"].values()
    dashboard = json.loads(document)
    assert dashboard["uid"] and dashboard["title"] == "Kanal"
    exported = _exported_metric_names()
    assert {"kanal_requests_total", "kanal_split_observed_share",
            "kanal_split_choices_total"} <= exported
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource"}
    queried: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            queried.update(re.findall(r"\bkanal_\w+", target["expr"]))
    assert queried <= exported, queried - exported
    # The questions it must answer: traffic, errors, latency, and the split.
    assert {"kanal_requests_total", "kanal_request_duration_seconds_bucket",
            "kanal_split_choices_total", "kanal_split_declared_share"} <= queried
