"""The one error type of ``pipelines/`` (it must not import imtext, whose errors the CLI prints)."""


class PipelineError(Exception):
    """A problem the user can fix: bad arguments, an unreachable endpoint, a failed step."""
