"""An app whose Project has a malformed URL with a password written into the source."""

from __future__ import annotations

from nobs_amqp import Project, Worker

project = Project(name="bad-url", workers=[Worker("urls")], url="amqp://bob:Quokka4711/x@localhost/")
