"""The one exception type of the harvesting side: bad input that a user can fix, named with the fix."""


class HarvestError(ValueError):
    """A model, dataset, layer or buffer setting that cannot work; the message says what to change."""
