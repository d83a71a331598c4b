"""Run gcp-storage-emulator on loopback, with GCS's `ifGenerationMatch` precondition.

The emulator speaks the GCS JSON API but accepts and ignores upload preconditions. Real GCS
answers 412 Precondition Failed when an object's current generation differs from
`ifGenerationMatch` (0: the object must not exist yet). The model store relies on exactly
that to never overwrite a version, so the tests run the emulator with this one documented
rule checked before its own upload handler; everything else is the emulator's.

    python tests/gcs_emulator.py PORT BUCKET
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_emulator_insert = objects.insert


def _object_name(request) -> str | None:
    if "name" in request.query:
        return request.query["name"][0]
    if request.query.get("uploadType", [""])[0] == "multipart":
        return request.data["meta"].get("name")
    return None


def insert_with_preconditions(request, response, storage, *args, **kwargs):
    """objects.insert, answering 412 when ifGenerationMatch does not hold (the server is single-threaded)."""
    expected = request.query.get("ifGenerationMatch")
    name = _object_name(request)
    if expected and name is not None:
        try:
            current = str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except NotFound:
            current = "0"
        if current != expected[0]:
            response.status = HTTPStatus.PRECONDITION_FAILED
            response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold.",
                                     "errors": [{"reason": "conditionNotMet", "domain": "global"}]}})
            return None
    return _emulator_insert(request, response, storage, *args, **kwargs)


def main() -> None:
    port, bucket = int(sys.argv[1]), sys.argv[2]
    objects.insert = insert_with_preconditions
    server.HANDLERS = tuple(
        (pattern, {method: insert_with_preconditions if handler is _emulator_insert else handler
                   for method, handler in handlers.items()})
        for pattern, handlers in server.HANDLERS
    )
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.run()


if __name__ == "__main__":
    main()
