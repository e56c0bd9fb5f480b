"""A Compose file running a project's fleet on one host, as a plain dict (no I/O, no YAML here).

It is a Compose Specification file without `version:` or `name:`, so both `docker compose` (v2)
and `docker-compose` (v1, 1.29 or later: `service_completed_successfully` and `deploy.replicas`)
run it; the project name is the folder's, or `-p NAME`. Without an image, the `topology` service
builds `.` once, tagged BUILT_TAG, and every other service runs that image.
"""

from __future__ import annotations

from ..project import Project
from .deploy import (
    SIGNING_KEY_ENV,
    URL_ENV,
    Manifest,
    Release,
    cli,
    consume_command,
    dns_label,
    stop_seconds,
    worker_labels,
)

#: The tag of the image the Compose file builds when given none (a mutable tag, but a local one).
BUILT_TAG = "local"


def compose(project: Project, release: Release) -> Manifest:
    """A Compose file running the fleet on one host: a one-shot `topology` service, a service per
    worker (its replicas, health on /livez, stopped gently), and `scheduler` when there are schedules."""
    release.check(project)
    image = release.image or f"{dns_label(project.name)}:{BUILT_TAG}"
    base = _compose_base(release)
    topology: Manifest = {"image": image}
    if release.image is None:  # built once, here; the others run what it built
        topology["build"] = {"context": "."}
    services: dict[str, Manifest] = {
        "topology": {**topology, **base, "command": cli(release, "topology", "apply"), "restart": "no"}
    }
    after_topology = {"topology": {"condition": "service_completed_successfully"}}
    labels = worker_labels(project.workers)
    for worker in project.workers.values():
        services[labels[worker.name]] = {
            "image": image,
            **base,
            "command": consume_command(release, worker),
            "restart": "unless-stopped",
            "stop_grace_period": f"{stop_seconds(release, worker)}s",
            "depends_on": after_topology,
            "deploy": {"replicas": release.scaling(worker).replicas},
            "healthcheck": _healthcheck(release),
            "labels": {"nobs-amqp.worker": worker.name},
        }
    if project.schedules:
        services["scheduler"] = {
            "image": image,
            **base,
            "command": cli(release, "schedule"),
            "restart": "unless-stopped",
            "depends_on": after_topology,
        }
    return {"services": services}


def _compose_base(release: Release) -> Manifest:
    """The broker URL: from the env file, else from the environment of `docker compose` (or the
    `.env` file beside the Compose file)."""
    base: Manifest = {}
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
