"""The one error the export command reports as a single clear line (exit status 2)."""


class ExportError(Exception):
    """Bad arguments, an unusable model, or a failed parity check."""
