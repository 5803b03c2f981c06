"""Ray Tune sweeps over any dotted config key (``ovdlab sweep``): see :mod:`.sweep`."""
