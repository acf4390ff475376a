"""The examples of docs/testing.rst: each is a test that runs."""
