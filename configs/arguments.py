"""The comma-separated argument of a config file (``--config=configs/FILE.py:A,B``)."""


def split_argument(arg: str, names: tuple[str, ...], config_file: str, meaning: str) -> list[str]:
    """``arg``'s parts, one per name in ``names`` (each non-empty); the error says what the
    config needs (``meaning``) and how to pass it."""
    parts = [p.strip() for p in arg.split(",")] if arg else []
    if len(parts) != len(names) or not all(parts):
        raise ValueError(
            f"{config_file} needs {meaning}, as --config={config_file}:{','.join(names)}; "
            f"got {arg!r}"
        )
    return parts
