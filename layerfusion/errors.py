"""Error types whose messages are meant for the user: the CLI prints them without a traceback."""


class LayerFusionError(Exception):
    """Base of the errors a user can act on (bad data, bad config, missing model)."""


class ConfigError(LayerFusionError, ValueError):
    """A configuration value is invalid: the message names the key and what was expected."""


class ModelNotFoundError(LayerFusionError, FileNotFoundError):
    """A model name resolves to neither a local directory nor a hub copy."""


class CheckpointError(LayerFusionError, ValueError):
    """A checkpoint or saved classifier is missing, unreadable, or not written by layerfusion."""
