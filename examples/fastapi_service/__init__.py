"""A FastAPI service that queues emails; a worker process sends them."""
