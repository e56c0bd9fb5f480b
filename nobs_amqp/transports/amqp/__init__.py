"""RabbitMQ: the transport (`transport.AmqpTransport`) and its parts: two connections
(`link`, `failover`), one publish until confirmed (`sending`, `frames`), deliveries and their
acks (`delivery`, `acks`, `decoding`), exclusive leases (`leases`)."""
