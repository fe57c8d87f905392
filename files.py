"""Files written whole or not at all, and disk errors in one line: every file of a run or an evaluation goes here.

Each file is made in memory, written to a temporary file with plain os.write calls and renamed over its name
(waveft.write_atomically, the one implementation, which waveft.save uses for adapter files too). A full disk then
fails inside os.write with an OSError (never deep inside a serialiser's own writer, as torch.save's zip writer does
with a RuntimeError), the previous file stays whole, and `reported_write` turns the error into a WriteError: one line
naming the file, the error and the free space. A folder (merged_unet/) is written whole the same way, under a
temporary name that is then renamed (write_folder); loss.csv grows by rows appended with os.write (append_bytes).
"""
import contextlib
import csv
import io
import os
import shutil
from pathlib import Path

import torch
from PIL import Image

from waveft import write_all, write_atomically


class WriteError(RuntimeError):
    """A file could not be written (full disk, no permission); the message is one line."""


@contextlib.contextmanager
def reported_write(path, advice="the files written before are intact: make room and run again (with --resume once "
                                "a checkpoint exists)"):
    """An OSError while writing `path` becomes a WriteError: one line naming the file, the error, the free space."""
    try:
        yield
    except OSError as error:
        folder = Path(path).parent
        while not folder.exists() and folder != folder.parent:  # the free space of the disk it would have been on
            folder = folder.parent
        free = shutil.disk_usage(folder).free / 2**20
        raise WriteError(f"cannot write {path}: {error.strerror or error} ({free:,.0f} MiB free there); "
                         f"{advice}") from None


def write_file(path, data, advice=None):
    """Write `data` (bytes, or str as UTF-8, or a PIL image as PNG) to `path` through a temporary file in the same
    folder and one rename: a crash or a full disk mid-write leaves the previous file intact and no temporary file
    behind. The file gets the umask's permissions. Disk errors raise WriteError (one line; `advice` ends it, default
    reported_write's)."""
    if isinstance(data, Image.Image):
        buffer = io.BytesIO()
        data.save(buffer, format="PNG")
        data = buffer.getvalue()
    elif isinstance(data, str):
        data = data.encode()
    with reported_write(path) if advice is None else reported_write(path, advice):
        write_atomically(path, data)
    return Path(path)


def torch_bytes(obj):
    """torch.save into memory (then written by write_file): the zip writer never meets the disk."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def append_bytes(fd, path, data):
    """Append `data` to the open file `fd` (of `path`) with plain os.write: loss.csv's rows. A full disk is a
    WriteError; the rows before stay whole."""
    with reported_write(path):
        write_all(fd, data)


def csv_text(rows):
    """Rows (lists) as CSV text."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def write_csv(path, rows, advice=None):
    """Rows (dicts) as a CSV file with a header of every key that occurs, written by write_file."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))  # all keys
    writer.writeheader()
    writer.writerows(rows)
    return write_file(path, text.getvalue(), advice)


def write_folder(folder, files):
    """Write a folder whole or not at all: `files` yields (name, bytes or str) one at a time, each written with
    plain os.write into <folder>.<pid>.tmp/, which then takes the place of `folder`. An existing folder is first
    renamed to <folder>.<pid>.old (and back if the second rename fails), removed once the new one is in place: at
    every moment the old folder or the new one is complete on disk, and a crash between the two renames leaves the
    old one whole under its .old name. Disk errors raise WriteError naming `folder`; nothing temporary is left."""
    folder = Path(folder)
    tmp, old = (folder.with_name(f"{folder.name}.{os.getpid()}.{end}") for end in ("tmp", "old"))
    with reported_write(folder):
        try:
            for leftover in (tmp, old):  # from a crash of this process id
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, data in files:
                fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                try:
                    write_all(fd, data.encode() if isinstance(data, str) else data)
                finally:
                    os.close(fd)
            if folder.exists():
                os.replace(folder, old)
            try:
                os.replace(tmp, folder)
            except OSError:
                if old.exists():
                    os.replace(old, folder)
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return folder
