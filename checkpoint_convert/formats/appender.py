"""Append to a file, copying the bytes of file-backed tensors from file to file inside the kernel.

A tensor that is an unchanged view of a source file (a norm, a projection taken as it is, half of a
fused tensor) needs no trip through this process: ``copy_file_range`` copies its bytes from the
source file's page cache to the output's, which is all ``cp`` does. Writing it from the mapping would
fault every source page into the process first. Any other tensor is written with ``write``.
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from ..base.memory import file_region

# copy_file_range refused for this pair of files (another filesystem, an old kernel): write instead
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM, errno.EBADF}


class Appender:
    """A new file written front to back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._sources: dict[str, int] = {}
        self._kernel_copy = hasattr(os, "copy_file_range")

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self._fd, view):]

    def write_tensor(self, tensor: torch.Tensor) -> None:
        """Append the tensor's bytes (contiguous, in memory order)."""
        region = file_region(tensor) if self._kernel_copy else None
        if region is None or not self._copy(*region, tensor.nbytes):
            self.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())

    def _copy(self, source: str, offset: int, count: int) -> bool:
        """Copy ``count`` bytes of ``source`` from ``offset``; False (nothing copied) where the kernel cannot."""
        if source not in self._sources:
            self._sources[source] = os.open(source, os.O_RDONLY)
        done = 0
        try:
            while done < count:
                copied = os.copy_file_range(self._sources[source], self._fd, count - done, offset + done)
                if copied == 0:
                    raise OSError(errno.EIO, f"{source} ends before byte {offset + count}")
                done += copied
        except OSError as error:
            if done or error.errno not in _NO_KERNEL_COPY:
                raise
            self._kernel_copy = False
            return False
        return True

    def close(self) -> None:
        for fd in [self._fd, *self._sources.values()]:
            os.close(fd)
        self._sources.clear()
