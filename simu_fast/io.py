"""The one atomic file writer: a file is either its old self or all of its new content, never half written.

The content goes to a temporary file beside the target (same directory, so same file system), is flushed to
disk (fsync), then os.replace'd over the target; on any failure the temporary file is removed and the target
is left as it was. The new file keeps the old one's permission bits, or gets 0644 (mkstemp makes 0600).
"""
from __future__ import annotations

import os
import tempfile
from typing import Callable, Union

Content = Union[bytes, str, Callable[[str], None]]


def write_atomic(path, content: Content) -> str:
    """Write `content` to `path` atomically and return path. content: bytes, a str (written as UTF-8), or a
    callable that fills the temporary file whose path it is given (e.g. safetensors' save_file). The parent
    directory is created if missing."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.tmp-")
    try:
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        if callable(content):
            os.close(fd)
            fd = None
            content(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        else:
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            with os.fdopen(fd, "wb") as f:
                fd = None
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
