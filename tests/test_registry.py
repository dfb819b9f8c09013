"""The one registry type: register, look up by name or class_path, one-line errors."""

from __future__ import annotations

import pytest

from cdfsl.errors import CdfslError, DataError
from cdfsl.registry import Registry


class Base:
    pass


class Child(Base):
    pass


def test_register_lookup_and_refuse_a_taken_name():
    reg: Registry[str, int] = Registry("widget", {"a": 1}, fix="fix --widget")
    assert reg.register("b", 2) == 2
    assert dict(reg) == {"a": 1, "b": 2} and reg.names() == ["a", "b"]
    assert reg.lookup("b") == 2 and "a" in reg and reg.get("zzz") is None

    @reg.register("c")
    def three() -> int:
        return 3

    assert reg["c"] is three
    reg.register("a", 1)  # the same value again is a no-op
    with pytest.raises(CdfslError, match="widget 'a' is already registered"):
        reg.register("a", 5)
    with pytest.raises(CdfslError) as err:
        reg.lookup("d", "--widget")
    assert str(err.value) == "--widget='d': expected one of ['a', 'b', 'c']; fix --widget"
    assert "\n" not in str(err.value)


def test_resolve_takes_a_name_or_a_class_path_of_the_base():
    reg: Registry[str, type] = Registry("thing", {"base": Base}, error=DataError)
    assert reg.resolve("base") is Base
    assert reg.resolve(f"{__name__}.Child", Base) is Child
    with pytest.raises(DataError, match="unknown thing 'nope': expected one of \\['base'\\]"):
        reg.resolve("nope")
    with pytest.raises(DataError, match="expected a Base subclass"):
        reg.resolve(f"{__name__}.test_resolve_takes_a_name_or_a_class_path_of_the_base", Base)
    with pytest.raises(CdfslError, match=r"class_path 'no\.such\.Thing': expected an importable"):
        reg.resolve("no.such.Thing", Base)


def test_every_choice_table_is_a_registry():
    """The named choices of cdfsl are Registry objects, one mechanism for all of them."""
    from cdfsl.backbones.base import GEOMETRIES, INTERPOLATIONS
    from cdfsl.backbones.registry import BACKBONES, FAMILIES
    from cdfsl.continual.rail import RANDOM_LAYER_INITS
    from cdfsl.continual.xtail.data import CLASS_NAME_STYLES, SMALL_CLASS_DRAWS
    from cdfsl.continual.xtail.learners import LEARNERS
    from cdfsl.data.sources import SOURCES
    from cdfsl.data.views import COLOR_JITTERS, ROTATION_INTERPOLATIONS
    from cdfsl.fewshot.losses import DIVERGENCES
    from cdfsl.fewshot.methods.mind import SUPPORT_FEATURES
    from cdfsl.lora import LAYOUT_HANDLERS
    from cdfsl.reasoning.experiment import DG_DATA, MODELS, TEACHERS, VARIANTS

    tables = [
        GEOMETRIES, INTERPOLATIONS, BACKBONES, SOURCES, COLOR_JITTERS, ROTATION_INTERPOLATIONS,
        CLASS_NAME_STYLES, SMALL_CLASS_DRAWS, LEARNERS, LAYOUT_HANDLERS, DIVERGENCES,
        SUPPORT_FEATURES, RANDOM_LAYER_INITS, DG_DATA, MODELS, TEACHERS, VARIANTS, FAMILIES,
    ]  # fmt: skip
    assert all(isinstance(table, Registry) and len(table) > 0 for table in tables)


def test_add_keys_an_entry_by_what_it_carries_after_its_check():
    seen = []

    def check(cls: type) -> None:
        seen.append(cls)
        if not hasattr(cls, "name"):
            raise CdfslError(f"{cls.__name__} has no name")

    reg: Registry[str, type] = Registry("gadget", key_of=lambda cls: cls.name, check=check)

    @reg.add
    class Named:
        name = "named"

    assert reg["named"] is Named and seen == [Named]
    assert reg.add(Named) is Named  # the same class again is a no-op
    with pytest.raises(CdfslError, match="Nameless has no name"):
        reg.add(type("Nameless", (), {}))
    with pytest.raises(CdfslError, match="gadget 'named' is already registered"):
        reg.add(type("Other", (), {"name": "named"}))
    with pytest.raises(TypeError, match="the widget registry has no key_of"):
        Registry("widget").add(1)


def test_the_newest_backbone_family_whose_rule_matches_builds_the_model():
    from cdfsl.backbones.clip import ClipBackbone
    from cdfsl.backbones.pe_core import PeCoreBackbone
    from cdfsl.backbones.registry import _family_for
    from cdfsl.backbones.siglip import SiglipBackbone

    assert _family_for("ViT-B-16-SigLIP2") is SiglipBackbone
    assert _family_for("PE-Core-B-16") is PeCoreBackbone
    assert _family_for("ViT-B-16") is ClipBackbone  # the generic rule, added first, comes last
