"""The same behaviour on memory:// and on RabbitMQ (the `url` fixture runs each test on both)."""
