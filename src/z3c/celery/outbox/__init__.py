"""The durable outbox: tasks stored in the ZODB with the data.

``store`` (the records and every write to them), ``dispatcher`` (dispatch
mode ``outbox``), ``relay`` (publishes what was left; a worker bootstep)
and ``command`` (``celery outbox ...``).
"""
