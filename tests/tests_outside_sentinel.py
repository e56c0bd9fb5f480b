"""Importing this module would mean a message made a worker import code outside its project."""

raise RuntimeError("a worker imported a module outside its project")
