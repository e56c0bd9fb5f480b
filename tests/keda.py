"""A field check for the KEDA objects `nobs-amqp deploy kubernetes` writes.

KEDA's CRD schemas come with no installed package (kubernetes-validate ships Kubernetes' own
types only), and the tests run without network. So this is a schema written here from KEDA 2.x's
CRDs (`keda.sh/v1alpha1`, `config/crd/bases/keda.sh_scaledobjects.yaml` and
`keda.sh_triggerauthentications.yaml` in kedacore/keda) and its rabbitmq scaler's documented
parameters, checked with jsonschema in the spirit of kubernetes-validate's strict mode:

- the required fields (`spec`, `spec.scaleTargetRef.name`, `spec.triggers[].type` and `.metadata`,
  `secretTargetRef[].parameter`, `.name` and `.key`) are there;
- every field has the CRD's type (int32 counts with the CRD's minimums, trigger metadata values are
  strings, `authenticationRef.kind` one of the two the CRD allows);
- no key the CRD does not know, anywhere (`additionalProperties: false`), which the API server
  would drop without a word;
- the CRD's one cross-field rule: `minReplicaCount <= maxReplicaCount` (maximum default 100);
- the rabbitmq trigger: only the scaler's metadata keys, `mode` QueueLength or MessageRate with a
  positive numeric `value`, a `queueName`; `host` from a TriggerAuthentication (its
  `parameter: host`) or the metadata;
- names are DNS-1123 subdomains, label values valid label values.
"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"}
_LABEL_VALUE = {"type": "string", "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"}
_STRING = {"type": "string"}
_STRINGS = {"type": "object", "additionalProperties": _STRING}


def _int32(minimum: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": minimum, "maximum": 2**31 - 1}


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties, "additionalProperties": False}


_METADATA = _object(
    ["name"],
    name=_NAME,
    namespace=_NAME,
    labels={"type": "object", "additionalProperties": _LABEL_VALUE},
    annotations=_STRINGS,
)

SCALED_OBJECT = _object(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "keda.sh/v1alpha1"},
    kind={"const": "ScaledObject"},
    metadata=_METADATA,
    spec=_object(
        ["scaleTargetRef", "triggers"],
        scaleTargetRef=_object(["name"], apiVersion=_STRING, kind=_STRING, name=_NAME, envSourceContainerName=_STRING),
        pollingInterval=_int32(1),
        cooldownPeriod=_int32(0),
        initialCooldownPeriod=_int32(0),
        idleReplicaCount=_int32(0),
        minReplicaCount=_int32(0),
        maxReplicaCount=_int32(1),
        advanced={"type": "object"},
        fallback={"type": "object", "required": ["failureThreshold", "replicas"]},
        triggers={
            "type": "array",
            "minItems": 1,
            "items": _object(
                ["type", "metadata"],
                type=_STRING,
                name=_STRING,
                metadata=_STRINGS,
                authenticationRef=_object(
                    ["name"], name=_NAME, kind={"enum": ["TriggerAuthentication", "ClusterTriggerAuthentication"]}
                ),
                metricType={"enum": ["AverageValue", "Value", "Utilization"]},
                useCachedMetrics={"type": "boolean"},
            ),
        },
    ),
)

TRIGGER_AUTHENTICATION = _object(
    ["apiVersion", "kind", "metadata", "spec"],
    apiVersion={"const": "keda.sh/v1alpha1"},
    kind={"const": "TriggerAuthentication"},
    metadata=_METADATA,
    spec=_object(
        [],
        secretTargetRef={
            "type": "array",
            "minItems": 1,
            "items": _object(["parameter", "name", "key"], parameter=_STRING, name=_NAME, key=_STRING),
        },
    ),
)

#: The rabbitmq scaler's trigger metadata, and what it takes from a TriggerAuthentication.
RABBITMQ_METADATA = {
    "host",
    "protocol",
    "queueName",
    "mode",
    "value",
    "activationValue",
    "queueLength",
    "vhostName",
    "useRegex",
    "excludeUnacknowledged",
    "pageSize",
    "operation",
    "timeout",
    "unsafeSsl",
}
RABBITMQ_AUTH_PARAMETERS = {"host", "protocol", "vhostName", "username", "password", "ca", "cert", "key", "tls"}


def check_keda(manifest: dict[str, Any], authentications: dict[str, dict[str, Any]]) -> None:
    """Raise (jsonschema.ValidationError or AssertionError) if `manifest` is not a KEDA object as
    the CRD and the rabbitmq scaler take it; `authentications`: the TriggerAuthentications by name."""
    kind = manifest["kind"]
    if kind == "TriggerAuthentication":
        jsonschema.Draft202012Validator(TRIGGER_AUTHENTICATION).validate(manifest)
        for reference in manifest["spec"]["secretTargetRef"]:
            assert reference["parameter"] in RABBITMQ_AUTH_PARAMETERS, reference
        return
    assert kind == "ScaledObject", kind
    jsonschema.Draft202012Validator(SCALED_OBJECT).validate(manifest)
    spec = manifest["spec"]
    assert spec.get("minReplicaCount", 0) <= spec.get("maxReplicaCount", 100), spec
    for trigger in spec["triggers"]:
        assert trigger["type"] == "rabbitmq", trigger
        metadata = trigger["metadata"]
        assert set(metadata) <= RABBITMQ_METADATA, set(metadata) - RABBITMQ_METADATA
        assert metadata["mode"] in ("QueueLength", "MessageRate"), metadata
        assert re.fullmatch(r"[0-9]+(\.[0-9]+)?", metadata["value"]) and float(metadata["value"]) > 0, metadata
        assert metadata["queueName"], metadata
        auth = authentications[trigger["authenticationRef"]["name"]]
        hosts = [r for r in auth["spec"]["secretTargetRef"] if r["parameter"] == "host"]
        assert "host" in metadata or hosts, "the rabbitmq scaler needs a host"
