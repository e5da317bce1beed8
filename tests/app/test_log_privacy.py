"""No file names in the logs (cxr_app/log_privacy.py): an upload named like a patient forces an unexpected error in
a real server, and the log shows the traceback with the path replaced by a short hash."""

from __future__ import annotations

import io
import logging
import shutil

import pytest

from cxr_app.log_privacy import RedactUploadPaths, redact, tag

PATIENT_FILE = "Doe_Jane_19700101_chest.png"


def test_redact_replaces_upload_paths_and_keeps_source_paths(tmp_path):
    upload = f"{tmp_path}/gradio/3f2a/{PATIENT_FILE}"
    text = f'File "/srv/app/cxr_app/service.py", line 3, in classify\nOSError: cannot read {upload}: broken'
    cleaned = redact(text)
    assert PATIENT_FILE not in cleaned and "Doe_Jane" not in cleaned
    assert tag(upload) in cleaned and "/srv/app/cxr_app/service.py" in cleaned
    assert redact(f"'/home/me/scans/{PATIENT_FILE}'") == f"'{tag(f'/home/me/scans/{PATIENT_FILE}')}'"
    assert tag(upload) == tag(upload) != tag(upload + "x")  # one upload, one tag


def test_filter_renders_args_and_traceback():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactUploadPaths())
    logger = logging.getLogger("test_log_privacy")
    logger.addHandler(handler)
    try:
        try:
            raise OSError(f"cannot open /tmp/x/{PATIENT_FILE}")
        except OSError:
            logger.exception("failed on %s", f"/tmp/x/{PATIENT_FILE}")
    finally:
        logger.removeHandler(handler)
    logged = stream.getvalue()
    assert "Doe_Jane" not in logged and "Traceback" in logged
    assert logged.count(tag(f"/tmp/x/{PATIENT_FILE}")) == 2  # the message and the exception's text


@pytest.mark.slow
def test_unexpected_error_logs_no_patient_name(tmp_path, make_checkpoint, example_xrays, free_port):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from cxr_app import demo as demo_module
    from cxr_app.gradio_compat import attached

    make_checkpoint(tmp_path / "checkpoint")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    demo = demo_module.build_demo(str(tmp_path / "checkpoint"), home=tmp_path)
    service = attached(demo).app

    def broken(file, *args, **kwargs):
        raise RuntimeError(f"simulated failure while reading {file}")

    service.classify = broken  # an unexpected error, with the upload's path in its message
    port = free_port()
    demo_module.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    try:
        upload = tmp_path / PATIENT_FILE
        shutil.copyfile(example_xrays["normal"][0], upload)
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        with pytest.raises(AppError, match="Unexpected error"):
            client.predict(handle_file(str(upload)), api_name="/predict")
    finally:
        demo.close()
        root.removeHandler(handler)
    logged = stream.getvalue()
    assert "unexpected error while reading the image and predicting" in logged
    assert "simulated failure while reading <upload " in logged and "Traceback" in logged, logged[-2000:]
    assert "Doe_Jane" not in logged and PATIENT_FILE not in logged, logged[-2000:]
