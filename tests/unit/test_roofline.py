"""The machine's peak MAC rates: measured through the runtime layer, cached per CPU, libraries and
thread count in the user's cache folder, and never taken from another machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from edgemml import roofline

SMALL = 128  # a small product: these tests check the mechanism, not the figures


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(roofline.CACHE_ENV, str(folder))
    return folder


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(roofline.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert roofline.cache_dir() == tmp_path / "xdg" / "edgemml"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert roofline.cache_dir() == tmp_path / "home" / ".cache" / "edgemml"
    monkeypatch.setenv(roofline.CACHE_ENV, str(tmp_path / "mine"))
    assert roofline.cache_dir() == tmp_path / "mine"


def test_key_names_cpu_features_libraries_and_threads():
    key = roofline.machine_key(2)
    assert key["threads"] == 2 and key["cpu"] and set(key["versions"]) == {
        "onnxruntime", "openvino", "torch"}
    assert isinstance(key["cpu_flags"], list)
    assert roofline.key_digest(key) != roofline.key_digest(roofline.machine_key(1))
    other_cpu = dict(key, cpu="Some Other CPU")
    assert roofline.key_digest(other_cpu) != roofline.key_digest(key)


def test_measured_once_then_read_from_the_cache(cache, monkeypatch):
    roof = roofline.cached(1, size=SMALL, repeats=3)
    assert roof.path == roofline.cache_path(1) and roof.path.parent == cache
    kinds = {(r.runtime, r.precision) for r in roof.rows}
    assert {("onnxruntime", "f32"), ("onnxruntime", "int8"), ("openvino", "f32"),
            ("openvino", "int8"), ("torch", "f32")} <= kinds
    assert all(r.gmacs_per_s > 0 and r.min_ms <= r.median_ms for r in roof.rows)
    # the product is computed by both the MatMul and the convolution kernels of every runtime
    for runtime, precision in kinds:
        assert {r.kernel for r in roof.rows if (r.runtime, r.precision) == (runtime, precision)
                } == {"matmul", "conv1x1"}
    assert roof.peak("onnxruntime", "int8") == max(
        r.gmacs_per_s for r in roof.rows if r.runtime == "onnxruntime" and r.precision == "int8")
    doc = json.loads(roof.path.read_text())
    assert doc["key"] == roofline.machine_key(1) and doc["size"] == SMALL

    def no_measuring(*a, **k):
        raise AssertionError("measured again although the cache matches")

    monkeypatch.setattr(roofline, "measure", no_measuring)
    again = roofline.cached(1, size=SMALL)
    assert [r.gmacs_per_s for r in again.rows] == [r.gmacs_per_s for r in roof.rows]


def test_a_roofline_from_another_cpu_is_refused(cache, tmp_path):
    roof = roofline.cached(1, size=SMALL, repeats=3)
    doc = json.loads(roof.path.read_text())
    doc["key"]["cpu"] = "Intel(R) Xeon(R) Imaginary 9999"
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps(doc))
    with pytest.raises(roofline.RooflineMismatch, match="Imaginary 9999"):
        roofline.load(foreign, threads=1)
    # another thread count is refused as well: a peak at 1 thread is not the peak at 2
    with pytest.raises(roofline.RooflineMismatch, match="threads"):
        roofline.load(roof.path, threads=2)
    # a cache file whose content is another machine's (a copied home folder): measured again
    roof.path.write_text(json.dumps(doc))
    warnings: list[str] = []
    fresh = roofline.cached(1, size=SMALL, repeats=3, warn=warnings.append)
    assert warnings and "measured elsewhere" in warnings[0]
    assert fresh.key["cpu"] != "Intel(R) Xeon(R) Imaginary 9999"
    assert json.loads(roof.path.read_text())["key"] == roofline.machine_key(1)


def test_unreadable_roofline_file_is_a_user_error(tmp_path):
    from edgemml.errors import InputError

    bad = tmp_path / "r.json"
    bad.write_text('{"peak_gmacs_per_s": {"int8": 900}}')  # the old benchmark format
    with pytest.raises(InputError, match="roofline"):
        roofline.load(bad, threads=1)
    # a file of an older edgemml (MatMul-only peaks) is not read as this version's
    old = {"schema": roofline.SCHEMA, "version": 2, "key": roofline.machine_key(1), "size": 128,
           "rows": [{"runtime": "onnxruntime", "dtype": "int8", "precision": "int8",
                     "min_ms": 1.0, "median_ms": 1.0, "gmacs_per_s": 2.0}]}
    bad.write_text(json.dumps(old))
    with pytest.raises(InputError, match="roofline version 2"):
        roofline.load(bad, threads=1)


def test_roofline_command(tmp_path):
    from conftest import cli_env

    env = cli_env({roofline.CACHE_ENV: str(tmp_path / "c")})
    out = tmp_path / "roof.json"
    proc = run_cli("roofline", "--threads", "1", "--size", "128", "--repeats", "3", "--out",
                   str(out), cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GMAC/s" in proc.stdout and "onnxruntime" in proc.stdout
    assert json.loads(out.read_text())["key"]["threads"] == 1
    assert list((tmp_path / "c").glob("roofline-*.json"))
    proc = run_cli("roofline", "--threads", "1", "--size", "128", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["size"] == 128
    proc = run_cli("roofline", "--threads", "1", "--size", "128", "--out", str(tmp_path),
                   cwd=tmp_path, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
