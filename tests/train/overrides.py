"""Dotted-key overrides of an experiment ConfigDict, as the command line gives them."""


def configure(config, **overrides):
    """``configure(config, **{"mesh.data": 2})`` sets ``config.mesh.data = 2``; returns config."""
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for part in path:
            target = target[part]
        target[last] = value
    return config
