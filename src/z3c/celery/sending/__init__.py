"""The sending side: where a task is queued and sent.

``queue`` keeps the tasks a transaction queued and hands them to the
dispatcher at commit; ``dispatchers`` are the modes that keep no copy
(the durable one is in `z3c.celery.outbox`); ``publish`` is the one way
to the broker; ``result`` the object ``delay()`` returns.
"""
