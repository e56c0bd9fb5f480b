.PHONY: demo test test-4 lint venv broker bench bench-quick bench-scale

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

## make test: lint, type-check, then the whole suite against the real broker (NOBS_AMQP_URL,
## RabbitMQ 3.x here), then the tests that need a broker (-m rabbitmq; the memory:// ones do not
## depend on its version) against a throwaway RabbitMQ 4.x node (test-4).
## Fails if either run fails. NOBS_AMQP_SKIP_RABBITMQ4=1 skips the second run.
test: venv broker lint
	@status=0; \
	$(VENV)/bin/pytest || status=$$?; \
	if [ "$${NOBS_AMQP_SKIP_RABBITMQ4:-0}" = 1 ]; then \
		echo "test: NOBS_AMQP_SKIP_RABBITMQ4=1, so the suite did not run against RabbitMQ 4.x"; \
	else \
		$(TEST_4) || status=$$?; \
	fi; \
	exit $$status

## make test-4: the suite against a RabbitMQ 4.x node started from a Debian trixie root
## (scripts/rabbitmq4.sh: built once with debootstrap, outside the repo; needs root on Debian).
TEST_4 = bash scripts/rabbitmq4.sh run -- $(VENV)/bin/pytest -m rabbitmq
test-4: venv
	$(TEST_4)

## make demo: a worker consumes priority_queue; one task fails, retries, lands in the DLQ.
## It runs in a vhost of its own, deleted at the end (make demo KEEP=1 keeps it for the management UI).
## Without a RabbitMQ that can be reached or started, it runs on the in-memory broker and says so.
demo: venv
	@if bash scripts/ensure-broker.sh; then \
		$(VENV)/bin/python -m examples.send_email.demo $(if $(KEEP),--keep); \
	else \
		echo "demo: no RabbitMQ could be reached or started; running on the in-memory broker instead"; \
		NOBS_AMQP_URL=memory:// $(VENV)/bin/python -m examples.send_email.demo; \
	fi

## make bench: nobs_amqp against raw aio-pika, its peers and the Java client anchor, each in its own
## env, every phase: throughput, latency, the delay ladder, growth (bench/README.md). About 45 minutes
## on 2 quiet cores; the envs are made on first use. Tables on stdout, plots in bench/plots/.
bench: venv broker
	$(VENV)/bin/python bench/run.py --phases all --n 20000 --rounds 3

## make bench-quick: every phase once at small sizes, every system (a few minutes).
bench-quick: venv broker
	$(VENV)/bin/python bench/run.py --quick

## make bench-scale: drain rate with 1, 2 and 4 worker processes, on one throwaway node and on a
## throwaway three-node cluster (bench/scale.py; needs root or the rabbitmq user, like the fault tests).
bench-scale: venv
	$(VENV)/bin/python bench/scale.py --n 20000 --rounds 2
