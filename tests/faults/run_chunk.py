"""Run one chunk in its own process, like a worker would: ``run_chunk.py SPEC_JSON CHUNK_JSON``.

Prints the ChunkResult as JSON on success; on failure the error class and message, exit code 1.
Used by the fault suite to SIGKILL a worker mid-COPY and to run the same chunk twice at once.
"""

import json
import os
import sys

from airflow_backfill_provider.core.chunks import Chunk
from airflow_backfill_provider.core.spec import load_spec
from airflow_backfill_provider.transfer.chunk import RunInfo, transfer_chunk


def main() -> int:
    spec = load_spec(json.loads(sys.argv[1]))
    chunk = Chunk.from_descriptor(json.loads(sys.argv[2]))
    try:
        result = transfer_chunk(spec, chunk, run=RunInfo(run_id=f"pid-{os.getpid()}"))
    except Exception as err:  # noqa: BLE001 - reported to the test as data
        print(json.dumps({"error": type(err).__name__, "message": str(err)}))
        return 1
    print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
