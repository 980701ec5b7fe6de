"""Multi-process plumbing that runs in one process: when to initialise, and host-local batch assembly."""

import jax
import numpy as np
import pytest

from moelora_jax.parallel.distributed import any_process, host_local_batch, initialize, on_cloud_tpu_vm, to_host
from moelora_jax.parallel.sharding import batch_sharding, make_mesh


def test_initialize_only_when_asked_or_detected(tmp_path):
    assert initialize("no", "127.0.0.1:1", 2, 0) is False
    assert initialize("auto") is False  # no coordinator; this machine is no TPU VM (else this test is moot)
    with pytest.raises(ValueError, match=r"mode='sometimes' must be one of"):
        initialize("sometimes")
    with pytest.raises(ValueError, match=r"needs num_processes >= 1 and 0 <= process_id"):
        initialize("auto", "127.0.0.1:1234", 2, 2)
    for name, vendor in (("0000:00:04.0", "0x1af4"), ("0000:00:05.0", "0x8086")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "vendor").write_text(vendor + "\n")
    assert not on_cloud_tpu_vm(tmp_path)
    (tmp_path / "0000:00:06.0").mkdir()
    (tmp_path / "0000:00:06.0" / "vendor").write_text("0x1ae0\n")  # Google's PCI vendor id: a TPU chip
    assert on_cloud_tpu_vm(tmp_path)


def test_host_local_batch_collates_each_row_once_and_places_it_on_its_devices():
    mesh = make_mesh(4, 2, 1, devices=jax.devices("cpu")[:8])
    tokens = np.arange(2 * 8 * 3).reshape(2, 8, 3)
    asked = []

    def rows(positions):
        asked.append(list(positions))
        flat = tokens.reshape(16, 3)
        return {"tokens": flat[positions], "mask": flat[positions] % 2 == 0}

    batch = host_local_batch(rows, (2, 8), batch_sharding(mesh, leading=1))
    assert asked == [list(range(16))]  # one process holds every row
    np.testing.assert_array_equal(to_host(batch)["tokens"], tokens)
    assert batch["mask"].dtype == bool and batch["tokens"].sharding.spec == batch_sharding(mesh, leading=1).spec
    assert len(batch["tokens"].addressable_shards) == 8 and batch["tokens"].addressable_shards[0].data.shape == (
        2,
        1,
        3,
    )
    assert any_process(True) and not any_process(False)
