"""Where models and data sets come from: a URI made into a local path.

    from tandem.workloads.storage import materialize

    path = materialize("s3://models/minilm", cache_dir="/model-cache", what="--model-uri")

`file:///x` and plain paths are returned as they are. `s3://BUCKET/KEY` is downloaded (every object under
`KEY/`, or the single object `KEY`) into `cache_dir`, atomically: into a temporary directory first, then
renamed into place with a completion marker, so a half-finished download is never used and a later call
reuses the finished copy without asking S3 again (delete the cache directory to fetch a newer model).
boto3 is imported only for `s3://`.
"""

from tandem.workloads.storage.uris import (
    COMPLETE_MARKER,
    StorageError,
    default_cache_dir,
    materialize,
)

__all__ = ["COMPLETE_MARKER", "StorageError", "default_cache_dir", "materialize"]
