"""A celeryconfig module for the tests."""
broker_url = 'memory://module'
task_default_priority = 4
task_default_queue = 'from-module'
