.PHONY: demo test lint venv broker bench

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
## Without a RabbitMQ that can be reached or started, it runs on the in-memory broker and says so.
demo: venv
	@if bash scripts/ensure-broker.sh; then \
		$(VENV)/bin/python -m examples.send_email.demo; \
	else \
		echo "demo: no RabbitMQ could be reached or started; running on the in-memory broker instead"; \
		NOBS_AMQP_URL=memory:// $(VENV)/bin/python -m examples.send_email.demo; \
	fi

## make bench: nobs_amqp against raw aio-pika and its peers, each in its own venv (bench/README.md).
bench: venv broker
	$(VENV)/bin/python bench/run.py --systems nobs_amqp,aiopika,dramatiq,celery,faststream,taskiq --n 20000 --rounds 3
