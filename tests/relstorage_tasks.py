"""Tasks of the RelStorage tests: RelStorage's own lock errors, raised
once, so that a test sees them reach the conflict policy by their type."""
from tests.tasks import data
from tests.tasks import principal_id


def lock_error_once(self, key, kind):
    """Raise RelStorage's error class *kind* on the first attempt, then
    record who ran it and how many retries it took."""
    from relstorage.adapters import interfaces
    if not self.request.retries:
        data()[key + '-dirty'] = True    # rolled back with the error
        raise getattr(interfaces, kind)(f'simulated {kind} for {key}')
    data()[key] = (principal_id(), self.request.retries)
    return self.request.retries
