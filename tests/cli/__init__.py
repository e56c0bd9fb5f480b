"""The `nobs-amqp` command line, the examples and the operator's workflows, as a user runs them."""
