"""host_driver.system.vf_save: the record format, the modified fast save and the fast restore, against a
fake card (the VfStateAccess contract, checked as it is used: :class:`fakes.FakeVfCard`) with the
guest sending throughout."""

import asyncio
import itertools
import struct
import zlib
import pytest
from fakes import CardError, FakeVfCard
from host_driver.offcard import VENDOR_ID
from host_driver.system.vf_save import (AssignedVm, FrameLedger, HostVf, RESTORE_STEPS,
                                        RECORD_MAGIC, RestoreError, RuntimeRepository, SAVE_STEPS,
                                        SKIP_STEPS, SaveError, SavedVf, VDEV_VERSION, VF_DEVICE_ID,
                                        VfAssignment, VfRef, VfSaveRestore, VmFlags, pack, unpack)
from hypothesis import given, settings, strategies as st

VF = VfRef(3, 0x0103)
LUID = 0x5EED_0000_0003


def fake_card(yields=2):
    """The card of these tests (:class:`fakes.FakeVfCard`): VF3 running, 10 000 bytes of state
    that count the frames the VF carried."""
    return FakeVfCard([VF.index], size=10_000, yields=yields, running=True)


def live_vm(card, ledger=None):
    ledger = ledger or FrameLedger()
    card.state[VF.index][FakeVfCard.FRAMES] = bytes(4)
    return AssignedVm.direct("vm1", VF, LUID, ledger, vf_port=card.port(VF))


class Guest:
    """The guest sending numbered frames, one per event-loop turn, until stopped."""

    def __init__(self, vm):
        self.vm, self.seq, self.stop = vm, itertools.count(), asyncio.Event()

    async def run(self):
        while not self.stop.is_set():
            self.vm.send(next(self.seq))
            await asyncio.sleep(0)

    async def ticks(self, n):
        for _ in range(n):
            await asyncio.sleep(0)


def vm_view(vm):
    return (vm.assignment, vm.vpci_connected, vm.bus_interface)


# ---- save then restore under traffic ------------------------------------------------------

def test_save_restore_keeps_guest_running_state_identical_and_takes_skip_path():
    async def main():
        card, repo = fake_card(), RuntimeRepository()
        vm = live_vm(card)
        card.observe = lambda: vm_view(vm)
        sr = VfSaveRestore(card, repo)
        g = Guest(vm)
        task = asyncio.create_task(g.run())
        await g.ticks(20)
        before_save = card.frames(VF)
        assert before_save > 0

        assert await sr.save(vm) == list(SAVE_STEPS)
        assert vm_view(vm) == (VfAssignment.ASSIGNED, True, True) and vm.vf is VF
        assert card.calls == [("quiesce", 3), ("export_state", 3)]
        saved = unpack(repo.get("vm1/vf"))
        assert saved.state == card.exported[0] and len(saved.state) == 10_000
        assert (saved.vf_index, saved.rid, saved.luid) == (3, 0x0103, LUID)
        await g.ticks(20)                        # the guest goes on: the synthetic adapter holds
        held = len(vm.synthetic.ring)
        assert held >= 20 and card.frames(VF) == before_save
        card.wipe(VF)

        assert await sr.restore(vm) == list(SKIP_STEPS)
        assert card.calls[2:] == [("import_state", 3), ("resume", 3)]
        assert card.at_resume == [saved.state], "the VF resumed with a state not byte-identical"
        assert vm.synthetic.ring == [] and vm.on_vf and vm.offload_weight == 100
        await g.ticks(20)
        g.stop.set()
        await task

        led = vm.ledger
        assert led.lost == [] and led.duplicated == [] and led.dropped == []
        assert len(led.sent) == len(led.deliveries) > 60
        # the saved counter survived the wipe: the VF carried every frame that took the VF path
        assert card.frames(VF) == sum(d.hops == ("vf",) for d in led.deliveries)
        paths = [d.hops for d in led.deliveries]
        assert paths.count(("synthetic",)) >= held
        last_vf_before = max(i for i, p in enumerate(paths) if p == ("vf",) and i < len(paths) // 2)
        assert paths[-1] == ("vf",) and ("synthetic",) in paths[last_vf_before:]
        # the VF never left the assigned state, the VPCI bus stayed up
        assert vm.assignment_log == [VfAssignment.ASSIGNED]
        assert set(card.seen) == {(VfAssignment.ASSIGNED, True, True)}

        # a second restore of the still-assigned VF skips again and re-imports the same bytes
        n = len(card.calls)
        vm.flags, vm.offload_weight = VmFlags.NONE, 0
        await card.quiesce(VF)
        vm.vf_running = False
        assert await sr.restore(vm) == list(SKIP_STEPS)
        assert card.calls[n + 1:] == [("import_state", 3), ("resume", 3)]
        assert card.at_resume[-1] == saved.state
        assert sr.steps == list(SAVE_STEPS) + 2 * list(SKIP_STEPS)
    asyncio.run(main())


def test_restore_into_new_vm_follows_design_order_then_second_restore_skips():
    """The VM's runtime came back without its VF (bus interface, assignment gone): the restore
    creates, allocates and assigns by ID + LUID before touching the card; a second restore of
    the now assigned VF skips all three."""
    async def main():
        card, repo = fake_card(), RuntimeRepository()
        old = live_vm(card)
        await VfSaveRestore(card, repo).save(old)
        exported = card.exported[-1]

        fresh = AssignedVm("vm1", FrameLedger())
        card.observe = lambda: (vm_view(fresh), fresh.vf, fresh.luid)
        sr = VfSaveRestore(card, repo, {3: HostVf(VF, LUID), 4: HostVf(VfRef(4, 0x104), 9)})
        n = len(card.calls)
        assert await sr.restore(fresh) == list(RESTORE_STEPS)
        assert card.calls[n:] == [("import_state", 3), ("resume", 3)]
        # by the time the card is touched the VF is assigned by ID + LUID and connected
        assert card.seen[-2] == ((VfAssignment.ASSIGNED, True, True), VF, LUID)
        assert fresh.assignment_log == [VfAssignment.NONE, VfAssignment.ALLOCATED,
                                        VfAssignment.ASSIGNED]
        assert card.at_resume[-1] == exported
        assert fresh.on_vf and fresh.offload_weight > 0 and fresh.vf_running

        n = len(card.calls)
        assert await sr.restore(fresh) == list(SKIP_STEPS)
        assert card.calls[n:] == [("import_state", 3), ("resume", 3)]
        assert fresh.assignment_log[-1] == VfAssignment.ASSIGNED and len(fresh.assignment_log) == 3
    asyncio.run(main())


def test_save_order_is_what_keeps_frames():
    """The guest's frames go to the synthetic adapter before the quiesce starts: none meets
    the stopped VF even when the guest sends between every card call."""
    async def main():
        card = fake_card(yields=5)
        vm = live_vm(card)
        sr = VfSaveRestore(card, RuntimeRepository())
        g = Guest(vm)
        task = asyncio.create_task(g.run())
        await g.ticks(3)
        await sr.save(vm)
        await g.ticks(3)
        await sr.restore(vm)
        await g.ticks(3)
        g.stop.set()
        await task
        assert vm.ledger.dropped == [] and vm.ledger.lost == []
    asyncio.run(main())


def test_model_drops_frames_that_meet_a_stopped_vf():
    """The check above can fail: quiesce without switching and the guest's frames are lost."""
    async def main():
        card = fake_card()
        vm = live_vm(card)
        vm.vf_running = False
        await card.quiesce(VF)
        vm.send(0)
        assert vm.ledger.lost == [0] and vm.ledger.dropped == [(0, "stopped VF")]
    asyncio.run(main())


def test_failed_export_puts_the_vf_back_on_the_datapath():
    async def main():
        card, repo = fake_card(), RuntimeRepository()
        vm = live_vm(card)
        card.fail = "export_state"
        sr = VfSaveRestore(card, repo)
        with pytest.raises(CardError):
            await sr.save(vm)
        assert card.calls == [("quiesce", 3), ("export_state", 3), ("resume", 3)]
        assert vm.on_vf and vm.vf_running and repo.names() == []
        vm.send(1)
        assert vm.ledger.deliveries[-1].hops == ("vf",)
    asyncio.run(main())


def test_save_needs_an_assigned_connected_vf():
    async def main():
        vm = AssignedVm("vm9", FrameLedger())
        with pytest.raises(SaveError, match="no assigned, connected VF"):
            await VfSaveRestore(fake_card(), RuntimeRepository()).save(vm)
    asyncio.run(main())


# ---- refused restores leave the card untouched ----------------------------------------------

def _blk(kind, payload, crc=None, reserved=0):
    return struct.pack("<HHII", kind, reserved, len(payload),
                       zlib.crc32(payload) if crc is None else crc) + payload


def _record(version=VDEV_VERSION, count=None, info=True, chunks=(b"\x11" * 40,),
            magic=RECORD_MAGIC):
    """A record built from the documented format, independently of ``pack``."""
    body = []
    if info:
        body.append(_blk(2, struct.pack("<HHHHQ", 3, 0x0103, VENDOR_ID, VF_DEVICE_ID, LUID)))
    body += [_blk(3, struct.pack("<H", n) + c) for n, c in enumerate(chunks)]
    head = _blk(1, struct.pack("<4sII", magic, version, 1 + len(body) if count is None else count))
    return head + b"".join(body)


def test_independent_encoding_matches_pack():
    assert _record() == pack(SavedVf(3, 0x0103, LUID, b"\x11" * 40))
    rec = pack(SavedVf(3, 0x0103, LUID, bytes(range(256)) * 40), chunk=4096)
    assert struct.unpack_from("<4sII", rec, 12) == (RECORD_MAGIC, VDEV_VERSION, 5)


def _flip(rec, at):
    return rec[:at] + bytes([rec[at] ^ 0x40]) + rec[at + 1:]


BAD = {
    "wrong VDEV version": (_record(version=2),
                           r"^VDEV version 2 in the record, this host restores 1$"),
    "block count high": (_record(count=4),
                         r"^block count mismatch: header says 4, record holds 3$"),
    "block count low": (_record(count=2),
                        r"^block count mismatch: header says 2, record holds 3$"),
    "missing VF-info": (_record(info=False), r"^missing VF-info block$"),
    "no state": (_record(chunks=()), r"^missing device-state block$"),
    "bad CRC": (_flip(_record(), len(_record()) - 1), r"^bad CRC in block 2 \(type 3\)"),
    "truncated payload": (_record()[:-5], r"^truncated record: block 2 \(type 3\) needs 42"),
    "truncated header": (_record()[:57],
                         r"^truncated record: block 2 header at byte 52 is cut \(5 of 12"),
    "empty": (b"", r"^truncated record: empty$"),
    "bad magic": (_record(magic=b"XXXX"), r"^not a VF record: magic"),
    "chunks out of order": (_record(chunks=(b"a", b"b"))[:-15]
                            + _blk(3, struct.pack("<H", 5) + b"b"),
                            r"^device-state chunk 5 where chunk 1 belongs$"),
    "reserved set": (_record()[:24] + _blk(2, _record()[36:52], reserved=1) + _record()[52:],
                     r"^reserved field of block 1 is 1, expected 0$"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_is_refused_before_the_card_is_touched(case):
    data, msg = BAD[case]

    async def main():
        card, repo = fake_card(), RuntimeRepository()
        vm = live_vm(card)
        sr = VfSaveRestore(card, repo)
        await sr.save(vm)
        repo.put("vm1/vf", data)
        calls, state = list(card.calls), {k: bytes(v) for k, v in card.state.items()}
        view = (vm_view(vm), vm.flags, vm.offload_weight, vm.vf_running, vm.synthetic.saved)
        with pytest.raises(RestoreError, match=msg) as ei:
            await sr.restore(vm)
        assert "\n" not in str(ei.value)
        assert card.calls == calls and {k: bytes(v) for k, v in card.state.items()} == state
        assert (vm_view(vm), vm.flags, vm.offload_weight, vm.vf_running, vm.synthetic.saved) == view
        assert sr.steps[-1] == "power_on_restore_reads"
    asyncio.run(main())


@pytest.mark.parametrize("case", ["other LUID", "unknown VF", "VM holds another VF", "no synthetic",
                                  "other device"])
def test_record_that_does_not_fit_the_vm_is_refused_untouched(case):
    async def main():
        card, repo = fake_card(), RuntimeRepository()
        await VfSaveRestore(card, repo).save(live_vm(card))
        fresh = AssignedVm("vm1", FrameLedger())
        host = {3: HostVf(VF, LUID)}
        kw = {}
        if case == "other LUID":
            host, msg = {3: HostVf(VF, LUID + 1)}, "VF3 has LUID"
        elif case == "unknown VF":
            host, msg = {}, "no VF3 on this host"
        elif case == "VM holds another VF":
            fresh = AssignedVm.direct("vm1", VfRef(4, 0x104), 77, FrameLedger())
            msg = "vm1 holds VF4 LUID 0x4d"
        elif case == "no synthetic":
            repo.remove("vm1/synthetic")
            msg = "no record 'vm1/synthetic'"
        else:
            kw, msg = {"device_id": 0x1000}, "record is for a 1af4:1041 VF"
        sr = VfSaveRestore(card, repo, host, **kw)
        n = len(card.calls)
        before = (vm_view(fresh), list(fresh.assignment_log))
        with pytest.raises(RestoreError, match=msg):
            await sr.restore(fresh)
        assert len(card.calls) == n and (vm_view(fresh), fresh.assignment_log) == before
    asyncio.run(main())


# ---- the format, generally -------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(state=st.binary(max_size=3000), chunk=st.integers(1, 1024),
       idx=st.integers(1, 0xFFFF), rid=st.integers(0, 0xFFFF), luid=st.integers(0, 2**64 - 1))
def test_pack_unpack_round_trip(state, chunk, idx, rid, luid):
    saved = SavedVf(idx, rid, luid, state)
    rec = pack(saved, chunk)
    assert unpack(rec) == saved
    blocks = 2 + max(1, -(-len(state) // chunk))
    assert struct.unpack_from("<4sII", rec, 12)[2] == blocks


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_corrupted_byte_or_cut_is_refused(data):
    rec = pack(SavedVf(3, 0x0103, LUID, bytes(range(200))), chunk=64)
    if data.draw(st.booleans()):
        at = data.draw(st.integers(0, len(rec) - 1))
        bad = rec[:at] + bytes([rec[at] ^ data.draw(st.integers(1, 255))]) + rec[at + 1:]
    else:
        bad = rec[:data.draw(st.integers(0, len(rec) - 1))]
    with pytest.raises(RestoreError):
        unpack(bad)


def test_repository_records():
    repo = RuntimeRepository()
    repo.put("a/vf", b"x")
    assert "a/vf" in repo and repo.get("a/vf") == b"x" and repo.names() == ["a/vf"]
    repo.remove("a/vf")
    with pytest.raises(RestoreError, match="no record 'a/vf'"):
        repo.get("a/vf")
