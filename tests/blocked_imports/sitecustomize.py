"""Makes TensorFlow, TFDS and ml_collections absent, as on the lent GPU machine's image,
for a process whose PYTHONPATH holds this folder: importing them fails and
``importlib.util.find_spec`` finds nothing. A module found under
``SEQUENCER_JAX_ALLOWED_SITE`` (where the device script installs its carried wheels)
still imports, as it would there. ``SEQUENCER_JAX_BLOCKED_IMPORTS`` (comma-separated)
names other modules to hide."""

import importlib.machinery
import os
import sys

BLOCKED = tuple(os.environ.get('SEQUENCER_JAX_BLOCKED_IMPORTS',
                               'tensorflow,tensorflow_datasets,ml_collections').split(','))
ALLOWED = os.environ.get('SEQUENCER_JAX_ALLOWED_SITE') or None


class FilteringPathFinder(importlib.machinery.PathFinder):
    """Python's path finder, blind to the blocked modules outside ``ALLOWED``."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        spec = super().find_spec(name, path, target)
        if spec is None or name.split('.')[0] not in BLOCKED:
            return spec
        places = [spec.origin or '', *(spec.submodule_search_locations or [])]
        if ALLOWED and all(place.startswith(ALLOWED) for place in places if place):
            return spec
        return None


sys.meta_path[:] = [FilteringPathFinder if finder is importlib.machinery.PathFinder
                    else finder for finder in sys.meta_path]
