"""Paths of work directories, checkpoints, run logs and exports: local, or on any filesystem that
`etils.epath` knows (``gs://``, ``s3://``, ...), the layer orbax and TFDS already use.

Local paths are made absolute (so a run's files do not depend on the directory it was started
from); URIs are kept as written. Object stores differ from a local disk in two ways that matter
here, and each helper handles them in one place:

* **No rename.** An object write is already atomic (a reader sees the old object or the new one,
  never half of one), so `write_bytes_atomic` writes a remote object directly and only a local
  file goes through a temporary file and `os.replace`.
* **No append.** `AppendFile` keeps a remote object's text in memory and rewrites the object when
  it flushes, at most every `flush_secs` and on close (TensorFlow's own GCS writer does the
  same: it uploads the whole file on every flush). A local file is appended and flushed per line.

Which client does the I/O of a URI is epath's choice: TensorFlow's filesystem when TensorFlow is
installed (as it is here, for the input pipeline), else fsspec (gcsfs, s3fs). orbax writes the
arrays of a checkpoint through TensorStore, which has its own GCS and S3 clients.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
  """True for a URI (``scheme://...``), False for a local path."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """``path`` as an `epath.Path`: a local one absolute with ``~`` expanded, a URI as written."""
  path = os.fspath(path)
  if not path:
    raise ValueError('an empty path')
  if is_remote(path):
    return epath.Path(path)
  return epath.Path(os.path.abspath(os.path.expanduser(path)))


def join(path: PathLike, *parts: str) -> str:
  """`resolve(path)` joined with ``parts``, as a string (what orbax and TFDS take)."""
  return os.fspath(resolve(path).joinpath(*parts))


def exists(path: PathLike) -> bool:
  return resolve(path).exists()


def isdir(path: PathLike) -> bool:
  return resolve(path).is_dir()


def check_output_dir(path: PathLike) -> None:
  """Fails fast, before any work, when the local file ``path`` could not be written because its
  directory is missing (FileNotFoundError). A URI passes: object stores have no directories, and
  the write itself checks the bucket."""
  path = os.fspath(path)
  if is_remote(path):
    return
  directory = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'output directory {directory} does not exist (for {path})')


def makedirs(path: PathLike) -> None:
  """Creates ``path`` and its parents (on an object store, a no-op where directories are
  implicit)."""
  resolve(path).mkdir(parents=True, exist_ok=True)


def rmtree(path: PathLike) -> None:
  """Removes ``path`` and everything below it; nothing to do when it does not exist."""
  p = resolve(path)
  if p.exists():
    p.rmtree()


def read_text(path: PathLike) -> str:
  return resolve(path).read_text()


def read_bytes(path: PathLike) -> bytes:
  return resolve(path).read_bytes()


def write_bytes_atomic(path: PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` so that a failure never leaves a half-written file there (a
  previous file stays as it was): locally through a temporary file beside it and a rename, on an
  object store as one object write."""
  p = resolve(path)
  if is_remote(p):
    p.write_bytes(data)
    return
  fd, tmp = tempfile.mkstemp(prefix='.tmp-', suffix=p.suffix, dir=os.fspath(p.parent))
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
    os.replace(tmp, os.fspath(p))
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text_atomic(path: PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode('utf-8'))


def upload_tree(local_dir: PathLike, dest: PathLike) -> None:
  """Copies the directory ``local_dir`` (every file below it) to ``dest``, replacing what was
  there; for outputs that a library can only write to a local directory (Core ML packages)."""
  local_dir = os.fspath(local_dir)
  rmtree(dest)
  target = resolve(dest)
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    out = target if rel == '.' else target / rel
    out.mkdir(parents=True, exist_ok=True)
    for name in files:
      with open(os.path.join(root, name), 'rb') as f:
        (out / name).write_bytes(f.read())


@contextlib.contextmanager
def local_input(path: PathLike) -> Iterator[str]:
  """A local file to read ``path`` through, for libraries that open only local files
  (safetensors, torch.load): ``path`` itself when local, else a temporary downloaded copy."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  p = resolve(path)
  if not p.exists():
    raise FileNotFoundError(os.fspath(p))
  scratch = tempfile.mkdtemp(prefix='mobilevis-')
  try:
    local = os.path.join(scratch, p.name)
    with open(local, 'wb') as f:
      f.write(p.read_bytes())
    yield local
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def local_output(path: PathLike) -> Iterator[str]:
  """A local file to write ``path`` through, for libraries that write only local files:
  ``path`` itself when local (the writer keeps its own atomicity), else a file of the same name
  in a temporary directory, uploaded as one object when the block exits without an exception
  (nothing is written to ``path`` otherwise)."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  scratch = tempfile.mkdtemp(prefix='mobilevis-')
  try:
    local = os.path.join(scratch, resolve(path).name)
    yield local
    with open(local, 'rb') as f:
      resolve(path).write_bytes(f.read())
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


class AppendFile:
  """A text file that only grows (a log), on any filesystem.

  Locally the file is opened for appending and each `write` reaches the file at once (line
  buffered for text, flushed per call for bytes). On an object store, which cannot append, the
  object's current content is read once, writes accumulate in memory and the whole object is
  rewritten by `flush` when ``flush_secs`` have passed since the last upload, and always by
  `close`: a crash loses at most the last ``flush_secs`` of lines there.
  """

  def __init__(self, path: PathLike, *, binary: bool = False, flush_secs: float = 30.0) -> None:
    self.path = resolve(path)
    self.binary = binary
    self.flush_secs = float(flush_secs)
    self._remote = is_remote(self.path)
    self._closed = False
    if self._remote:
      self._buffer = bytearray(self.path.read_bytes() if self.path.exists() else b'')
      self._dirty = False
      self._last_upload = time.monotonic()
      self._file = None
    else:
      self._file = (open(os.fspath(self.path), 'ab') if binary
                    else open(os.fspath(self.path), 'a', buffering=1, encoding='utf-8'))

  def write(self, data: str | bytes) -> None:
    if self._closed:
      raise ValueError(f'{self.path} is closed')
    if self._file is not None:
      self._file.write(data)
      if self.binary:
        self._file.flush()
      return
    self._buffer += data if self.binary else data.encode('utf-8')
    self._dirty = True
    self.flush(force=False)

  def flush(self, force: bool = True) -> None:
    """Makes the writes so far visible in the file (remote: if ``force`` or due)."""
    if self._file is not None:
      self._file.flush()
      return
    if self._dirty and (force or time.monotonic() - self._last_upload >= self.flush_secs):
      self.path.write_bytes(bytes(self._buffer))
      self._dirty = False
      self._last_upload = time.monotonic()

  def close(self) -> None:
    if self._closed:
      return
    if self._file is not None:
      self._file.close()
    else:
      self.flush(force=True)
    self._closed = True
