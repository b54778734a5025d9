"""Number formats (bits, grouping, symmetry, grid kind), independent of any algorithm."""
from quantlab.formats.spec import QuantFormat

__all__ = ["QuantFormat"]
