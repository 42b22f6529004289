"""Random and malformed TLP cases for fuzzing, generated with hypothesis.

hypothesis is used as the generator (its strategies favour edge values: zero and maximum
lengths, all-zero and all-one byte enables, boundary addresses); each case is then replayed in
the simulator, where the checks run. A case is a dict; ``case_beats`` turns it into stream beats.
"""

import struct
import warnings

from hypothesis import given, settings, seed as hyp_seed, strategies as st, HealthCheck, Phase

from hdl.pcie.tlp import TlpKind

__all__ = ["generate_cases", "case_beats", "tlp_cases"]

KNOWN = [TlpKind.MRD32, TlpKind.MRD64, TlpKind.MWR32, TlpKind.MWR64, TlpKind.CFGRD0,
         TlpKind.CFGWR0, TlpKind.CFGRD1, TlpKind.CFGWR1, TlpKind.IORD, TlpKind.IOWR,
         TlpKind.MRDLK32, TlpKind.CPL, TlpKind.CPLD, TlpKind.FETCHADD32, TlpKind.SWAP64,
         TlpKind.CAS32, 0b001_10000, 0b011_10100]


@st.composite
def tlp_cases(draw):
    ft = draw(st.one_of(st.sampled_from(KNOWN), st.integers(0, 255)))
    fmt = ft >> 5
    has_data = bool(fmt & 0b010) and fmt != 0b100
    length = draw(st.one_of(st.integers(1, 4), st.integers(0, 1023)))
    len_dw = length or 1024
    if has_data:
        consistent = draw(st.booleans()) if len_dw <= 64 else False
        ndw = len_dw if consistent else draw(st.integers(0, 24))
    else:
        ndw = draw(st.sampled_from([0, 0, 0, 1, 2]))
    framing = draw(st.sampled_from(["ok"] * 18 + ["no_eop", "stray"]))
    return {
        "ft": ft,
        "length": length,
        "ndw": ndw,
        "tc_attr": draw(st.integers(0, 0xFF)),
        "ep": draw(st.sampled_from([0] * 15 + [1])),
        "first_be": draw(st.integers(0, 15)),
        "last_be": draw(st.sampled_from([0, 0xF, draw(st.integers(0, 15))])),
        "requester_id": draw(st.integers(0, 0xFFFF)),
        "completer_id": draw(st.one_of(st.integers(0, 0x20), st.integers(0, 0xFFFF))),
        "addr": draw(st.one_of(st.integers(0, 0xFFFF_FFFF), st.integers(0, (1 << 64) - 1))),
        "reg": draw(st.integers(0, 0x3FF)),
        "payload_seed": draw(st.integers(0, 2 ** 32 - 1)),
        "framing": framing,
    }


def generate_cases(n, seed=1, batch=100):
    """``n`` cases from hypothesis (deterministic for a given ``seed``). No batch of ``batch``
    cases ends in a TLP without eop (its completion would fall into the next batch)."""
    out = []

    @hyp_seed(seed)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(tlp_cases())
    def collect(c):
        out.append(c)

    with warnings.catch_warnings():
        # hypothesis warns about generation at import time of a plugin; here it is deliberate
        warnings.simplefilter("ignore")
        collect()
    out = out[:n]
    # a missing eop is only well defined when another TLP follows it
    for i, c in enumerate(out):
        if (i + 1) % batch == 0 or i == len(out) - 1:
            if c["framing"] == "no_eop":
                c["framing"] = "ok"
    for c in out:
        c["non_posted"] = c["ft"] in TlpKind.NON_POSTED
        c["has_sop"] = c["framing"] != "stray"
        fmt = c["ft"] >> 5
        has_data = bool(fmt & 0b010)
        exp = (c["length"] or 1024) if has_data else 0
        c["malformed_hint"] = int(c["framing"] != "ok" or c["ndw"] != exp)
    return out


def _header(c):
    ft = c["ft"]
    fmt, typ = ft >> 5, ft & 0x1F
    tag = c.get("tag", 0)
    dw0 = (fmt << 29) | (typ << 24) | ((c["tc_attr"] & 7) << 20) | ((tag >> 9 & 1) << 23) \
        | ((tag >> 8 & 1) << 19) | (c["ep"] << 14) | (((c["tc_attr"] >> 4) & 3) << 12) \
        | (c["length"] & 0x3FF)
    dw1 = (c["requester_id"] << 16) | ((tag & 0xFF) << 8) | (c["last_be"] << 4) | c["first_be"]
    if typ in (0b00100, 0b00101):
        words = [dw0, dw1, (c["completer_id"] << 16) | (c["reg"] << 2)]
    elif fmt & 1:
        words = [dw0, dw1, c["addr"] >> 32 & 0xFFFF_FFFF, c["addr"] & 0xFFFF_FFFC]
    else:
        words = [dw0, dw1, c["addr"] & 0xFFFF_FFFC]
    return struct.pack(">" + "L" * len(words), *words)


def case_beats(c, codec):
    """Stream beats (ints) of a case, framing faults included."""
    import random
    rnd = random.Random(c["payload_seed"])
    payload = bytes(rnd.getrandbits(8) for _ in range(4 * c["ndw"]))
    beats = codec.beats(_header(c), payload, eop=c["framing"] != "no_eop")
    if c["framing"] == "stray":
        # a beat that belongs to no TLP: no sop
        beats = [codec.pack(data=rnd.getrandbits(32), strb=1, sop=0, eop=1)]
    return beats
