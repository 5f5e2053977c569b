"""Atomic writes (edm_opt.fileio): all or nothing under the final name, with the permissions of a plain open()."""

from __future__ import annotations

import json
import os
import stat

import pytest

from edm_opt.fileio import atomic_path, write_json


def test_write_json_round_trip_and_plain_permissions(tmp_path):
    path = write_json(tmp_path / "sub" / "a.json", {"x": [1, 2.5]})
    assert json.loads(path.read_text()) == {"x": [1, 2.5]}
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temporary file left


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    dest = write_json(tmp_path / "a.json", {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert json.loads(dest.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
