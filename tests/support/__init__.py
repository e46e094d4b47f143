"""Helpers the tests share, one job per module; pytest finds this package through pyproject's ``pythonpath``.

    worker_process   WorkerProcess: the real worker (``handler.py --rp_serve_api``) on 127.0.0.1, called over HTTP
    tiny_worker      tiny_worker_env: the env of a worker on the tiny pipelines (process and in-process alike)
    responses        what a runsync answer holds: completed_output, decode_data_uri, open_image
    file_server      a 127.0.0.1 HTTP server for image and LoRA downloads (file_server, Route, closed_port)
    images           fixture images made in code (photo_like, to_bytes)
    safety_checkers  safety checker folders that flag on purpose
    s3               a boto3 client for the local S3 server (s3_client)
    progress_receiver  ProgressReceiver: the job-output endpoint progress updates are posted to, on 127.0.0.1

The fixtures that use them (start_worker, make_worker, tiny_models, s3_server, progress_receiver) are in
tests/conftest.py.
"""
