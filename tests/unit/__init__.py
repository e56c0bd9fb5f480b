"""Tests of one module at a time, no broker."""
