"""Small filesystems for the fault tests (tests/platform/faults.py)."""

import subprocess
from pathlib import Path

import pytest

from tests.platform.faults import mount


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 64 KB filesystem: room for the run's first files, not for its models."""
    mount(tmp_path / "disk", "size=64k")
    yield tmp_path / "disk"
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], check=False)


@pytest.fixture
def read_only_disk(tmp_path: Path):
    mount(tmp_path / "ro", "ro,size=64k")
    yield tmp_path / "ro"
    subprocess.run(["umount", "-l", str(tmp_path / "ro")], check=False)
