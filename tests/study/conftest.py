"""Fixtures of the study tests."""

from __future__ import annotations

import pytest

from .study_batch import WarmLauncher


@pytest.fixture
def warm_launches(monkeypatch, tmp_path):
    """The experiments' launches of train_ddp.py (``run_config``) go to worker processes that
    stay up between configurations (one per rank; tests/study/study_batch.py): the same flags
    and the same main, without a process start per configuration."""
    from lossy_hooks.study.sweeping import launch

    warm = WarmLauncher(tmp_path / "warm")
    monkeypatch.setattr(launch, "launch_train", warm)
    yield warm
    warm.close()
