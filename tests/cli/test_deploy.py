"""`nobs-amqp deploy`: the Kubernetes manifests (validated against Kubernetes' schemas, KEDA's by a
field check) and the Compose file (loaded back), built from a project's definition alone: no broker."""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path
from typing import Any

import click
import jsonschema
import kubernetes_validate
import pytest
import yaml

from nobs_amqp import Project, Worker
from nobs_amqp.cli import deploy as cli_deploy
from nobs_amqp.errors import ConfigurationError
from nobs_amqp.ops.compose import compose
from nobs_amqp.ops.deploy import Release, dns_label, kubernetes, worker_labels
from nobs_amqp.ops.deploy import warnings as fleet_warnings
from nobs_amqp.ops.pods import Pod, Toleration, Volume

from ..apps import cli_app, deploy_app
from ..keda import check_keda
from ..support import ROOT, run_cli

pytestmark = pytest.mark.timeout(10)

#: The Kubernetes version the manifests are validated against (kubernetes-validate ships its schemas).
KUBERNETES = "1.30"
IMAGE = "registry.example.com/shop/backend:1.4.2"
CLI_APP = "tests.apps.cli_app:project"
DEPLOY_APP = "tests.apps.deploy_app:project"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/part-of", "app.kubernetes.io/component")
PROJECTS = {CLI_APP: cli_app.project, DEPLOY_APP: deploy_app.project}


def fleet(app: str = DEPLOY_APP, **options: Any) -> list[dict[str, Any]]:
    return kubernetes(PROJECTS[app], Release(app=app, image=IMAGE, **options))


def by_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def validate(manifests: list[dict[str, Any]]) -> None:
    """Kubernetes' own kinds against its schemas (strict: no unknown field), KEDA's by the field check."""
    authentications = {m["metadata"]["name"]: m for m in by_kind(manifests, "TriggerAuthentication")}
    for manifest in manifests:
        if manifest["apiVersion"].startswith("keda.sh/"):
            check_keda(manifest, authentications)
        else:
            assert kubernetes_validate.validate(manifest, KUBERNETES, strict=True) == KUBERNETES


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    [only] = manifest["spec"]["template"]["spec"]["containers"]
    return only


def env_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The container's variables from a Secret: name -> its secretKeyRef."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container(manifest)["env"] if "valueFrom" in e}


def pods_of(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pod spec of every Deployment and Job."""
    return [m["spec"]["template"]["spec"] for m in manifests if m["kind"] in ("Deployment", "Job")]


#: What an operator adds to every pod: the TLS example of the README and the rest.
EXTRAS = Pod(
    env={"LOG_FORMAT": "json"},
    env_from_secrets=["shop-extra"],
    env_from_configmaps=["shop-config"],
    volumes=[Volume("secret", "rabbitmq-ca", "/etc/rabbitmq-ca"), Volume("configmap", "shop-files", "/etc/shop")],
    image_pull_secrets=["regcred"],
    service_account="shop",
    node_selector={"pool": "workers", "example.com/zone": "a"},
    tolerations=[Toleration("dedicated", "queues", "NoSchedule"), Toleration("spot")],
    run_as_user=20000,
    run_as_group=20001,
)
#: The volume kinds Pod Security "restricted" admits.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected"}
RESTRICTED_VOLUMES |= {"secret"}


def assert_restricted(pod: dict[str, Any]) -> None:
    """Pod Security "restricted" (Kubernetes 1.30), field by field, and what a read-only root
    filesystem needs besides: a writable /tmp."""
    assert not any(pod.get(host) for host in ("hostNetwork", "hostPID", "hostIPC")), pod
    context = pod["securityContext"]
    for volume in pod["volumes"]:
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
    assert pod["automountServiceAccountToken"] is ("serviceAccountName" in pod)  # no token unless one is asked for
    for each in pod["containers"]:
        own = each["securityContext"]
        assert own.get("privileged") is not True and own["allowPrivilegeEscalation"] is False
        assert own.get("runAsNonRoot", context.get("runAsNonRoot")) is True
        assert own.get("runAsUser", context.get("runAsUser")) not in (0, None)
        assert own.get("runAsGroup", context.get("runAsGroup")) not in (0, None)
        for seccomp in (own.get("seccompProfile"), context.get("seccompProfile")):
            assert seccomp == {"type": "RuntimeDefault"}
        assert own["capabilities"] == {"drop": ["ALL"]}
        assert not any(port.get("hostPort") for port in each.get("ports", []))
        assert own["readOnlyRootFilesystem"] is True
        mounts = {mount["mountPath"]: mount["name"] for mount in each["volumeMounts"]}
        assert {"name": mounts["/tmp"], "emptyDir": {}} in pod["volumes"]
        assert {"name": "TMPDIR", "value": "/tmp"} in each["env"]
        assert each["resources"]["requests"]["cpu"] and each["resources"]["limits"]["memory"]


# -- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("app", [CLI_APP, DEPLOY_APP])
@pytest.mark.parametrize("pod", [Pod(), EXTRAS], ids=["defaults", "extras"])
def test_every_pod_passes_pod_security_restricted(app: str, pod: Pod) -> None:
    manifests = fleet(app, namespace="shop", pod=pod)
    validate(manifests)
    pods = pods_of(manifests)
    assert len(pods) == len(by_kind(manifests, "Deployment")) + 1  # and the topology Job
    for spec in pods:
        assert_restricted(spec)
        assert spec["securityContext"]["runAsUser"] == pod.run_as_user
        assert spec["securityContext"]["runAsGroup"] == spec["securityContext"]["fsGroup"] == pod.run_as_group


def test_what_the_operator_adds_reaches_every_pod() -> None:
    manifests = fleet(pod=EXTRAS)
    pods = pods_of(manifests)
    assert len(pods) == 4  # two workers, the scheduler, the topology Job
    for spec in pods:
        [main] = spec["containers"]
        assert {"name": "LOG_FORMAT", "value": "json"} in main["env"]
        assert main["envFrom"] == [{"secretRef": {"name": "shop-extra"}}, {"configMapRef": {"name": "shop-config"}}]
        mounts = {mount["mountPath"]: mount for mount in main["volumeMounts"]}
        volumes = {volume["name"]: volume for volume in spec["volumes"]}
        assert volumes[mounts["/etc/rabbitmq-ca"]["name"]]["secret"] == {"secretName": "rabbitmq-ca"}
        assert volumes[mounts["/etc/shop"]["name"]]["configMap"] == {"name": "shop-files"}
        assert mounts["/etc/rabbitmq-ca"]["readOnly"] is True
        assert spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert spec["serviceAccountName"] == "shop" and spec["automountServiceAccountToken"] is True
        assert spec["nodeSelector"] == {"pool": "workers", "example.com/zone": "a"}
        assert spec["tolerations"] == [
            {"key": "dedicated", "operator": "Equal", "value": "queues", "effect": "NoSchedule"},
            {"key": "spot", "operator": "Exists"},
        ]
    [policy] = by_kind(manifests, "NetworkPolicy")
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "shop-backend"}}
    assert policy["spec"]["ingress"] == [{"ports": [{"port": 9090, "protocol": "TCP"}]}]


def test_the_grace_period_follows_each_workers_time_limit_unless_given() -> None:
    deployments = {d["metadata"]["name"]: d for d in by_kind(fleet(), "Deployment")}
    for name, grace in (("shop-backend-emails-high", 30), ("shop-backend-reports-daily", 25)):
        assert container(deployments[name])["command"][-2:] == ["--grace-period", str(grace)]
        assert deployments[name]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == grace + 10
    release = Release(app=DEPLOY_APP, image=IMAGE, grace_period=10)
    [warning] = fleet_warnings(deploy_app.project, release)
    assert "worker 'emails.high' has a time limit of 30 s but a grace period of 10 s" in warning
    assert "give --grace-period 30 or more" in warning
    assert fleet_warnings(deploy_app.project, Release(app=DEPLOY_APP, image=IMAGE)) == []
    assert fleet_warnings(deploy_app.project, Release(app=DEPLOY_APP, image=IMAGE, grace_period=30)) == []


@pytest.mark.parametrize(
    ("image", "mutable"),
    [
        ("app", True),
        ("app:latest", True),
        ("registry.example.com:5000/shop/app", True),
        ("registry.example.com:5000/shop/app:1.4.2", False),
        ("app@sha256:" + "a" * 64, False),
        ("app:latest@sha256:" + "a" * 64, False),
    ],
)
def test_an_image_without_a_version_is_warned_of(image: str, mutable: bool) -> None:
    found = fleet_warnings(cli_app.project, Release(app=CLI_APP, image=image))
    assert bool(found) is mutable, found
    if mutable:
        assert "has no version" in found[0] and "digest" in found[0]


def test_the_signing_key_is_required_unless_the_project_does_not_sign() -> None:
    for release in (Release(app=DEPLOY_APP, image=IMAGE, signing_key=None), Release(app=DEPLOY_APP, image=IMAGE)):
        for deployment in by_kind(kubernetes(deploy_app.project, release), "Deployment"):
            signing = env_of(deployment).get("NOBS_AMQP_SIGNING_KEY")
            assert signing == (
                None if release.signing_key is None else {"name": "shop-backend-rabbitmq", "key": "signing-key"}
            )


@pytest.mark.parametrize("app", [CLI_APP, DEPLOY_APP])
def test_every_object_validates_against_the_kubernetes_and_keda_schemas(app: str) -> None:
    manifests = fleet(app, namespace="shop", memory_limit="1Gi")
    validate(manifests)
    validate(fleet(app))  # without a namespace or a limit too
    workers = len(PROJECTS[app].workers)
    kinds = [m["kind"] for m in manifests]
    assert kinds[:3] == ["TriggerAuthentication", "NetworkPolicy", "Job"]
    assert kinds.count("ScaledObject") == workers
    assert kinds.count("Deployment") == workers + (1 if PROJECTS[app].schedules else 0)
    assert kinds.count("PodDisruptionBudget") == kinds.count("Deployment")
    for manifest in manifests:
        metadata = manifest["metadata"]
        assert DNS_LABEL.match(metadata["name"]), metadata["name"]
        assert metadata["namespace"] == "shop"
        assert metadata["labels"]["app.kubernetes.io/part-of"] == dns_label(PROJECTS[app].name)
        assert all(DNS_LABEL.match(metadata["labels"][label]) for label in LABELS), metadata["labels"]


def test_a_deployment_per_worker_runs_consume_with_its_secret_probes_and_metrics() -> None:
    manifests = fleet(grace_period=40, metrics_port=9100, cpu="250m", memory="512Mi", memory_limit="1Gi")
    deployments = {d["metadata"]["annotations"]["nobs-amqp/worker"]: d for d in by_kind(manifests, "Deployment")[:2]}
    assert set(deployments) == {"emails.high", "Reports_daily"}
    for worker, deployment in deployments.items():
        labels = deployment["metadata"]["labels"]
        assert labels == {
            "app.kubernetes.io/name": {"emails.high": "emails-high", "Reports_daily": "reports-daily"}[worker],
            "app.kubernetes.io/part-of": "shop-backend",
            "app.kubernetes.io/component": "worker",
        }
        assert deployment["metadata"]["name"] == f"shop-backend-{labels['app.kubernetes.io/name']}"
        assert (
            deployment["spec"]["selector"]["matchLabels"]
            == labels
            == deployment["spec"]["template"]["metadata"]["labels"]
        )
        assert "replicas" not in deployment["spec"]  # KEDA's to set
        pod = deployment["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 50  # SIGKILL only after the 40 s grace period
        main = container(deployment)
        assert main["image"] == IMAGE
        assert main["command"] == [
            "nobs-amqp", "--app", DEPLOY_APP, "consume", worker, "--metrics-port", "9100",
            "--metrics-host", "0.0.0.0", "--grace-period", "40",
        ]  # fmt: skip
        assert env_of(deployment)["NOBS_AMQP_URL"] == {"name": "shop-backend-rabbitmq", "key": "url"}
        # Not optional: a Secret without the key (or a typo) stops the pod rather than turn signing off.
        assert env_of(deployment)["NOBS_AMQP_SIGNING_KEY"] == {"name": "shop-backend-rabbitmq", "key": "signing-key"}
        assert main["resources"] == {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}}
        assert main["ports"] == [{"name": "metrics", "containerPort": 9100, "protocol": "TCP"}]
        probes = {kind: main[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness", "readiness")}
        assert probes == {
            "startup": {"path": "/livez", "port": "metrics"},
            "liveness": {"path": "/livez", "port": "metrics"},
            "readiness": {"path": "/readyz", "port": "metrics"},
        }
        assert deployment["spec"]["template"]["metadata"]["annotations"] == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": "9100",
            "prometheus.io/path": "/metrics",
        }


def test_a_scaled_object_per_worker_scales_on_its_queue_with_defaults_from_its_settings() -> None:
    manifests = fleet()
    [auth] = by_kind(manifests, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "host", "name": "shop-backend-rabbitmq", "key": "url"}]
    scaled = {s["metadata"]["annotations"]["nobs-amqp/worker"]: s["spec"] for s in by_kind(manifests, "ScaledObject")}
    deployments = {d["metadata"]["name"] for d in by_kind(manifests, "Deployment")}
    for worker, spec in scaled.items():
        assert spec["scaleTargetRef"]["name"] in deployments
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 10)
        [trigger] = spec["triggers"]
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert trigger["metadata"]["queueName"] == worker  # the queue's own name, not the sanitised one
        assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    # The target per replica: the worker's prefetch (emails.high: 40), else its concurrency (Reports_daily: 2).
    assert scaled["emails.high"]["triggers"][0]["metadata"]["value"] == "40"
    assert scaled["Reports_daily"]["triggers"][0]["metadata"]["value"] == "2"


def test_replicas_and_targets_from_options_for_all_workers_or_one() -> None:
    manifests = fleet(
        min_replicas={None: 0, "emails.high": 2},
        max_replicas={None: 4, "Reports_daily": 1},
        messages_per_replica={"emails.high": 100},
        secret="broker",
        url_key="amqp-urls",
        keda_key="amqp-url",
    )
    validate(manifests)
    scaled = {s["metadata"]["annotations"]["nobs-amqp/worker"]: s["spec"] for s in by_kind(manifests, "ScaledObject")}
    assert (scaled["emails.high"]["minReplicaCount"], scaled["emails.high"]["maxReplicaCount"]) == (2, 4)
    assert (scaled["Reports_daily"]["minReplicaCount"], scaled["Reports_daily"]["maxReplicaCount"]) == (0, 1)
    assert scaled["emails.high"]["triggers"][0]["metadata"]["value"] == "100"
    assert scaled["Reports_daily"]["triggers"][0]["metadata"]["value"] == "2"
    [auth] = by_kind(manifests, "TriggerAuthentication")
    assert auth["spec"]["secretTargetRef"] == [{"parameter": "host", "name": "broker", "key": "amqp-url"}]
    for deployment in by_kind(manifests, "Deployment"):
        assert env_of(deployment)["NOBS_AMQP_URL"] == {"name": "broker", "key": "amqp-urls"}
    # Only a minimum above the default maximum raises the maximum with it.
    [first, _] = by_kind(fleet(min_replicas={"emails.high": 12}), "ScaledObject")
    assert (first["spec"]["minReplicaCount"], first["spec"]["maxReplicaCount"]) == (12, 12)


def test_the_topology_job_runs_once_per_release() -> None:
    [job] = by_kind(fleet(), "Job")
    assert job["metadata"]["name"].startswith("shop-backend-topology-")
    assert container(job)["command"] == ["nobs-amqp", "--app", DEPLOY_APP, "topology", "apply"]
    assert env_of(job)["NOBS_AMQP_URL"] == {"name": "shop-backend-rabbitmq", "key": "url"}
    spec = job["spec"]
    assert spec["backoffLimit"] > 0 and spec["ttlSecondsAfterFinished"] > 0 and spec["activeDeadlineSeconds"] > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    assert by_kind(fleet(), "Job")[0]["metadata"]["name"] == job["metadata"]["name"]  # the same release: the same Job
    other = kubernetes(deploy_app.project, Release(app=DEPLOY_APP, image=IMAGE.replace("1.4.2", "1.4.3")))
    assert by_kind(other, "Job")[0]["metadata"]["name"] != job["metadata"]["name"]  # a new image: a new Job


def test_the_scheduler_runs_beside_the_workers_when_the_project_has_schedules() -> None:
    manifests = fleet()
    [scheduler] = [d for d in by_kind(manifests, "Deployment") if d["metadata"]["name"] == "shop-backend-scheduler"]
    assert scheduler["spec"]["replicas"] == 2  # one active, one standing by
    assert scheduler["metadata"]["labels"]["app.kubernetes.io/component"] == "scheduler"
    assert container(scheduler)["command"] == [
        "nobs-amqp", "--app", DEPLOY_APP, "schedule", "--metrics-port", "9090", "--metrics-host", "0.0.0.0",
    ]  # fmt: skip
    probes = {kind: container(scheduler)[f"{kind}Probe"]["httpGet"] for kind in ("startup", "liveness", "readiness")}
    assert probes == {
        "startup": {"path": "/livez", "port": "metrics"},
        "liveness": {"path": "/livez", "port": "metrics"},
        "readiness": {"path": "/readyz", "port": "metrics"},
    }
    # A node drain leaves one of its two replicas up; a worker's lets one pod at a time go.
    budgets = {b["metadata"]["name"]: b["spec"] for b in by_kind(manifests, "PodDisruptionBudget")}
    labels = scheduler["spec"]["selector"]["matchLabels"]
    assert budgets["shop-backend-scheduler"] == {"minAvailable": 1, "selector": {"matchLabels": labels}}
    assert budgets["shop-backend-emails-high"]["maxUnavailable"] == 1
    assert all(
        d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
        for d in by_kind(fleet(CLI_APP), "Deployment")
    )


def test_names_are_dns_1123_unique_and_stable() -> None:
    assert dns_label("Reports_daily") == "reports-daily"
    assert dns_label("emails..high") == "emails-high"
    assert dns_label("_x_") == "x"
    long = "queue." * 20
    assert len(dns_label(long)) <= 63 and DNS_LABEL.match(dns_label(long))
    assert dns_label(long) != dns_label(long + "y")  # cut short, each keeps its hash
    names = ["a.b", "a_b", "A-b", "scheduler", "topology", "c" * 70, "c" * 71, "plain"]
    labels = worker_labels(names)
    assert len(set(labels.values())) == len(names), labels
    assert labels["plain"] == "plain"
    assert labels["scheduler"].startswith("scheduler-") and labels["topology"].startswith("topology-")
    assert all(DNS_LABEL.match(label) for label in labels.values()), labels
    assert worker_labels(reversed(names)) == labels  # not the order workers are listed in
    project = Project("p", [Worker(name) for name in names], packages=["tests"])
    manifests = kubernetes(project, Release(app="tests.apps.x:p", image=IMAGE))
    validate(manifests)
    deployments = [m["metadata"]["name"] for m in by_kind(manifests, "Deployment")]
    assert len(set(deployments)) == len(names)


def test_the_checks_refuse_a_broken_manifest() -> None:
    """The validation above bites: an unknown field, a wrong type, a missing required field."""
    manifests = fleet()
    deployment = copy.deepcopy(by_kind(manifests, "Deployment")[0])
    container(deployment)["livenessProbe"]["httpGet"]["paht"] = "/livez"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate([deployment])
    job = copy.deepcopy(by_kind(manifests, "Job")[0])
    job["spec"]["backoffLimit"] = "4"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate([job])
    authentication = by_kind(manifests, "TriggerAuthentication")[0]
    for change in (
        lambda s: s["spec"].update(minReplicas=1),  # not minReplicaCount
        lambda s: s["spec"]["triggers"][0]["metadata"].update(value=40),  # not a string
        lambda s: s["spec"]["scaleTargetRef"].pop("name"),
        lambda s: s["spec"].update(minReplicaCount=11),  # more than maxReplicaCount
        lambda s: s["spec"]["triggers"][0]["metadata"].update(queue="x"),  # not a rabbitmq parameter
    ):
        scaled = copy.deepcopy(by_kind(manifests, "ScaledObject")[0])
        change(scaled)
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            validate([authentication, scaled])


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"min_replicas": {None: 3}, "max_replicas": {None: 2}}, "min replicas (3) is more than max replicas (2)"),
        ({"max_replicas": {"nope": 2}}, "has no worker 'nope'"),
        ({"cpu": "lots"}, "cpu 'lots' is not a kubernetes quantity"),
        ({"namespace": "Shop"}, "namespace 'Shop' is not a dns-1123 label"),
        ({"secret": "my_secret"}, "secret 'my_secret' is not a kubernetes name"),
        ({"url_key": "a/b"}, "secret key 'a/b' is not usable"),
        ({"image": None}, "kubernetes needs an image"),
        ({"image": "two words"}, "is not an image reference"),
        ({"messages_per_replica": {None: 0}}, "messages per replica must be at least 1"),
        ({"pod": Pod(env={"NOBS_AMQP_URL": "x"})}, "env 'NOBS_AMQP_URL' is set by the fleet itself"),
        ({"pod": Pod(env={"A B": "x"})}, "env 'A B' is not a variable name"),
        ({"pod": Pod(volumes=[Volume("secret", "ca", "/tmp")])}, "mount path '/tmp' must be an absolute folder"),
        ({"pod": Pod(volumes=[Volume("secret", "ca", "etc/ca")])}, "mount path 'etc/ca' must be an absolute folder"),
        ({"pod": Pod(env_from_secrets=["My_Secret"])}, "'My_Secret' is not a kubernetes name"),
        ({"pod": Pod(node_selector={"a b": "c"})}, "'a b' is not a kubernetes label key"),
        ({"pod": Pod(tolerations=[Toleration("k", None, "Never")])}, "toleration effect 'Never' must be one of"),
        ({"pod": Pod(run_as_user=0)}, "run as user and group must be more than 0"),
        ({"signing_key": "a/b"}, "signing secret key 'a/b' is not usable"),
    ],
)
def test_a_release_refuses_what_kubernetes_would(options: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(error)):
        kubernetes(deploy_app.project, Release(**{"app": DEPLOY_APP, "image": IMAGE, **options}))


# -- Compose ------------------------------------------------------------------------------------


def test_compose_runs_the_same_fleet_on_one_host() -> None:
    release = Release(app=DEPLOY_APP, image=IMAGE, grace_period=30, replicas={None: 2, "Reports_daily": 1})
    built = yaml.safe_load(cli_deploy._dump(yaml, [compose(deploy_app.project, release)]))
    assert list(built) == ["services"]  # no `name:` (Compose v2 only) and no `version:` (obsolete)
    services = built["services"]
    assert list(services) == ["topology", "emails-high", "reports-daily", "scheduler"]
    topology = services["topology"]
    assert topology["command"] == ["nobs-amqp", "--app", DEPLOY_APP, "topology", "apply"]
    assert topology["restart"] == "no"
    for name, worker, replicas in (("emails-high", "emails.high", 2), ("reports-daily", "Reports_daily", 1)):
        service = services[name]
        assert service["image"] == IMAGE
        assert service["command"][3:5] == ["consume", worker]
        assert service["command"][5:] == ["--metrics-port", "9090", "--metrics-host", "0.0.0.0", "--grace-period", "30"]
        assert service["deploy"] == {"replicas": replicas}
        assert service["stop_grace_period"] == "40s"
        assert service["depends_on"] == {"topology": {"condition": "service_completed_successfully"}}
        assert service["environment"]["NOBS_AMQP_URL"].startswith("${NOBS_AMQP_URL:?")
        assert "http://127.0.0.1:9090/livez" in " ".join(service["healthcheck"]["test"])
        assert "ports" not in service  # replicas would fight over a host port
    assert services["scheduler"]["command"][3:] == ["schedule"]
    assert services["scheduler"]["depends_on"] == services["emails-high"]["depends_on"]


def test_compose_without_an_image_builds_it_once_and_reads_an_env_file() -> None:
    built = compose(deploy_app.project, Release(app=DEPLOY_APP, env_file="broker.env"))
    services = built["services"]
    assert list(services) == ["topology", "emails-high", "reports-daily", "scheduler"]
    assert services["topology"]["build"] == {"context": "."}  # built here, once, and tagged
    assert [name for name, service in services.items() if "build" in service] == ["topology"]
    assert {service["image"] for service in services.values()} == {"shop-backend:local"}
    for name, service in services.items():
        assert service["env_file"] == ["broker.env"] and "environment" not in service
        if name != "topology":  # the others start after it, so they find the image it built
            assert service["depends_on"] == {"topology": {"condition": "service_completed_successfully"}}


# -- the command --------------------------------------------------------------------------------


async def test_the_command_writes_the_manifests_as_yaml_with_the_app_it_found() -> None:
    """No --app: the repository's pyproject.toml names examples.send_email.app:project."""
    code, output = await run_cli("deploy", "kubernetes", "--image", IMAGE, "--max-replicas", "3", env={})
    assert code == 0, output
    from examples.send_email.app import project

    expected = kubernetes(project, Release(app="examples.send_email.app:project", image=IMAGE, max_replicas={None: 3}))
    assert list(yaml.safe_load_all(output)) == expected
    assert output.startswith("# written by nobs-amqp deploy kubernetes for examples.send_email.app:project\n---\n")
    validate(expected)

    code, output = await run_cli("deploy", "kubernetes", "--image", IMAGE, "--max-replicas", "nope=3", env={})
    assert code == 2 and "has no worker 'nope' (workers: priority_queue)" in output, output
    code, output = await run_cli("deploy", "kubernetes", "--image", IMAGE, "--min-replicas", "x", env={})
    assert code == 2 and "'x' is not N or WORKER=N" in output, output


async def test_the_command_writes_one_file_per_object(tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    out.mkdir()
    (out / "old.yaml").write_text("{}")
    code, output = await run_cli("--app", DEPLOY_APP, "deploy", "kubernetes", "--image", IMAGE, "-o", str(out), env={})
    assert code == 0, output
    files = sorted(p.name for p in out.glob("*.yaml") if p.name != "old.yaml")
    assert files == [
        "01-triggerauthentication-shop-backend-keda.yaml",
        "02-networkpolicy-shop-backend.yaml",
        f"03-job-{fleet()[2]['metadata']['name']}.yaml",
        "04-deployment-shop-backend-emails-high.yaml",
        "05-scaledobject-shop-backend-emails-high.yaml",
        "06-poddisruptionbudget-shop-backend-emails-high.yaml",
        "07-deployment-shop-backend-reports-daily.yaml",
        "08-scaledobject-shop-backend-reports-daily.yaml",
        "09-poddisruptionbudget-shop-backend-reports-daily.yaml",
        "10-deployment-shop-backend-scheduler.yaml",
        "11-poddisruptionbudget-shop-backend-scheduler.yaml",
    ]
    assert [yaml.safe_load((out / name).read_text()) for name in files] == fleet()
    assert "wrote 11 manifest(s)" in output and "not written now: old.yaml" in output

    compose_file = tmp_path / "compose.yaml"
    code, output = await run_cli("--app", DEPLOY_APP, "deploy", "compose", "-o", str(compose_file), env={})
    assert code == 0, output
    assert yaml.safe_load(compose_file.read_text()) == compose(deploy_app.project, Release(app=DEPLOY_APP))


async def test_the_command_warns_of_a_project_that_ignores_the_secret(tmp_path: Path) -> None:
    (tmp_path / "pinned.py").write_text(
        "from nobs_amqp import Project, Worker\n"
        "project = Project('pinned', [Worker('w')], url='amqp://me:s3cret@rabbit:5672/v', packages=['pinned'])\n"
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])  # this nobs_amqp, from another folder
    code, output = await run_cli("--app", "pinned:project", "deploy", "compose", env={"PYTHONPATH": path}, cwd=tmp_path)
    assert code == 0, output
    assert "warning: project 'pinned' sets Project(url=...)" in output
    assert "s3cret" not in output


async def test_the_command_takes_pod_options_and_warns(tmp_path: Path) -> None:
    options = [
        "--env", "LOG_FORMAT=json", "--env-from-secret", "shop-extra", "--env-from-configmap", "shop-config",
        "--secret-volume", "rabbitmq-ca:/etc/rabbitmq-ca", "--configmap-volume", "shop-files:/etc/shop",
        "--image-pull-secret", "regcred", "--service-account", "shop", "--node-selector", "pool=workers",
        "--node-selector", "example.com/zone=a", "--toleration", "dedicated=queues:NoSchedule", "--toleration", "spot",
        "--run-as-user", "20000", "--run-as-group", "20001",
    ]  # fmt: skip
    out = tmp_path / "k8s"
    code, output = await run_cli(
        "--app", DEPLOY_APP, "deploy", "kubernetes", "--image", IMAGE, *options, "-o", str(out), env={}
    )
    assert code == 0, output
    assert "warning" not in output, output
    assert [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))] == fleet(pod=EXTRAS)
    latest = IMAGE.replace("1.4.2", "latest")
    code, output = await run_cli(
        "--app", DEPLOY_APP, "deploy", "kubernetes", "--image", latest, "--grace-period", "10", "--no-signing",
        "-o", str(tmp_path / "other"), env={},
    )  # fmt: skip
    assert code == 0, output
    assert f"warning: image '{latest}' has no version" in output
    assert "warning: worker 'emails.high' has a time limit of 30 s but a grace period of 10 s" in output
    assert "SIGNING" not in "".join(path.read_text() for path in (tmp_path / "other").glob("*.yaml"))


@pytest.mark.parametrize(
    ("option", "error"),
    [
        (["--env", "NOPE"], "'NOPE' is not NAME=VALUE"),
        (["--env", "NOBS_AMQP_URL=amqp://x"], "env 'NOBS_AMQP_URL' is set by the fleet itself"),
        (["--secret-volume", "ca"], "'ca' is not SECRET:PATH"),
        (["--configmap-volume", "files:relative"], "mount path 'relative' must be an absolute folder"),
        (["--node-selector", "pool"], "'pool' is not KEY=VALUE"),
        (["--toleration", "spot:Sometimes"], "'spot:Sometimes' is not KEY[=VALUE][:EFFECT]"),
        (["--service-account", "Shop_SA"], "'Shop_SA' is not a kubernetes name"),
        (["--run-as-user", "0"], "--run-as-user"),
    ],
)
async def test_the_command_refuses_bad_pod_options(option: list[str], error: str) -> None:
    code, output = await run_cli("--app", DEPLOY_APP, "deploy", "kubernetes", "--image", IMAGE, *option, env={})
    assert code == 2 and error in output, output
    assert "Traceback" not in output


def test_without_pyyaml_the_command_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml raises ImportError
    with pytest.raises(click.ClickException, match=re.escape("pip install 'nobs_amqp[deploy]'")):
        cli_deploy._yaml()


def test_the_compose_file_is_plain_yaml_without_anchors() -> None:
    text = cli_deploy._dump(yaml, [compose(deploy_app.project, Release(app=DEPLOY_APP))])
    assert "&id" not in text and "*id" not in text
