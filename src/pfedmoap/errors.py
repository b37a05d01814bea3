"""The one error type a user can cause. The CLI prints it as `error: ...` and exits 2."""


class PFedMoAPError(Exception):
    """Bad input: config, data root, checkpoint, world size. The message names the key, the value
    and what was expected, in one line."""


class ReportedElsewhere(PFedMoAPError):
    """Another rank hit a user error and printed it; this rank only exits with code 2 as well."""
