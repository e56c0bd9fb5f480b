"""What an operator does to a project's broker objects: status, topology drift and deletion,
the dead-letter queues, deployment manifests. The CLI (`cli/`) is a thin shell over these."""
