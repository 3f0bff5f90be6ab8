"""KFP component ``prepare``: raw annotations + images -> prepared splits (``imtext prepare``)."""

from kfp import dsl
from kfp.dsl import Dataset, Metrics, Output

from components.image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prepare(
    data: str,
    data_digest: str,
    annotations: str,
    images: str,
    data_format: str,
    skip_bad: bool,
    params: str,
    overrides: list,
    prepared: Output[Dataset],
    metrics: Output[Metrics],
):
    """Fetch the raw data and run the prepare stage on it.

    Args:
        data: Raw data location: a local directory or s3://bucket/prefix (fetched with boto3;
            endpoint and credentials from the environment).
        data_digest: The digest step's digest of ``data``: part of this step's cache key, so
            that changed data is prepared again. Object storage is checked against it after
            the fetch (objects changed in between fail the step); it is recorded in the
            ``prepared`` artifact's metadata with the location.
        annotations: Annotation file, relative to the data location (e.g. dataset.json).
        images: Directory the image paths are relative to, relative to the data location.
        data_format: karpathy or cuhk-pedes.
        skip_bad: Skip unusable images and captions instead of failing.
        params: The text of params.yaml (one section per stage).
        overrides: section.key=value settings applied over params.
        prepared: Directory of prepared splits, vocabulary, meta.json and source.json (the
            data's URI and content digest, which the training steps log to MLflow).
        metrics: Split sizes and vocabulary size.
    """
    import tempfile
    from pathlib import Path

    from imtext.config import stage_config_from_params
    from imtext.data.digest import data_digest as digest_of
    from imtext.data.lineage import SOURCE_FILE, describe
    from imtext.data.prepare import prepare as prepare_stage
    from imtext.data.remote import fetch, is_s3
    from imtext.errors import DataError
    from imtext.pipeline_steps import step_params, write_kfp_metrics

    cfg = stage_config_from_params("prepare", step_params(params, overrides))
    with tempfile.TemporaryDirectory(prefix="imtext-raw-") as scratch:
        raw = fetch(data, Path(scratch), log=print)
        # A listing is cheap; rehashing a local directory would read it all again.
        if is_s3(data) and digest_of(data) != data_digest:
            raise DataError(
                f"{data}: the objects changed while this run fetched them (digest "
                f"{data_digest} before); run the pipeline again"
            )
        result = prepare_stage(
            cfg,
            raw / annotations,
            raw / images,
            Path(prepared.path),
            fmt=data_format,
            skip_bad=skip_bad,
            log=print,
        )
    source = describe(data)
    print(f"data {source.uri}: {source.files} files, listing md5 {source.digest}")
    (Path(prepared.path) / SOURCE_FILE).write_text(source.to_json(), encoding="utf-8")
    prepared.metadata.update({"data_uri": data, "data_digest": data_digest})
    write_kfp_metrics(metrics, result)
