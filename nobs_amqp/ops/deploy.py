"""Deployment manifests from a project definition, as plain dicts (no I/O, no YAML here).

Kubernetes: per worker a Deployment running `nobs-amqp consume W` and a KEDA ScaledObject
scaling it on the length of queue `W`; one KEDA TriggerAuthentication reading the broker URL
from the same Secret the workers read it from; a Job that applies the topology once per release
(its name carries a hash of the image); and, when the project has schedules, a Deployment running
`nobs-amqp schedule`. Compose: the same fleet as services on one host.

Names. Worker and project names may hold '.', '_' and capitals, which Kubernetes names may not:
every run of characters other than lowercase letters and digits becomes one '-' (capitals are
lowered first), and the result is cut to 63 characters. A name cut short, or one two workers would
share ('a.b' and 'a_b'), or one the fleet uses itself ('topology', 'scheduler'), ends in '-' and
8 hex digits of a hash of the original name instead. The original worker name stays what the
container runs (`consume W`), what KEDA measures (`queueName`), and an annotation.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError
from ..project import Project
from ..worker import Worker

#: One manifest (a Kubernetes object) or a Compose file, ready for a YAML or JSON writer.
Manifest = dict[str, Any]
#: An option given for every worker (key None) or for one worker (its name); the one worker's wins.
PerWorker = Mapping[str | None, int]

COMMAND = "nobs-amqp"
METRICS_PORT = 9090
#: Where a deployed worker's metrics and health listen: every address of its container.
METRICS_HOST = "0.0.0.0"
#: `nobs-amqp consume --grace-period`'s default: seconds running tasks get after SIGTERM.
GRACE_PERIOD = 25.0
#: Seconds after the grace period before SIGKILL: the worker returns what it holds and closes its
#: connection (it exits by itself within cli.consume.STOP_MARGIN_SECONDS of the grace period, broker or not).
SHUTDOWN_MARGIN = 10
MIN_REPLICAS = 1
MAX_REPLICAS = 10
#: `nobs-amqp schedule` processes: one is active, the other takes over within seconds if it dies.
SCHEDULER_REPLICAS = 2
#: The keys of the Secret (and the variables of a Compose env file) the fleet reads.
URL_KEY = "url"
SIGNING_KEY_KEY = "signing-key"
URL_ENV = "NOBS_AMQP_URL"
SIGNING_KEY_ENV = "NOBS_AMQP_SIGNING_KEY"
#: The topology Job: retries of a failed `topology apply`, how long it may take, how long it is kept.
JOB_BACKOFF_LIMIT = 4
JOB_DEADLINE_SECONDS = 600
JOB_TTL_SECONDS = 86400
#: Names the fleet gives its own parts, which a worker's name must not take.
RESERVED = frozenset({"topology", "scheduler"})

_LABEL_LIMIT = 63
_DIGEST = 8
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_DIGEST]


def dns_label(text: str, *, limit: int = _LABEL_LIMIT, hashed: bool = False) -> str:
    """`text` as a DNS-1123 label of at most `limit` characters (see the module's docstring);
    with `hashed`, or when it had to be cut, it ends in a hash of `text`."""
    label = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"
    if hashed or len(label) > limit:
        label = f"{label[: limit - _DIGEST - 1].rstrip('-')}-{_digest(text)}".lstrip("-")
    return label


def worker_labels(names: Iterable[str]) -> dict[str, str]:
    """Each worker's DNS-1123 label, unique within the project and none of RESERVED."""
    labels = {name: dns_label(name) for name in names}
    counts = Counter(labels.values())
    for name, label in labels.items():
        if counts[label] > 1 or label in RESERVED:
            labels[name] = dns_label(name, hashed=True)
    return labels


def _joined(*parts: str) -> str:
    """Labels joined with '-', cut (with a hash) to one label."""
    return dns_label("-".join(parts))


@dataclass(frozen=True, kw_only=True)
class Release:
    """How to run a project: what `nobs-amqp deploy` was told.

    `app` is the project's `module:attr`, as the containers are to find it. `image` is the
    container image (Compose builds `.` without one). The broker URL comes from key `url_key` of
    Secret `secret` (default `<project>-rabbitmq`); KEDA reads the queue length with the URL under
    `keda_key` (default: the same key). Per worker: `min_replicas`, `max_replicas`,
    `messages_per_replica` (KEDA's target of ready messages per replica; default the worker's
    prefetch) and, for Compose, `replicas`.
    """

    app: str
    image: str | None = None
    namespace: str | None = None
    secret: str | None = None
    url_key: str = URL_KEY
    keda_key: str | None = None
    metrics_port: int = METRICS_PORT
    grace_period: float = GRACE_PERIOD
    cpu: str = "100m"
    memory: str = "256Mi"
    memory_limit: str | None = None
    min_replicas: PerWorker = field(default_factory=dict)
    max_replicas: PerWorker = field(default_factory=dict)
    messages_per_replica: PerWorker = field(default_factory=dict)
    replicas: PerWorker = field(default_factory=dict)
    env_file: str | None = None

    def check(self, project: Project) -> None:
        """ConfigurationError for anything Kubernetes or Compose would refuse later."""
        self._check_names()
        self._check_numbers()
        options = (
            ("min replicas", self.min_replicas, 0),
            ("max replicas", self.max_replicas, 1),
            ("messages per replica", self.messages_per_replica, 1),
            ("replicas", self.replicas, 0),
        )
        for what, option, least in options:
            for name, value in option.items():
                if name is not None:
                    project.worker(name)  # ConfigurationError naming the workers there are
                if value < least:
                    raise ConfigurationError(f"{what} must be at least {least} (got {value})")
        for worker in project.workers.values():
            self.scaling(worker)

    def _check_names(self) -> None:
        if not self.app or ":" not in self.app:
            raise ConfigurationError(f"app {self.app!r} must look like module:attr")
        if self.image is not None and (not self.image.strip() or any(c.isspace() for c in self.image)):
            raise ConfigurationError(f"image {self.image!r} is not an image reference")
        if self.namespace is not None and dns_label(self.namespace) != self.namespace:
            raise ConfigurationError(
                f"namespace {self.namespace!r} is not a dns-1123 label (e.g. {dns_label(self.namespace)!r})"
            )
        if self.secret is not None and not _SUBDOMAIN.match(self.secret):
            raise ConfigurationError(f"secret {self.secret!r} is not a kubernetes name: use a-z, 0-9, '-' and '.'")
        for what, key in (("secret key", self.url_key), ("keda secret key", self.keda_key or self.url_key)):
            if not _SECRET_KEY.match(key):
                raise ConfigurationError(f"{what} {key!r} is not usable: use letters, digits, '-', '_' and '.'")

    def _check_numbers(self) -> None:
        if not 1 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics port must be 1..65535 (got {self.metrics_port})")
        if not (self.grace_period >= 0 and math.isfinite(self.grace_period)):
            raise ConfigurationError(f"grace period must be 0 or more seconds (got {self.grace_period})")
        for what, quantity in (("cpu", self.cpu), ("memory", self.memory), ("memory limit", self.memory_limit)):
            if quantity is not None and not _QUANTITY.match(quantity):
                raise ConfigurationError(f"{what} {quantity!r} is not a kubernetes quantity (e.g. 100m, 0.5, 256Mi)")

    def scaling(self, worker: Worker) -> Scaling:
        """The worker's replicas and KEDA target: its own option, else the option for all, else its default."""
        minimum = _pick(self.min_replicas, worker.name, MIN_REPLICAS)
        maximum = _pick(self.max_replicas, worker.name, max(MAX_REPLICAS, minimum))
        if minimum > maximum:
            raise ConfigurationError(
                f"worker {worker.name!r}: min replicas ({minimum}) is more than max replicas ({maximum})"
            )
        target = _pick(self.messages_per_replica, worker.name, worker.prefetch or worker.concurrency)
        return Scaling(minimum, maximum, target, _pick(self.replicas, worker.name, 1))

    def secret_name(self, project: Project) -> str:
        return self.secret or _joined(dns_label(project.name), "rabbitmq")


def _pick(option: PerWorker, worker: str, default: int) -> int:
    return option.get(worker, option.get(None, default))


@dataclass(frozen=True)
class Scaling:
    """Replicas of one worker: KEDA's bounds and target on Kubernetes, a fixed count on Compose."""

    minimum: int
    maximum: int
    messages_per_replica: int
    replicas: int


# -- the commands the containers run ------------------------------------------------------------


def _cli(release: Release, *args: str) -> list[str]:
    return [COMMAND, "--app", release.app, *args]


def consume_command(release: Release, worker: Worker) -> list[str]:
    """`nobs-amqp --app APP consume W --metrics-port N --metrics-host 0.0.0.0 --grace-period S`: the
    kubelet's probes and Prometheus come from outside the container (its own default would be
    loopback outside Kubernetes)."""
    return _cli(
        release,
        "consume",
        worker.name,
        "--metrics-port",
        str(release.metrics_port),
        "--metrics-host",
        METRICS_HOST,
        "--grace-period",
        f"{release.grace_period:g}",
    )


def stop_seconds(release: Release) -> int:
    """How long a worker may take to stop after SIGTERM before it is killed: the grace period and a margin."""
    return math.ceil(release.grace_period) + SHUTDOWN_MARGIN


def release_id(release: Release) -> str:
    """What makes a release: a hash of the image and the app (a new image runs the topology Job again)."""
    return _digest(f"{release.image}\n{release.app}")


# -- Kubernetes ---------------------------------------------------------------------------------


def kubernetes(project: Project, release: Release) -> list[Manifest]:
    """Every object that runs the project's workers on Kubernetes with KEDA, in the order to apply them."""
    if release.image is None:
        raise ConfigurationError("kubernetes needs an image: --image registry/app:tag")
    release.check(project)
    part = dns_label(project.name)
    labels = worker_labels(project.workers)
    auth = _joined(part, "keda")
    manifests = [_trigger_authentication(project, release, auth), _topology_job(project, release)]
    for worker in project.workers.values():
        name = _joined(part, labels[worker.name])
        manifests.append(_worker_deployment(project, release, worker, name, labels[worker.name]))
        manifests.append(_scaled_object(project, release, worker, name, labels[worker.name], auth))
    if project.schedules:
        manifests.append(_scheduler_deployment(project, release))
    return manifests


def _labels(project: Project, component: str, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/part-of": dns_label(project.name),
        "app.kubernetes.io/component": component,
    }


def _metadata(release: Release, name: str, labels: Mapping[str, str], **annotations: str) -> Manifest:
    metadata: Manifest = {"name": name}
    if release.namespace is not None:
        metadata["namespace"] = release.namespace
    metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = {f"nobs-amqp/{key}": value for key, value in annotations.items()}
    return metadata


def _env(project: Project, release: Release) -> list[Manifest]:
    """NOBS_AMQP_URL from the Secret, and NOBS_AMQP_SIGNING_KEY from it when it has that key."""
    secret = release.secret_name(project)
    return [
        {"name": URL_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": release.url_key}}},
        {
            "name": SIGNING_KEY_ENV,
            "valueFrom": {"secretKeyRef": {"name": secret, "key": SIGNING_KEY_KEY, "optional": True}},
        },
    ]


def _container(project: Project, release: Release, name: str, command: list[str]) -> Manifest:
    resources: Manifest = {"requests": {"cpu": release.cpu, "memory": release.memory}}
    if release.memory_limit is not None:
        resources["limits"] = {"memory": release.memory_limit}
    return {
        "name": name,
        "image": release.image,
        "command": command,
        "env": _env(project, release),
        "resources": resources,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }


def _probe(path: str, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": "metrics"},
        "periodSeconds": period,
        "timeoutSeconds": 5,
        "failureThreshold": failures,
    }


def _worker_deployment(project: Project, release: Release, worker: Worker, name: str, label: str) -> Manifest:
    """No `replicas`: KEDA's HorizontalPodAutoscaler owns it (a re-apply must not reset it)."""
    labels = _labels(project, "worker", label)
    container = _container(project, release, "worker", consume_command(release, worker))
    container["ports"] = [{"name": "metrics", "containerPort": release.metrics_port, "protocol": "TCP"}]
    container["startupProbe"] = _probe("/livez", 2, 90)  # up to 3 min to import and connect
    container["livenessProbe"] = _probe("/livez", 10, 3)
    container["readinessProbe"] = _probe("/readyz", 5, 2)
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(release.metrics_port),
        "prometheus.io/path": "/metrics",
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(release, name, labels, worker=worker.name, app=release.app),
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": scrape},
                "spec": {
                    "terminationGracePeriodSeconds": stop_seconds(release),
                    "automountServiceAccountToken": False,
                    "containers": [container],
                },
            },
        },
    }


def _scaled_object(project: Project, release: Release, worker: Worker, name: str, label: str, auth: str) -> Manifest:
    scaling = release.scaling(worker)
    trigger = {
        "type": "rabbitmq",
        "metadata": {"mode": "QueueLength", "value": str(scaling.messages_per_replica), "queueName": worker.name},
        "authenticationRef": {"name": auth},
    }
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _metadata(release, name, _labels(project, "worker", label), worker=worker.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": scaling.minimum,
            "maxReplicaCount": scaling.maximum,
            "triggers": [trigger],
        },
    }


def _trigger_authentication(project: Project, release: Release, name: str) -> Manifest:
    """KEDA's `host` for the rabbitmq scaler: an amqp(s):// URL (the vhost in it), or the management
    API's http(s):// URL, which also counts the messages workers hold."""
    reference = {"parameter": "host", "name": release.secret_name(project), "key": release.keda_key or release.url_key}
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "TriggerAuthentication",
        "metadata": _metadata(release, name, _labels(project, "autoscaling", "rabbitmq")),
        "spec": {"secretTargetRef": [reference]},
    }


def _topology_job(project: Project, release: Release) -> Manifest:
    """`topology apply`, named after the release: the Job of a new image is a new Job, which runs."""
    name = _joined(dns_label(project.name, limit=_LABEL_LIMIT - 18), "topology", release_id(release))
    labels = _labels(project, "topology", "topology")
    container = _container(project, release, "topology", _cli(release, "topology", "apply"))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(release, name, labels, app=release.app, image=str(release.image)),
        "spec": {
            "backoffLimit": JOB_BACKOFF_LIMIT,
            "activeDeadlineSeconds": JOB_DEADLINE_SECONDS,
            "ttlSecondsAfterFinished": JOB_TTL_SECONDS,
            "template": {
                "metadata": {"labels": labels},
                "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False, "containers": [container]},
            },
        },
    }


def _scheduler_deployment(project: Project, release: Release) -> Manifest:
    """`nobs-amqp schedule`: one replica active, the other standing by; no autoscaling, no probes."""
    labels = _labels(project, "scheduler", "scheduler")
    container = _container(project, release, "scheduler", _cli(release, "schedule"))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(release, _joined(dns_label(project.name), "scheduler"), labels, app=release.app),
        "spec": {
            "replicas": SCHEDULER_REPLICAS,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"automountServiceAccountToken": False, "containers": [container]},
            },
        },
    }


# -- Compose ------------------------------------------------------------------------------------


def compose(project: Project, release: Release) -> Manifest:
    """A Compose file running the fleet on one host: a one-shot `topology` service, a service per
    worker (its replicas, health on /livez, stopped gently), and `scheduler` when there are schedules."""
    release.check(project)
    base = _compose_base(release)
    services: dict[str, Manifest] = {
        "topology": {**base, "command": _cli(release, "topology", "apply"), "restart": "no"}
    }
    after_topology = {"topology": {"condition": "service_completed_successfully"}}
    labels = worker_labels(project.workers)
    for worker in project.workers.values():
        services[labels[worker.name]] = {
            **base,
            "command": consume_command(release, worker),
            "restart": "unless-stopped",
            "stop_grace_period": f"{stop_seconds(release)}s",
            "depends_on": after_topology,
            "deploy": {"replicas": release.scaling(worker).replicas},
            "healthcheck": _healthcheck(release),
            "labels": {"nobs-amqp.worker": worker.name},
        }
    if project.schedules:
        services["scheduler"] = {
            **base,
            "command": _cli(release, "schedule"),
            "restart": "unless-stopped",
            "depends_on": after_topology,
        }
    return {"name": dns_label(project.name), "services": services}


def _compose_base(release: Release) -> Manifest:
    """The image (or a build of `.`) and the broker URL: from the env file, else from the
    environment of `docker compose` (or the `.env` file beside the Compose file)."""
    base: Manifest = {"image": release.image} if release.image is not None else {"build": {"context": "."}}
    if release.env_file is not None:
        base["env_file"] = [release.env_file]
    else:
        base["environment"] = {
            URL_ENV: f"${{{URL_ENV}:?set {URL_ENV} to the broker URL}}",
            SIGNING_KEY_ENV: f"${{{SIGNING_KEY_ENV}:-}}",
        }
    return base


def _healthcheck(release: Release) -> Manifest:
    """GET /livez with the image's own Python (an image need not have curl)."""
    url = f"http://127.0.0.1:{release.metrics_port}/livez"
    return {
        "test": ["CMD", "python3", "-c", f"import urllib.request; urllib.request.urlopen({url!r}, timeout=4)"],
        "interval": "10s",
        "timeout": "5s",
        "retries": 3,
        "start_period": "60s",
    }
