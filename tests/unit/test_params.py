from __future__ import annotations

import pytest

from pipeline.params import (
    REDACTED,
    ParamError,
    ParamSpec,
    parse_duration,
    redact,
    resolve,
    secret_keys,
)

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


# -- old keys and secrets ---------------------------------------------------------------------

SECRET = ParamSpec("token", "operator.s.", default="daemon-token", secret=True,
                   old_keys=("operator.s.old-token",))
LEVEL = ParamSpec("level", "operator.s.", default="1", type_hint="uint8",
                  possible_values=("1", "2"), secret=True)


def test_a_secret_default_is_announced_redacted_and_an_echo_means_the_default() -> None:
    assert SECRET.to_proto().defaultValue == REDACTED
    assert ParamSpec("t", "p.", secret=True).to_proto().defaultValue == ""
    assert resolve([SECRET], {"operator.s.token": REDACTED}, ("operator.s.",)) == {
        "operator.s.token": "daemon-token"}
    assert resolve([SECRET], {"operator.s.token": "mine"}, ("operator.s.",)) == {
        "operator.s.token": "mine"}


def test_a_bad_secret_value_is_not_quoted() -> None:
    with pytest.raises(ParamError) as e:
        resolve([LEVEL], {"operator.s.level": "hunter2"}, ("operator.s.",))
    assert "hunter2" not in str(e.value)
    assert e.value.key == "operator.s.level"


def test_redact_hides_secrets_under_every_name_and_keeps_empty_ones() -> None:
    values = {"operator.s.token": "a", "operator.s.old-token": "b", "operator.x.y": "c",
              "operator.s.level": ""}
    assert redact(values, [SECRET, LEVEL]) == {
        "operator.s.token": REDACTED, "operator.s.old-token": REDACTED, "operator.x.y": "c",
        "operator.s.level": ""}
    assert redact(values, secret_keys([SECRET])) == redact(values, [SECRET])


def test_old_keys_resolve_to_the_param() -> None:
    assert resolve([SECRET], {"operator.s.old-token": "x"}, ("operator.s.",)) == {
        "operator.s.token": "x"}
    with pytest.raises(ParamError, match="given twice"):
        resolve([SECRET], {"operator.s.old-token": "x", "operator.s.token": "y"},
                ("operator.s.",))
