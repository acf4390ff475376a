"""1.x import path of the test layers (`z3c.celery.testing.layers`)."""
from z3c.celery.testing.layers import EAGER_LAYER  # noqa: F401
from z3c.celery.testing.layers import INLINE_LAYER  # noqa: F401
from z3c.celery.testing.layers import EagerLayer  # noqa: F401
from z3c.celery.testing.layers import EndToEndLayer  # noqa: F401
from z3c.celery.testing.layers import InlineLayer  # noqa: F401
