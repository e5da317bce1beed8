"""Deleting old files: the partial-upload sweep and the batch results' clean-up share `remove_older_than`."""

from __future__ import annotations

import os
import time

from cxr_app.retention import remove_older_than, sweep_partial_uploads


def make(folder, name: str, age: float, now: float, is_dir: bool = False):
    path = folder / name
    if is_dir:
        path.mkdir()
        (path / "inside.csv").write_text("x")
    else:
        path.write_text("x")
    os.utime(path, (now - age, now - age))
    return path


def test_old_entries_go_young_ones_stay(tmp_path):
    now = time.time()
    old_file, old_folder = make(tmp_path, "a.csv", 120, now), make(tmp_path, "b", 120, now, is_dir=True)
    young = make(tmp_path, "c.csv", 10, now)
    assert sorted(remove_older_than(tmp_path, 60, now=now)) == sorted([old_file, old_folder])
    assert [path.name for path in tmp_path.iterdir()] == [young.name]
    assert remove_older_than(tmp_path / "missing", 60, now=now) == []


def test_the_upload_sweep_takes_only_old_tmp_files(tmp_path):
    now = time.time()
    partial = make(tmp_path, "tmpabc", 120, now)
    kept = [make(tmp_path, "tmpyoung", 10, now), make(tmp_path, "tmpfolder", 120, now, is_dir=True),
            make(tmp_path, "finished.dcm", 120, now)]
    link = tmp_path / "tmplink"
    link.symlink_to(kept[2])
    os.utime(link, (now - 120, now - 120), follow_symlinks=False)
    assert sweep_partial_uploads(tmp_path, 60, now=now) == [partial]
    assert all(path.exists() for path in kept) and link.is_symlink()
