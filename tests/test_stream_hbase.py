"""The stream job with the HBase code store (Google's Bigtable emulator, a real wide-column
server): uploaded images get their PQ codes in HBase under salted row keys, none in
``dicom.codes``, including the images embedded before the first codebook existed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from _bigtable import BigtableEmulator, emulator_binary
from deltalake import DeltaTable

from dicomlake.catalog.sample import Profile, make_sample
from dicomlake.config import Settings

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(emulator_binary() is None, reason="Bigtable emulator not installed"),
]

FLINK_PYTHON = Path(__file__).resolve().parent.parent / ".venv-flink" / "bin" / "python"


def test_stream_writes_codes_to_hbase(tmp_path):
    from dicomlake.streaming import runner
    from dicomlake.streaming.producer import Uploader
    from dicomlake.streaming.settings import StreamSettings
    from dicomlake.udfs.hbase import HBaseCodeStore
    from dicomlake.udfs.settings import load_similarity

    archive = make_sample(tmp_path / "data", archives=1, files=24, seed=9,
                          profile=Profile.CTMR, workers=1)[0]
    with BigtableEmulator() as emulator:
        home = tmp_path / "home"
        home.mkdir()
        (home / "dicomlake.toml").write_text(
            f'[similarity]\ncode_store = "hbase"\n\n[similarity.hbase]\n'
            f'emulator = "{emulator.address}"\n')
        settings = Settings(home=home)
        store = HBaseCodeStore(load_similarity(settings).hbase)
        stream = StreamSettings(flink_python=str(FLINK_PYTHON), min_train=16,
                                checkpoint_interval_ms=1000)
        instances = settings.warehouse_path / "dicom" / "instances"
        try:
            runner.start(settings, stream)
            with Uploader(settings, stream) as up:
                assert all(r.ok for r in up.upload([archive]))
            deadline = time.monotonic() + 240
            uids: list[str] = []
            codes = store.load()
            while time.monotonic() < deadline:
                uids = DeltaTable(str(instances)).to_pyarrow_table(
                    columns=["sop_instance_uid"]).column(0).to_pylist()
                codes = store.load()
                if len(uids) == 24 and set(uids) <= set(codes.column(0).to_pylist()):
                    break
                time.sleep(1)
        finally:
            runner.stop(settings, stream)
    assert len(set(uids)) == 24, f"{len(set(uids))} of 24 uploads reached dicom.instances"
    coded = codes.column("sop_instance_uid").to_pylist()
    assert set(uids) <= set(coded), "uploaded images without a code in HBase"
    keys = list(zip(coded, codes.column("frame").to_pylist(), strict=True))
    assert len(keys) == len(set(keys))
    delta_codes = DeltaTable(str(settings.warehouse_path / "dicom" / "codes"))
    assert delta_codes.to_pyarrow_table().num_rows == 0, "codes also went to dicom.codes"
