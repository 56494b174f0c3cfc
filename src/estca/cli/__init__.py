"""Operator front ends on the command line."""
