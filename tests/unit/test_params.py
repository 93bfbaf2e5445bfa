from __future__ import annotations

import pytest

from pipeline.params import ParamError, ParamSpec, parse_duration, resolve

SPECS = [ParamSpec("pid", "operator.oci.ebpf.", type_hint="uint32"),
         ParamSpec("failed", "operator.oci.ebpf.", default="false", type_hint="bool"),
         ParamSpec("interval", "operator.x.", default="1s", type_hint="duration",
                   alternative_key="old-interval")]
OWNED = ("operator.oci.ebpf.", "operator.x.")


def test_defaults_and_types() -> None:
    v = resolve(SPECS, {"operator.oci.ebpf.pid": "42"}, OWNED)
    assert v == {"operator.oci.ebpf.pid": 42, "operator.oci.ebpf.failed": False,
                 "operator.x.interval": 1.0}


def test_unknown_owned_key_suggests_the_near_miss() -> None:
    with pytest.raises(ParamError, match=r"did you mean 'operator\.oci\.ebpf\.failed'"):
        resolve(SPECS, {"operator.oci.ebpf.faild": "true"}, OWNED)


def test_foreign_prefixes_are_ignored_like_upstream() -> None:
    resolve(SPECS, {"operator.cli.output": "json", "operator.oci.pull": "missing"}, OWNED)


@pytest.mark.parametrize(("key", "value", "reason"), [
    ("operator.oci.ebpf.pid", "-1", "outside uint32"),
    ("operator.oci.ebpf.pid", "x", "invalid literal"),
    ("operator.oci.ebpf.failed", "maybe", "not a bool"),
    ("operator.x.interval", "5 parsecs", "not a duration"),
])
def test_bad_values_name_key_and_reason(key: str, value: str, reason: str) -> None:
    with pytest.raises(ParamError) as e:
        resolve(SPECS, {key: value}, OWNED)
    assert e.value.key == key and reason in e.value.reason


def test_alternative_key_is_honoured() -> None:
    assert resolve(SPECS, {"operator.x.old-interval": "250ms"}, OWNED)["operator.x.interval"] \
        == 0.25


def test_durations() -> None:
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("0") == 0.0
    assert parse_duration("2ms") == pytest.approx(0.002)
