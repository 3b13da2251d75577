"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    from navit_clip.data.demo import ensure_demo_data

    return ensure_demo_data(tmp_path_factory.mktemp("demo_small"), n_train=300, n_heldout=48, per_shard=100)
