"""Exception types.  All derive from ``ValueError`` so callers that already
catch bad-argument errors keep working."""

__all__ = ["MoEError", "GGUFError"]


class MoEError(ValueError):
    """A bad argument, shape, dtype or value given to numba_moe."""


class GGUFError(MoEError):
    """A GGUF file that is truncated, corrupt, or not a usable MoE layer.

    The message names the file and the tensor or metadata key at fault.
    """
