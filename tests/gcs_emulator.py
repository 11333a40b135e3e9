"""An offline Google Cloud Storage for tests: `gcp-storage-emulator` (in memory, on a local port)
with the two parts of the protocol that TensorStore relies on and the emulator leaves out.

TensorStore (which writes orbax's checkpoint arrays) reads an object's generation from the
``x-goog-generation`` header of a download, and makes its writes conditional
(``ifGenerationMatch``, 0 meaning "only if absent") and its cached reads revalidating
(``ifGenerationNotMatch`` answered by 304). The emulator sends no such header and ignores the
preconditions; `start` adds both to its object handlers, so what the tests exercise is the
protocol the real service speaks. The version is pinned in the ``test`` extra, because this
wraps the emulator's handler functions.
"""

from __future__ import annotations

import logging
import socket
from http import HTTPStatus


def _wrap_handlers():
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  if getattr(objects, '_mobilevis_wrapped', False):
    return
  original = {name: getattr(objects, name) for name in ('get', 'download', 'insert', 'delete')}

  def current_generation(storage, bucket, name):
    try:
      return int(storage.get_file_obj(bucket, name)['generation'])
    except Exception:  # noqa: BLE001 -- the emulator's NotFound: no object, generation 0
      return 0

  def query_int(request, key):
    values = request.query.get(key)
    return int(values[0]) if values else None

  def precondition_failed(request, response, generation):
    match = query_int(request, 'ifGenerationMatch')
    if match is not None and match != generation:
      response.status = HTTPStatus.PRECONDITION_FAILED
      return True
    return False

  def download(request, response, storage, *args, **kwargs):
    bucket, name = request.params['bucket_name'], request.params['object_id']
    generation = current_generation(storage, bucket, name)
    if generation and precondition_failed(request, response, generation):
      return
    not_match = query_int(request, 'ifGenerationNotMatch')
    if generation and not_match is not None and not_match == generation:
      response['x-goog-generation'] = str(generation)
      response.status = HTTPStatus.NOT_MODIFIED
      return
    if generation:
      response['x-goog-generation'] = str(generation)
    return original['download'](request, response, storage, *args, **kwargs)

  def get(request, response, storage, *args, **kwargs):
    if request.query.get('alt') and request.query.get('alt')[0] == 'media':
      return download(request, response, storage)
    return original['get'](request, response, storage, *args, **kwargs)

  def insert(request, response, storage, *args, **kwargs):
    names = request.query.get('name')
    if names:
      generation = current_generation(storage, request.params['bucket_name'], names[0])
      if precondition_failed(request, response, generation):
        return
    return original['insert'](request, response, storage, *args, **kwargs)

  def delete(request, response, storage, *args, **kwargs):
    generation = current_generation(storage, request.params['bucket_name'],
                                    request.params['object_id'])
    if precondition_failed(request, response, generation):
      return
    return original['delete'](request, response, storage, *args, **kwargs)

  replacement = {original[k]: v for k, v in
                 (('get', get), ('download', download), ('insert', insert), ('delete', delete))}
  for _, methods in server.HANDLERS:
    for method, fn in list(methods.items()):
      if fn in replacement:
        methods[method] = replacement[fn]
  objects.download = download  # `get` of the JSON API calls it by name
  objects._mobilevis_wrapped = True


def start(bucket: str):
  """Starts an in-memory emulator holding ``bucket``; returns (endpoint URL, stop function)."""
  from gcp_storage_emulator.server import create_server

  _wrap_handlers()
  # It logs every 404 (the normal answer to an existence check) as an error.
  logging.getLogger('gcp_storage_emulator').setLevel(logging.CRITICAL)
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  server = create_server('localhost', port, in_memory=True, default_bucket=bucket)
  server.start()
  return f'http://localhost:{port}', server.stop
