from __future__ import annotations

import pytest
from kata_agent.engine import caps, lowlevel
from kata_agent.engine.caps import CAPABILITIES, Capabilities, apply_capabilities, to_mask
from kata_agent.engine.errors import HostError, SpecError


def test_table_is_complete_for_linux_6_1() -> None:
    assert len(CAPABILITIES) == 41
    assert sorted(CAPABILITIES.values()) == list(range(41))
    assert CAPABILITIES["CAP_SYS_ADMIN"] == 21 and CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40


def test_from_oci_all_sets() -> None:
    c = Capabilities.from_oci({
        "bounding": ["CAP_CHOWN", "CAP_KILL"], "effective": ["cap_chown"],
        "inheritable": [], "permitted": ["CAP_CHOWN", "CAP_KILL"], "ambient": ["CAP_KILL"],
    })
    assert c.bounding == frozenset({"CAP_CHOWN", "CAP_KILL"})
    assert c.effective == frozenset({"CAP_CHOWN"})
    assert c.inheritable == frozenset() and c.ambient == frozenset({"CAP_KILL"})
    assert Capabilities.from_oci({}) == Capabilities()


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"bounding": ["CAP_FLY"]}, "process.capabilities.bounding[0]"),
        ({"effective": ["CAP_CHOWN", 3]}, "process.capabilities.effective[1]"),
        ({"ambient": "CAP_CHOWN"}, "process.capabilities.ambient"),
        ({"permitted": ["CAP_CHOWN"] * 65}, "process.capabilities.permitted"),
    ],
)
def test_unknown_or_malformed_names(doc: dict[str, object], field: str) -> None:
    with pytest.raises(SpecError) as ei:
        Capabilities.from_oci(doc)
    assert ei.value.field == field


def test_to_mask_leaves_out_caps_the_kernel_lacks() -> None:
    assert to_mask(frozenset({"CAP_CHOWN", "CAP_KILL"}), 40) == 0b100001
    assert to_mask(frozenset({"CAP_BPF", "CAP_CHOWN"}), 38) == 1


class FakeLow:
    """Records the raw calls apply_capabilities makes (the real calls are exercised in
    tests/privileged/test_caps.py)."""

    PR_SET_KEEPCAPS = lowlevel.PR_SET_KEEPCAPS
    PR_CAPBSET_READ = lowlevel.PR_CAPBSET_READ
    PR_CAPBSET_DROP = lowlevel.PR_CAPBSET_DROP
    PR_CAP_AMBIENT = lowlevel.PR_CAP_AMBIENT
    PR_CAP_AMBIENT_RAISE = lowlevel.PR_CAP_AMBIENT_RAISE
    PR_CAP_AMBIENT_CLEAR_ALL = lowlevel.PR_CAP_AMBIENT_CLEAR_ALL

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []
        self.bounding = (1 << 41) - 1

    def capget(self) -> tuple[int, int, int]:
        return (0, (1 << 41) - 1, 0)

    def capset(self, e: int, p: int, i: int) -> None:
        self.calls.append(("capset", e, p, i))

    def prctl(self, option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
        if option == self.PR_CAPBSET_READ:
            return (self.bounding >> a2) & 1
        if option == self.PR_CAPBSET_DROP:
            self.bounding &= ~(1 << a2)
        self.calls.append(("prctl", option, a2, a3))
        return 0


def test_apply_order(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLow()
    monkeypatch.setattr(caps, "lowlevel", fake)
    monkeypatch.setattr(caps, "last_cap", lambda: 40)
    apply_capabilities(Capabilities(
        bounding=frozenset({"CAP_CHOWN", "CAP_KILL"}), effective=frozenset({"CAP_CHOWN"}),
        permitted=frozenset({"CAP_CHOWN", "CAP_KILL"}), inheritable=frozenset({"CAP_KILL"}),
        ambient=frozenset({"CAP_KILL"})))
    full = (1 << 41) - 1
    assert fake.calls[0] == ("capset", full, full, 0)  # regain effective after setuid
    drops = [int(str(c[2])) for c in fake.calls if c[1] == fake.PR_CAPBSET_DROP]
    assert sorted(drops) == [b for b in range(41) if b not in (0, 5)]
    assert fake.bounding == 0b100001
    rest = [c for c in fake.calls if c[1] != fake.PR_CAPBSET_DROP]
    assert rest[1:] == [
        ("capset", 1, 0b100001, 0b100000),
        ("prctl", fake.PR_CAP_AMBIENT, fake.PR_CAP_AMBIENT_CLEAR_ALL, 0),
        ("prctl", fake.PR_CAP_AMBIENT, fake.PR_CAP_AMBIENT_RAISE, 5),
        ("prctl", fake.PR_SET_KEEPCAPS, 0, 0),
    ]


def test_apply_maps_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeLow()

    def refuse(e: int, p: int, i: int) -> None:
        raise OSError(1, "Operation not permitted")

    fake.capset = refuse  # type: ignore[method-assign]
    monkeypatch.setattr(caps, "lowlevel", fake)
    with pytest.raises(HostError) as ei:
        apply_capabilities(Capabilities())
    assert ei.value.errno == 1


def test_capget_matches_proc_status() -> None:
    with open("/proc/self/status") as f:
        status = {k: int(v, 16) for k, _, v in (line.partition(":") for line in f)
                  if k.startswith("Cap")}
    eff, perm, inh = lowlevel.capget()
    assert (eff, perm, inh) == (status["CapEff"], status["CapPrm"], status["CapInh"])
    assert caps.last_cap() >= 37
