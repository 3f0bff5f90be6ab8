"""KFP component ``digest``: the content digest of the raw data, the input that keys ``prepare``."""

from kfp import dsl

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def digest(data: str) -> str:
    """The content digest of the raw data (``imtext.data.digest.data_digest``).

    Never cached: it runs first in every run, and ``prepare`` takes its value as an input, so
    KFP's cache key of ``prepare`` (and through its output, of every step after it) changes
    exactly when the data does, not when the location string does.

    Args:
        data: Raw data location: a local directory or s3://bucket/prefix (listed with boto3;
            endpoint and credentials from the environment).
    """
    from imtext.data.digest import data_digest

    value = data_digest(data)
    print(f"data {data}: digest {value}", flush=True)
    return value
