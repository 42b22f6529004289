"""The two TLP paths carry the same TLPs: one workload (cosim.benches.paths) on the card behind
the TLP shim (whole TLPs) and on the bare card driven a beat at a time, every TLP compared, in
order, per function and direction. Icarus, whose builds take seconds."""

import json

import pytest

from cosim.card_sim import run_card_bench
from cosim.runner import one_sim_params


@pytest.mark.sim
@pytest.mark.parametrize("sim", one_sim_params("icarus"))
def test_same_tlps_on_both_paths(sim, tmp_path):
    logs = {}
    for path in ("tlp", "beat"):
        out = tmp_path / f"{path}.json"
        res = run_card_bench(sim, "cosim.benches.paths", path=path,
                             extra_env={"OFFCARD_TLP_LOG": str(out)})
        assert res.num_failed == 0 and res.testcases == ["test_record_every_tlp"]
        logs[path] = json.loads(out.read_text())
    for direction in ("to_card", "to_host"):
        new, old = (by_function(logs[p], direction) for p in ("tlp", "beat"))
        assert sum(map(len, new.values())) > 100, f"too few TLPs {direction}"
        assert new.keys() == old.keys(), f"{direction}: functions {sorted(new)} vs {sorted(old)}"
        for fn in new:
            a, b = new[fn], old[fn]
            first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
            assert first is None and len(a) == len(b), (
                f"{direction}, function {fn:04x}: the paths differ at TLP {first} of "
                f"{len(a)} / {len(b)}: {a[first] if first is not None else a[len(b):] or b[len(a):]}"
                f" vs {b[first] if first is not None else ''}")


#: TLP types (Fmt/Type byte with the Fmt bits cleared) whose tag is the card's choice
MEM_REQ, CPL = (0x00, 0x01), 0x0A


def by_function(log, direction):
    """The TLPs of one direction, per function of the card (the requester of what the card
    sends, the requester a completion to the card answers, 0xFFFF for the host's requests),
    with the tags the card picked zeroed: which free tag a read gets depends on when earlier
    completions came back, which the two paths time differently."""
    out = {}
    for d, hdr, payload in log:
        if d != direction:
            continue
        h = bytearray.fromhex(hdr)
        kind = h[0] & 0x1F
        if direction == "to_host":
            fn = int.from_bytes(h[4:6], "big")
            if kind in MEM_REQ:
                h[6] = 0
        elif kind == CPL:
            fn = int.from_bytes(h[8:10], "big")
            h[10] = 0
        else:
            fn = 0xFFFF
        out.setdefault(fn, []).append((h.hex(), payload))
    return out
