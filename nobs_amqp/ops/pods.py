"""What every pod of a deployed fleet shares, as plain dicts: the security context that Pod Security
"restricted" admits, a writable /tmp on a read-only root filesystem, and what an operator adds
(variables, Secrets and ConfigMaps as variables or files, image pull secrets, a service account,
node selection and tolerations). No I/O here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigurationError

Manifest = dict[str, Any]

#: The user and group the containers run as: not root, and above the host's own accounts.
RUN_AS = 10001
#: The writable folder of a read-only root filesystem (an emptyDir): temp files, the prometheus
#: folder of `consume --processes`, whatever `tempfile` gives a task.
TMP = "/tmp"
TMP_VOLUME = "tmp"
SECRET, CONFIGMAP = "secret", "configmap"
EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
#: Variables the fleet sets itself (an operator's would silently replace them).
RESERVED_ENV = frozenset({"NOBS_AMQP_URL", "NOBS_AMQP_SIGNING_KEY", "TMPDIR"})

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Volume:
    """Secret or ConfigMap `name` (`kind`: SECRET or CONFIGMAP) mounted read-only at `path`."""

    kind: str
    name: str
    path: str


@dataclass(frozen=True)
class Toleration:
    """Tolerate taint `key` (with `value`, else any value) of `effect` (None: every effect)."""

    key: str
    value: str | None = None
    effect: str | None = None

    def manifest(self) -> Manifest:
        spec: Manifest = {"key": self.key, "operator": "Exists" if self.value is None else "Equal"}
        if self.value is not None:
            spec["value"] = self.value
        if self.effect is not None:
            spec["effect"] = self.effect
        return spec


@dataclass(frozen=True, kw_only=True)
class Pod:
    """What an operator adds to every pod (workers, scheduler, topology Job)."""

    env: Mapping[str, str] = field(default_factory=dict)
    env_from_secrets: Sequence[str] = ()
    env_from_configmaps: Sequence[str] = ()
    volumes: Sequence[Volume] = ()
    image_pull_secrets: Sequence[str] = ()
    service_account: str | None = None
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: Sequence[Toleration] = ()
    run_as_user: int = RUN_AS
    run_as_group: int = RUN_AS

    def check(self) -> None:
        """ConfigurationError for anything Kubernetes or Pod Security "restricted" would refuse."""
        for name in self.env:
            if not _ENV_NAME.match(name):
                raise ConfigurationError(f"env {name!r} is not a variable name: use letters, digits, '_', '-', '.'")
            if name in RESERVED_ENV:
                raise ConfigurationError(f"env {name!r} is set by the fleet itself: leave it out")
        names = [*self.env_from_secrets, *self.env_from_configmaps, *self.image_pull_secrets]
        names += [volume.name for volume in self.volumes] + [self.service_account or "x"]
        for name in names:
            if not _SUBDOMAIN.match(name):
                raise ConfigurationError(f"{name!r} is not a kubernetes name: use a-z, 0-9, '-' and '.'")
        self._check_volumes()
        for key, value in self.node_selector.items():
            _check_label(key, value)
        for toleration in self.tolerations:
            _check_label(toleration.key, toleration.value or "")
            if toleration.effect is not None and toleration.effect not in EFFECTS:
                raise ConfigurationError(f"toleration effect {toleration.effect!r} must be one of {', '.join(EFFECTS)}")
        if self.run_as_user < 1 or self.run_as_group < 1:
            raise ConfigurationError("run as user and group must be more than 0 (root is refused)")

    def _check_volumes(self) -> None:
        paths = [volume.path for volume in self.volumes]
        for path in paths:
            if not path.startswith("/") or path.rstrip("/") in ("", TMP) or ":" in path:
                raise ConfigurationError(f"mount path {path!r} must be an absolute folder other than / and {TMP}")
        if len(set(paths)) != len(paths):
            raise ConfigurationError("two volumes are mounted at the same path: give each its own")
        if len({_volume_name(volume) for volume in self.volumes}) != len(self.volumes):
            raise ConfigurationError("a secret or configmap is mounted twice: mount it once")

    # -- the manifests ----------------------------------------------------------------------

    def container_security(self) -> Manifest:
        """A container that Pod Security "restricted" admits, on a read-only root filesystem."""
        return {
            "runAsNonRoot": True,
            "runAsUser": self.run_as_user,
            "runAsGroup": self.run_as_group,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        }

    def env_entries(self) -> list[Manifest]:
        """TMPDIR (the writable /tmp) and the operator's variables."""
        return [{"name": "TMPDIR", "value": TMP}, *({"name": k, "value": v} for k, v in self.env.items())]

    def container(self) -> Manifest:
        """envFrom and volumeMounts of every container."""
        extra: Manifest = {}
        sources = [{"secretRef": {"name": n}} for n in self.env_from_secrets]
        sources += [{"configMapRef": {"name": n}} for n in self.env_from_configmaps]
        if sources:
            extra["envFrom"] = sources
        mounts: list[Manifest] = [{"name": TMP_VOLUME, "mountPath": TMP}]
        mounts += [{"name": _volume_name(v), "mountPath": v.path, "readOnly": True} for v in self.volumes]
        extra["volumeMounts"] = mounts
        return extra

    def spec(self, containers: list[Manifest], **settings: Any) -> Manifest:
        """A pod spec running `containers`, with `settings` (e.g. restartPolicy) first."""
        spec: Manifest = dict(settings)
        if self.service_account is not None:
            spec["serviceAccountName"] = self.service_account
        spec["automountServiceAccountToken"] = self.service_account is not None
        spec["securityContext"] = {
            "runAsNonRoot": True,
            "runAsUser": self.run_as_user,
            "runAsGroup": self.run_as_group,
            "fsGroup": self.run_as_group,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        if self.image_pull_secrets:
            spec["imagePullSecrets"] = [{"name": name} for name in self.image_pull_secrets]
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        if self.tolerations:
            spec["tolerations"] = [toleration.manifest() for toleration in self.tolerations]
        spec["containers"] = containers
        spec["volumes"] = [{"name": TMP_VOLUME, "emptyDir": {}}, *(_volume(v) for v in self.volumes)]
        return spec


def _volume_name(volume: Volume) -> str:
    label = re.sub(r"[^a-z0-9]+", "-", f"{volume.kind}-{volume.name}").strip("-")
    return label[:63].rstrip("-")


def _volume(volume: Volume) -> Manifest:
    if volume.kind == SECRET:
        return {"name": _volume_name(volume), "secret": {"secretName": volume.name}}
    return {"name": _volume_name(volume), "configMap": {"name": volume.name}}


def _check_label(key: str, value: str) -> None:
    prefix, _, name = key.rpartition("/")
    if (prefix and not _SUBDOMAIN.match(prefix)) or not _LABEL_NAME.match(name):
        raise ConfigurationError(f"{key!r} is not a kubernetes label key (e.g. disktype or example.com/pool)")
    if not _LABEL_VALUE.match(value):
        raise ConfigurationError(
            f"{value!r} is not a kubernetes label value: 63 letters, digits, '-', '_', '.' at most"
        )
