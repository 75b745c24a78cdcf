"""Validation hold-outs of ``fit``: ``"auto"``, ``"patient"``, numbers, names."""

import pytest

import genedml_sd as gd
from genedml_sd.tl._fit import _split_validation

ENCODER = "stain-texture"


def _infos(*patients_sections):
    return [{"patient": p, "section": s} for p, s in patients_sections]


def test_patient_validation_holds_out_every_section_of_the_smallest_patient():
    infos = _infos(("B", "B1"), ("C", "C1"), ("C", "C2"), ("D", "D1"), ("D", "D2"), ("C", "C3"))
    assert _split_validation(infos, "patient", seed=0) == [0]  # B has one section, C three, D two
    infos = _infos(("C", "C1"), ("D", "D1"), ("C", "C2"), ("D", "D2"), ("E", "E1"), ("E", "E2"), ("E", "E3"))
    chosen = {tuple(_split_validation(infos, "patient", seed=s)) for s in range(20)}
    assert chosen == {(0, 2), (1, 3)}  # C and D tie at two sections: the seed breaks the tie, E is never chosen


def test_patient_validation_falls_back_to_one_section_when_a_patient_cannot_be_spared():
    one_patient = _infos(("C", "C1"), ("C", "C2"), ("C", "C3"))
    assert _split_validation(one_patient, "patient", seed=0) == _split_validation(one_patient, "auto", seed=0)
    assert len(_split_validation(one_patient, "patient", seed=0)) == 1
    # holding out A would leave one slide to train on; two slides in all: no validation ("auto")
    assert _split_validation(_infos(("A", "A1"), ("B", "B1")), "patient", seed=0) == []
    three = _infos(("A", "A1"), ("B", "B1"), ("B", "B2"))
    assert _split_validation(three, "patient", seed=0) == [0]


def test_validation_split_rejects_a_bare_section_name():
    with pytest.raises(ValueError, match=r"pass \['C2'\]"):
        _split_validation(_infos(("C", "C1"), ("C", "C2"), ("C", "C3")), "C2", seed=0)


def test_fit_with_patient_validation_validates_on_the_unseen_patient(demo):
    b4, c2, c3, c4 = demo
    model = gd.tl.fit(
        [c2, b4, c3, c4], method="ridge", encoder=ENCODER, genes=20, feature_mode="spot", val_sections="patient"
    )
    assert model.training["validation_sections"] == ["B4"]
    assert model.training["sections"] == ["C2", "B4", "C3", "C4"]
    assert model.training["gene_ranking_source"] == "validation sections"


def test_fit_rejects_a_bad_validation_split_before_touching_the_encoder(demo):
    _, c2, c3, c4 = demo
    not_an_encoder = object()  # would be a TypeError if the encoder were resolved first
    with pytest.raises(ValueError, match="val_sections must be"):
        gd.tl.fit([c2, c3, c4], encoder=not_an_encoder, genes=5, val_sections="C2")
    with pytest.raises(KeyError, match="not among the training sections"):
        gd.tl.fit([c2, c3, c4], encoder=not_an_encoder, genes=5, val_sections=["B4"])
