"""Files that ship with the package: the default domains (prompts and held-out prompts per neuron) and a
commented `kd.toml` holding every setting at its default, to copy and edit. A `config/` folder in the working
directory (or `CONCH_KD_DOMAINS_FILE`, `CONCH_KD_CONFIG_FILE`, `--config`) overrides them."""

from importlib.resources import files
from pathlib import Path


def default_file(name: str) -> Path:
    """The path of a packaged default file (`domains.toml`, `kd.toml`)."""
    return Path(str(files(__name__) / name))
