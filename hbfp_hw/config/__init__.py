"""Configuration objects: the single source of truth for unit widths and parameters.

One module per unit (``quantizer``, ``mac_array``, ...); each config is an immutable,
validated dataclass with derived constants and ``to_dict``/``from_dict`` for manifests.
"""
