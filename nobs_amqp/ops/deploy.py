"""Deployment manifests from a project definition, as plain dicts (no I/O, no YAML here).

Kubernetes: per worker a Deployment running `nobs-amqp consume W`, a KEDA ScaledObject
scaling it on the length of queue `W` and a PodDisruptionBudget; one KEDA TriggerAuthentication
reading the broker URL from the same Secret the workers read it from; a NetworkPolicy letting
in only the metrics port; a Job that applies the topology once per release
(its name carries a hash of the image); and, when the project has schedules, a Deployment running
`nobs-amqp schedule` with a PodDisruptionBudget. Every pod passes Pod Security "restricted"
(see ops/pods.py). Compose: the same fleet as services on one host.

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
from .pods import Pod

#: One manifest (a Kubernetes object) or a Compose file, ready for a YAML or JSON writer.
Manifest = dict[str, Any]
#: An option given for every worker (key None) or for one worker (its name); the one worker's wins.
PerWorker = Mapping[str | None, int]

COMMAND = "nobs-amqp"
METRICS_PORT = 9090
#: Where a deployed worker's metrics and health listen: every address of its container.
METRICS_HOST = "0.0.0.0"
#: `nobs-amqp consume --grace-period`'s default: seconds running tasks get after SIGTERM. A worker
#: deployed without --grace-period gets its time limit instead, when that is longer.
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
    prefetch) and, for Compose, `replicas`. `grace_period`: seconds running tasks get after
    SIGTERM (None: the worker's time limit, at least GRACE_PERIOD). `memory_limit`: by default the
    memory request. `signing_key`: the Secret's key holding NOBS_AMQP_SIGNING_KEY, required (a
    typo stops the pod rather than turn signing off); None: the project does not sign. `pod`:
    what every pod gets besides (variables, volumes, scheduling, the user it runs as).
    """

    app: str
    image: str | None = None
    namespace: str | None = None
    secret: str | None = None
    url_key: str = URL_KEY
    keda_key: str | None = None
    metrics_port: int = METRICS_PORT
    grace_period: float | None = None
    cpu: str = "100m"
    memory: str = "256Mi"
    memory_limit: str | None = None
    cpu_limit: str | None = None
    signing_key: str | None = SIGNING_KEY_KEY
    pod: Pod = field(default_factory=Pod)
    min_replicas: PerWorker = field(default_factory=dict)
    max_replicas: PerWorker = field(default_factory=dict)
    messages_per_replica: PerWorker = field(default_factory=dict)
    replicas: PerWorker = field(default_factory=dict)
    env_file: str | None = None

    def check(self, project: Project) -> None:
        """ConfigurationError for anything Kubernetes or Compose would refuse later."""
        self._check_names()
        self._check_numbers()
        self.pod.check()
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
        keys = [("secret key", self.url_key), ("keda secret key", self.keda_key or self.url_key)]
        keys += [("signing secret key", self.signing_key)] if self.signing_key is not None else []
        for what, key in keys:
            if not _SECRET_KEY.match(key):
                raise ConfigurationError(f"{what} {key!r} is not usable: use letters, digits, '-', '_' and '.'")

    def _check_numbers(self) -> None:
        if not 1 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics port must be 1..65535 (got {self.metrics_port})")
        if self.grace_period is not None and not (self.grace_period >= 0 and math.isfinite(self.grace_period)):
            raise ConfigurationError(f"grace period must be 0 or more seconds (got {self.grace_period})")
        quantities = [("cpu", self.cpu), ("memory", self.memory), ("memory limit", self.memory_limit)]
        for what, quantity in [*quantities, ("cpu limit", self.cpu_limit)]:
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

    def grace(self, worker: Worker) -> float:
        """Seconds `worker`'s running tasks get after SIGTERM: --grace-period, else its time limit
        (at least GRACE_PERIOD), so that a task within its limit is not cut short by a rollout."""
        if self.grace_period is not None:
            return self.grace_period
        return max(GRACE_PERIOD, worker.time_limit or 0.0)

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


def cli(release: Release, *args: str) -> list[str]:
    return [COMMAND, "--app", release.app, *args]


def consume_command(release: Release, worker: Worker) -> list[str]:
    """`nobs-amqp --app APP consume W --metrics-port N --metrics-host 0.0.0.0 --grace-period S`: the
    kubelet's probes and Prometheus come from outside the container (its own default would be
    loopback outside Kubernetes)."""
    return cli(
        release,
        "consume",
        worker.name,
        "--metrics-port",
        str(release.metrics_port),
        "--metrics-host",
        METRICS_HOST,
        "--grace-period",
        f"{release.grace(worker):g}",
    )


def stop_seconds(release: Release, worker: Worker) -> int:
    """How long a worker may take to stop after SIGTERM before it is killed: the grace period and a margin."""
    return math.ceil(release.grace(worker)) + SHUTDOWN_MARGIN


def warnings(project: Project, release: Release) -> list[str]:
    """What would run, but not as the operator likely means: a mutable image tag, a grace period
    shorter than a worker's time limit (a rollout would cut its tasks short)."""
    found = []
    if release.image is not None and mutable_image(release.image):
        found.append(
            f"image {release.image!r} has no version: every pull may run other code; "
            f"use a version tag (app:1.4.2) or a digest (app@sha256:...)"
        )
    for worker in project.workers.values():
        limit = worker.time_limit
        if limit is not None and release.grace(worker) < limit:
            found.append(
                f"worker {worker.name!r} has a time limit of {limit:g} s but a grace period of "
                f"{release.grace(worker):g} s: a rollout or scale-down kills tasks still within their "
                f"limit (they run again); give --grace-period {math.ceil(limit)} or more, or leave it out "
                f"to use each worker's time limit (terminationGracePeriodSeconds follows it)"
            )
    return found


def mutable_image(image: str) -> bool:
    """No digest, and no tag or the tag `latest`."""
    if "@" in image:
        return False
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return tag in ("", "latest")


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
    manifests = [_trigger_authentication(project, release, auth), _network_policy(project, release)]
    manifests.append(_topology_job(project, release))
    for worker in project.workers.values():
        name = _joined(part, labels[worker.name])
        manifests.append(_worker_deployment(project, release, worker, name, labels[worker.name]))
        manifests.append(_scaled_object(project, release, worker, name, labels[worker.name], auth))
        manifests.append(_disruption_budget(release, name, _labels(project, "worker", labels[worker.name]), 1))
    if project.schedules:
        scheduler = _scheduler_deployment(project, release)
        manifests.append(scheduler)
        manifests.append(
            _disruption_budget(release, scheduler["metadata"]["name"], _labels(project, "scheduler", "scheduler"), 0)
        )
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
    """NOBS_AMQP_URL from the Secret, NOBS_AMQP_SIGNING_KEY from it too (not optional: a missing
    key stops the pod instead of silently turning signing off), then the pod's own variables."""
    secret = release.secret_name(project)
    env = [{"name": URL_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": release.url_key}}}]
    if release.signing_key is not None:
        env.append(
            {"name": SIGNING_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": secret, "key": release.signing_key}}}
        )
    return env + release.pod.env_entries()


def _container(project: Project, release: Release, name: str, command: list[str]) -> Manifest:
    limits = {"memory": release.memory_limit or release.memory}
    if release.cpu_limit is not None:
        limits = {"cpu": release.cpu_limit, **limits}
    return {
        "name": name,
        "image": release.image,
        "command": command,
        "env": _env(project, release),
        **release.pod.container(),
        "resources": {"requests": {"cpu": release.cpu, "memory": release.memory}, "limits": limits},
        "securityContext": release.pod.container_security(),
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
                "spec": release.pod.spec([container], terminationGracePeriodSeconds=stop_seconds(release, worker)),
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
    container = _container(project, release, "topology", cli(release, "topology", "apply"))
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
                "spec": release.pod.spec([container], restartPolicy="Never"),
            },
        },
    }


def scheduler_command(release: Release) -> list[str]:
    """`nobs-amqp --app APP schedule --metrics-port N --metrics-host 0.0.0.0`: /livez and /readyz for the kubelet."""
    return cli(release, "schedule", "--metrics-port", str(release.metrics_port), "--metrics-host", METRICS_HOST)


def _scheduler_deployment(project: Project, release: Release) -> Manifest:
    """`nobs-amqp schedule`: one replica active, the other standing by; no autoscaling. Live while
    its event loop answers, ready once connected (the one standing by is ready too)."""
    labels = _labels(project, "scheduler", "scheduler")
    container = _container(project, release, "scheduler", scheduler_command(release))
    container["ports"] = [{"name": "metrics", "containerPort": release.metrics_port, "protocol": "TCP"}]
    container["startupProbe"] = _probe("/livez", 2, 90)
    container["livenessProbe"] = _probe("/livez", 10, 3)
    container["readinessProbe"] = _probe("/readyz", 5, 2)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(release, _joined(dns_label(project.name), "scheduler"), labels, app=release.app),
        "spec": {
            "replicas": SCHEDULER_REPLICAS,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": release.pod.spec([container]),
            },
        },
    }


def _network_policy(project: Project, release: Release) -> Manifest:
    """Into the project's pods only the kubelet's probes and Prometheus, on the metrics port;
    out of them anything (the broker, DNS)."""
    part = dns_label(project.name)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(release, part, _labels(project, "network", "network")),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/part-of": part}},
            "policyTypes": ["Ingress"],
            "ingress": [{"ports": [{"port": release.metrics_port, "protocol": "TCP"}]}],
        },
    }


def _disruption_budget(release: Release, name: str, labels: Mapping[str, str], unavailable: int) -> Manifest:
    """A node drain takes its pods one at a time: workers (`unavailable` 1: one of them may be
    down at once, so a single replica may still be moved), or the scheduler (`unavailable` 0:
    one of its two replicas stays up)."""
    budget = {"maxUnavailable": 1} if unavailable else {"minAvailable": SCHEDULER_REPLICAS - 1}
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(release, name, labels),
        "spec": {**budget, "selector": {"matchLabels": dict(labels)}},
    }
