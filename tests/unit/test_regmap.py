"""The register map (``regmap/``): the windows do not overlap, the records pack and unpack,
and the host driver and firmware can use it without Amaranth."""

import subprocess
import sys
import pytest
from regmap import windows as W, records as R, Bar0Map, MgmtRegs


def test_windows_do_not_overlap_and_fit_their_bars():
    W.check(bar_sizes={0: Bar0Map.SIZE, 2: MgmtRegs.SIZE})


@pytest.mark.parametrize("bad, why", [
    ((W.Window("a", 0, 0x100, 0x110, "x", "all"), W.Window("b", 0, 0x10C, 0x120, "y", "all")),
     "overlap"),
    ((W.Window("a", 0, 0x100, 0x110, "x", "all"), W.Window("a", 2, 0x100, 0x110, "x", "pf")),
     "twice"),
    ((W.Window("a", 0, 0x100, 0x100, "x", "all"),), "empty"),
    ((W.Window("a", 0, 0x102, 0x110, "x", "all"),), "aligned"),
    ((W.Window("a", 2, 0xFF0, 0x1010, "x", "pf"),), "past BAR2"),
    ((W.Window("a", 0, 0x100, 0x110, "x", "vf"),), "functions"),
])
def test_check_names_the_problem(bad, why):
    with pytest.raises(ValueError, match=why):
        W.check(bad, bar_sizes={0: 0x4000, 2: 0x1000})


def test_windows_of_different_bars_may_share_offsets():
    W.check((W.Window("a", 0, 0x100, 0x110, "x", "all"), W.Window("b", 2, 0x100, 0x110, "y", "pf")))


def test_every_register_file_target_is_named_once_per_window():
    targets = {w.target for w in W.WINDOWS}
    assert targets == {"funcregs", "dma_q", "virtio", "msix", "mgmt", "xlate", "fault", "vnet",
                       "mboard", "telemetry", "qos", "dirtylog"}
    assert all(w.functions == ("all" if w.bar == 0 else "pf") for w in W.WINDOWS)


def test_descriptor_packs_like_the_documented_layout():
    raw = R.DESCRIPTOR.pack(host=0x1122_3344_5566_7788, card=0x1234, length=0x100, to_host=1,
                            irq=1, status=R.DescStatus.DONE)
    assert raw.hex() == ("8877665544332211" "34120000" "00010000" "03000000" "01000000"
                         + "00" * 8)
    assert R.DESCRIPTOR.unpack(raw)["to_host"] == 1
    assert R.DESCRIPTOR.byte_offset("status") == 0x14


@pytest.mark.parametrize("rec", R.RECORDS, ids=lambda r: r.name)
def test_records_round_trip(rec):
    import random
    rnd = random.Random(rec.name)
    for _ in range(50):
        values = {f.name: rnd.getrandbits(f.width) for f in rec.fields}
        raw = rec.pack(**values)
        assert len(raw) == rec.size
        assert rec.unpack(raw + b"\xff") == values


def test_record_errors_name_the_field():
    with pytest.raises(ValueError, match="no field 'bogus'"):
        R.CQ_ENTRY.pack(bogus=1)
    with pytest.raises(ValueError, match="function=0x100 does not fit 8 bits"):
        R.CQ_ENTRY.pack(function=0x100)
    with pytest.raises(ValueError, match="needs 16"):
        R.CQ_ENTRY.unpack(b"\0" * 8)
    with pytest.raises(ValueError, match="overlaps"):
        R.Record("r", 4, [R.u("a", 0, 16), R.u("b", 1, 8)])
    with pytest.raises(ValueError, match="outside"):
        R.Record("r", 4, [R.u("a", 2, 32)])
    with pytest.raises(ValueError, match="not byte aligned"):
        R.DESCRIPTOR.byte_offset("irq")


def test_host_driver_and_firmware_do_not_import_amaranth():
    code = ("import sys, regmap, firmware.__main__, firmware.daemon, host_driver.offcard, "
            "host_driver.dma, host_driver.iommu, host_driver.virtio, host_driver.vf_state, "
            "host_driver.system.vf_save, host_driver.system.mgmt_host, host_driver.system.migration, host_driver.system.live; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'amaranth'); "
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
