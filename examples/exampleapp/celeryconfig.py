"""Celery settings of the example site that differ between installations.

``site.zcml`` reads this module (``<celery:config module="...">``); the
settings written as attributes there win over these.
"""
import os


#: The broker: ``EXAMPLE_BROKER_URL`` if set (an external Redis or
#: RabbitMQ, e.g. ``amqp://guest:guest@127.0.0.1:5672//``), else a local
#: Redis.
broker_url = os.environ.get('EXAMPLE_BROKER_URL', 'redis://127.0.0.1:6379/0')

#: With a secret (at least 16 characters, the same for the web processes
#: and the workers) every message is signed and workers refuse messages
#: that are not: whoever can write to the broker cannot make a task run
#: as another principal.
signing_secret = os.environ.get('EXAMPLE_SIGNING_SECRET') or None
