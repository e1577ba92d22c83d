"""The generic registry: registration, aliases, duplicates, wildcard listing, close matches."""

from dataclasses import dataclass

import pytest

from cambench.benchmarks.core.errors import UnknownNameError, UserError
from cambench.benchmarks.core.registry import Registry, natural_key

pytestmark = pytest.mark.harness


@dataclass(frozen=True)
class Info:
    family: str = "cam"


@pytest.fixture
def reg():
    r = Registry("method", Info)
    for name in ("gradcam", "gradcampp", "xgradcam", "resnet101", "resnet18", "random"):
        r.add(name, lambda name=name: name, aliases=(f"{name}-alias",), family="cam")
    return r


def test_alias_and_metadata(reg):
    assert reg.get("gradcam-alias").name == "gradcam"
    assert reg.get("gradcam").info == Info("cam")
    assert "gradcampp-alias" in reg and "nope" not in reg


def test_duplicate_name_to_other_object_is_an_error(reg):
    with pytest.raises(ValueError, match="already registered"):
        reg.add("gradcam", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        reg.add("new", lambda: None, aliases=("random",))


def test_reregistering_same_object_is_allowed():
    r = Registry("metric", Info)

    def f():
        return 1

    r.add("f", f)
    r.add("f", f)
    assert r.names() == ["f"]


def test_unknown_name_lists_close_matches(reg):
    with pytest.raises(UnknownNameError) as err:
        reg.get("gradcam+")
    msg = str(err.value)
    assert msg.startswith("Unknown method 'gradcam+'. Did you mean: gradcam")
    assert "gradcampp" in msg and "Available:" in msg
    assert isinstance(err.value, UserError)


def test_wildcards_exclusions_and_natural_sort(reg):
    assert reg.names("grad*") == ["gradcam", "gradcampp"]
    assert reg.names("*cam*", exclude="*pp") == ["gradcam", "xgradcam"]
    assert reg.names("resnet*") == ["resnet18", "resnet101"]
    assert sorted(["x10", "x2", "x1"], key=natural_key) == ["x1", "x2", "x10"]
    with pytest.raises(UnknownNameError, match="No method matches"):
        reg.names("zzz*")
    with pytest.raises(UnknownNameError, match="Did you mean"):
        reg.names(["gradcam", "randm"])


def test_remove_drops_the_entry_and_its_aliases(reg):
    reg.remove("gradcam-alias")
    assert "gradcam" not in reg and "gradcam-alias" not in reg
    assert "gradcampp" in reg
    reg.add("gradcam", lambda: None)  # the name is free again
