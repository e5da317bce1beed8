"""No file names in the logs: an upload's path carries its original name, often a patient's. Every record that
reaches the app's log handlers has such paths (in its message and in its traceback) replaced by `<upload HASH>`, a
short hash of the path: the same upload keeps the same tag across records, so a log can still be followed.

Paths of uploads: anything under the temporary folders (Gradio's cache, the batch folders) and any path ending in
an image, DICOM or archive suffix. Source paths of tracebacks (`.py`) stay.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile

_SUFFIXES = r"png|jpe?g|bmp|tiff?|webp|dcm|dicom|dic|zip|pdf|gif|csv|txt|heic|avif"
_PATH_CHARS = r"[^\s'\"<>|]"


def _patterns() -> list[re.Pattern[str]]:
    roots = {tempfile.gettempdir(), os.environ.get("GRADIO_TEMP_DIR") or ""}
    patterns = [re.compile(re.escape(root.rstrip("/")) + r"/" + _PATH_CHARS + "+") for root in roots if root]
    patterns.append(re.compile(rf"(?:/{_PATH_CHARS}+)+?\.(?:{_SUFFIXES})\b", re.IGNORECASE))
    return patterns


def tag(path: str) -> str:
    return f"<upload {hashlib.sha256(path.encode('utf-8', 'replace')).hexdigest()[:10]}>"


def _replace(match: re.Match[str]) -> str:
    found = match.group(0)
    path = found.rstrip(":;,.)]}")  # the sentence's punctuation stays outside the tag
    return tag(path) + found[len(path) :]


def redact(text: str) -> str:
    for pattern in _patterns():
        text = pattern.sub(_replace, text)
    return text


class RedactUploadPaths(logging.Filter):
    """A handler filter: the record's message and traceback are rendered, redacted and kept as text."""

    _formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = redact(record.getMessage()), None
        if record.exc_info:
            record.exc_text = redact(self._formatter.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install(logger: logging.Logger | None = None) -> int:
    """Add the filter to every handler of `logger` (default: the root logger) that lacks it; returns how many."""
    added = 0
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(existing, RedactUploadPaths) for existing in handler.filters):
            handler.addFilter(RedactUploadPaths())
            added += 1
    return added


__all__ = ["RedactUploadPaths", "install", "redact", "tag"]
