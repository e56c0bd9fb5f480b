.PHONY: demo test lint venv broker

# Every target sets up what it needs: the virtualenv, and a RabbitMQ that answers.
VENV := .venv

venv:
	bash scripts/bootstrap-venv.sh

broker:
	bash scripts/ensure-broker.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict nobs_amqp

## make test: lint, type-check, then the whole suite against the real broker.
test: venv broker lint
	$(VENV)/bin/pytest

## make demo: a worker consumes priority_queue; one task fails, retries, lands in the DLQ.
demo: venv broker
	$(VENV)/bin/python -m examples.send_email.demo
