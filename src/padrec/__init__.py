"""padrec: fast LLM-based generative recommendation with semantic IDs and speculative decoding."""

__version__ = "0.1.0"


class PadrecError(Exception):
    """A user-facing error: bad input, missing files, mismatched artefacts. The CLI prints its message."""
