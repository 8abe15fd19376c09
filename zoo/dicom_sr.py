"""medzoo's answer for a DICOM image as a DICOM Structured Report (highdicom; no torch).

One Comprehensive SR per source image, built with highdicom's TID 1500 "Measurement Report":

* the SR is a new series (:data:`SR_SERIES_NUMBER`) in the source's study, with the patient and
  study modules copied from the source header (highdicom copies them from the evidence); SOP
  instance and series UIDs are new (``highdicom.UID()``: pydicom's ``generate_uid``, medzoo has no
  UID root of its own);
* TID 1001 observation context: the observer is a device (TID 1004) named ``medzoo``, model name the
  model id, its UID derived from the weights sha256 (``generate_uid(entropy_srcs=…)``: the same model
  is the same device in every report);
* TID 1600 image library and, in the TID 1501 measurement group, the source image (SOP class and
  instance UIDs; the study and series UIDs are in the evidence sequence);
* the group's tracking identifier, TID 4019 algorithm identification (name ``medzoo``, version the
  medzoo version, parameters ``model=<id>``, ``weights_sha256=<sha256>``, ``dataset=<name>``, one
  pair per ensemble member), and the answer:

  - Finding (DCM 121071) = the predicted class;
  - Probability (DCM 122157, unit UCUM ``1``) = its probability;
  - one qualitative evaluation "Prediction set member" per class of the prediction set (most
    probable first) and the measurement "Prediction set alpha" (the set's level is 1 − alpha);
  - "Out of distribution" = SNOMED CT Yes (373066001) / No (373067005) and the measurement
    "Out-of-distribution score", when the model has a detector;
  - "Ensemble agreement" for an ensemble.

Class codes (:func:`class_code`): SNOMED CT where DICOM itself uses a code for the class (pydicom's
code dictionary, which is DICOM PS3.16's: :data:`SNOMED_CLASSES`), else medzoo's private coding
scheme :data:`SCHEME` with the code value ``<dataset>-<class index>`` and the label as its meaning;
the concept names medzoo adds are in :data:`SCHEME` too, declared in the Coding Scheme
Identification Sequence.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from typing import Any

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from zoo._version import __version__
from zoo.errors import ImageError, UserError
from zoo.preprocess import probe

SCHEME = "99MEDZOO"  # private coding scheme designators start with 99 (PS3.16 8.2)
SR_SUFFIX = ".sr.dcm"
MEDIA_TYPE = "application/dicom"
SR_SERIES_NUMBER = 9901  # a new series beside the acquisition series (their numbers are small)
SERIES_DESCRIPTION = "medzoo classification"
LO_MAX = 64  # a code meaning (LO) holds 64 characters

NO_UNITS = codes.UCUM.NoUnits  # UCUM "1": probabilities, scores, alpha
PREDICTION_SET_MEMBER = Code("set-member", SCHEME, "Prediction set member")
SET_ALPHA = Code("set-alpha", SCHEME, "Prediction set alpha")
OUT_OF_DISTRIBUTION = Code("ood", SCHEME, "Out of distribution")
OOD_SCORE = Code("ood-score", SCHEME, "Out-of-distribution score")
AGREEMENT = Code("agreement", SCHEME, "Ensemble agreement")
PROCEDURE = codes.SCT.ImagingProcedure

# SNOMED CT codes for classes, taken from DICOM's own context groups (pydicom.sr.codedict): only where
# the class is exactly that concept. Lateral organs (kidney-left…), composite classes ("normal, benign")
# and tissue classes DICOM does not code (debris, mucus, …) keep medzoo's private codes.
_ORGANS = ("organamnist", "organcmnist", "organsmnist")
SNOMED_CLASSES: dict[tuple[str, str], Code] = {
    ("breastmnist", "malignant"): codes.SCT.Malignant,  # 21594007
    ("dermamnist", "melanoma"): codes.SCT.MalignantMelanoma,  # 1162635006, DICOM CID 638/639 (not 372244006)
    ("pathmnist", "adipose"): codes.SCT.AdiposeTissue,  # 55603005 "Fat"
    **{(d, organ): code for d in _ORGANS for organ, code in (
        ("bladder", codes.SCT.Bladder), ("heart", codes.SCT.Heart), ("liver", codes.SCT.Liver),
        ("pancreas", codes.SCT.Pancreas), ("spleen", codes.SCT.Spleen))},
}
# what a source needs for an SR to reference it and sit in its study
_REQUIRED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# Type 2 attributes highdicom reads from the source (an empty value is valid; a missing one is not)
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


class DicomSRError(UserError, ValueError):
    """A DICOM structured report cannot be made (a source without the UIDs it must reference)."""


class ModelIdentity(BaseModel):
    """A model that answered: bundle id and weights sha256."""

    model_config = ConfigDict(frozen=True)

    id: str
    weights_sha256: str


class SRAnswer(BaseModel):
    """What an SR reports of one image: medzoo's answer and the model(s) that gave it."""

    model_config = ConfigDict(frozen=True)

    dataset: str = Field(description="names the class codes (e.g. breastmnist)")
    labels: list[str] = Field(min_length=2)
    predicted: int = Field(ge=0)
    probability: float = Field(ge=0, le=1)
    prediction_set: list[str] | None = None
    alpha: float | None = None
    ood_score: float | None = None
    in_distribution: bool | None = None
    agreement: float | None = None
    models: list[ModelIdentity] = Field(min_length=1)

    @model_validator(mode="after")
    def _classes_known(self) -> SRAnswer:
        """The predicted class and the set's members are classes of ``labels``."""
        if self.predicted >= len(self.labels):
            raise ValueError(f"predicted class {self.predicted} is not one of the {len(self.labels)} classes")
        unknown = [k for k in self.prediction_set or () if k not in self.labels]
        if unknown:
            raise ValueError(f"prediction set labels {unknown} are not among the classes")
        return self


class SRReading(BaseModel):
    """An SR read back (:func:`read_sr`)."""

    class_code: str
    class_scheme: str
    class_meaning: str
    probability: float
    prediction_set: list[str]
    alpha: float | None
    out_of_distribution: bool | None
    ood_score: float | None
    source_sop_instance_uid: str
    source_sop_class_uid: str
    study_instance_uid: str
    patient_id: str
    algorithm: str
    algorithm_version: str
    parameters: list[str]


def class_code(dataset: str, index: int, label: str) -> Code:
    """The code of class ``index`` of ``dataset`` (module docstring): SNOMED CT or medzoo's own."""
    known = SNOMED_CLASSES.get((dataset.lower(), label))
    return known if known is not None else Code(f"{dataset}-{index}", SCHEME, label[:LO_MAX])


def is_dicom_file(src: str | os.PathLike[str] | bytes) -> bool:
    """Whether ``src`` is DICOM by the rule every reader of medzoo follows (:func:`zoo.preprocess.probe`:
    the ``DICM`` marker, or a bare dataset); from its header alone."""
    try:
        return probe(src).format == "DICOM"
    except ImageError:
        return False


def source_header(src: str | os.PathLike[str] | bytes) -> Dataset:
    """The header of a DICOM file without its pixel data (what an SR copies and references);
    :class:`DicomSRError` when it is not a DICOM file or lacks the UIDs an SR references."""
    fp: Any = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about every non-conformance it tolerates
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)  # also a bare dataset (no preamble)
    except (InvalidDicomError, EOFError, ValueError, OSError, KeyError, TypeError) as e:
        raise DicomSRError(f"not a readable DICOM file ({str(e).splitlines()[0][:120]})") from None
    _check_source(ds)
    return ds


def _check_source(ds: Dataset) -> None:
    """:class:`DicomSRError` unless ``ds`` has the valid UIDs an SR references."""
    missing = [k for k in _REQUIRED if not ds.get(k)]
    if missing:
        raise DicomSRError(f"the DICOM file has no {', '.join(missing)}: a structured report cannot reference it")
    invalid = [k for k in _REQUIRED if not UID(str(ds.get(k))).is_valid]
    if invalid:
        raise DicomSRError(f"the DICOM file's {', '.join(invalid)} is not a valid UID: a structured report cannot "
                           "reference it")


def _evidence(source: Dataset) -> Dataset:
    """The source header with missing Type 2 patient / study attributes set empty (valid in the SR,
    and what highdicom reads)."""
    ds = Dataset()
    ds.update(source)
    for key in _TYPE2:
        if key not in ds:
            setattr(ds, key, None)
    return ds


def _algorithm(answer: SRAnswer) -> hd.sr.AlgorithmIdentification:
    params = [f"dataset={answer.dataset}"]
    for m in answer.models:
        params += [f"model={m.id}", f"weights_sha256={m.weights_sha256}"]
    return hd.sr.AlgorithmIdentification(name="medzoo", version=__version__, parameters=params)


def _observer(answer: SRAnswer) -> hd.sr.ObservationContext:
    """The device observer: medzoo with the model as its model name, a UID per set of weights."""
    shas = [m.weights_sha256 for m in answer.models]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(prefix=None, entropy_srcs=shas), name="medzoo", manufacturer_name="medzoo",
        model_name="+".join(m.id for m in answer.models)[:LO_MAX])
    return hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))


def _num(name: Code, value: float) -> hd.sr.Measurement:
    # DS holds 16 characters: 10 significant digits keep a float32's precision with room for the exponent
    return hd.sr.Measurement(name=name, value=float(f"{value:.10g}"), unit=NO_UNITS)


def _group(source: Dataset, answer: SRAnswer) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501: the answer for the source image."""
    measurements = [_num(codes.DCM.Probability, answer.probability)]
    evaluations = [hd.sr.QualitativeEvaluation(PREDICTION_SET_MEMBER,
                                               class_code(answer.dataset, answer.labels.index(label), label))
                   for label in answer.prediction_set or ()]
    if answer.alpha is not None:
        measurements.append(_num(SET_ALPHA, answer.alpha))
    if answer.in_distribution is not None:
        flag = codes.SCT.No if answer.in_distribution else codes.SCT.Yes
        evaluations.append(hd.sr.QualitativeEvaluation(OUT_OF_DISTRIBUTION, flag))
    if answer.ood_score is not None:
        measurements.append(_num(OOD_SCORE, answer.ood_score))
    if answer.agreement is not None:
        measurements.append(_num(AGREEMENT, answer.agreement))
    tracking = hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"medzoo {answer.dataset} classification")
    source_image = hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking, finding_type=class_code(answer.dataset, answer.predicted,
                                                              answer.labels[answer.predicted]),
        algorithm_id=_algorithm(answer), measurements=measurements, qualitative_evaluations=evaluations or None,
        source_images=[source_image])


def _library(source: Dataset) -> list[Dataset] | None:
    """The source for the TID 1600 image library, or None when highdicom cannot describe it (a
    header without the descriptors it reads: the group still references the image)."""
    try:
        hd.sr.ImageLibrary([source])
    except (AttributeError, KeyError, ValueError, TypeError):
        return None
    return [source]


def build_sr(source: Dataset, answer: SRAnswer, series_uid: str | None = None,
             instance_number: int = 1) -> hd.sr.ComprehensiveSR:
    """The Comprehensive SR of ``answer`` for the image whose header is ``source`` (module docstring).
    ``series_uid``: the SR series in the source's study (default a new one)."""
    _check_source(source)
    evidence = _evidence(source)
    report = hd.sr.MeasurementReport(
        observation_context=_observer(answer), procedure_reported=PROCEDURE,
        imaging_measurements=[_group(evidence, answer)], referenced_images=_library(evidence))
    scheme = CodingSchemeIdentificationItem(
        designator=SCHEME, name="medzoo classes and answers", responsible_organization="medzoo")
    return hd.sr.ComprehensiveSR(
        evidence=[evidence], content=report[0], series_instance_uid=series_uid or hd.UID(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=hd.UID(), instance_number=instance_number,
        manufacturer="medzoo", is_complete=True, coding_schemes=[scheme], series_description=SERIES_DESCRIPTION,
        manufacturer_model_name="medzoo", software_versions=__version__)


def sr_bytes(sr: Dataset) -> bytes:
    """The SR as a DICOM file (Part 10, with its file meta information)."""
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


class SeriesUIDs:
    """One SR series per source study (a series belongs to one study): the UIDs of a request or a run."""

    def __init__(self) -> None:
        self._by_study: dict[str, str] = {}
        self.count = 0

    def next(self, source: Dataset) -> tuple[str, int]:
        """The series UID for ``source``'s study and the next instance number."""
        self.count += 1
        uid = self._by_study.setdefault(str(source.StudyInstanceUID), hd.UID())
        return uid, self.count


def build_all(pairs: Sequence[tuple[Dataset, SRAnswer]]) -> list[hd.sr.ComprehensiveSR]:
    """The SRs of several images (one series per study, numbered in order)."""
    series = SeriesUIDs()
    return [build_sr(src, answer, *series.next(src)) for src, answer in pairs]


def _text_params(group: Any) -> tuple[str, str, list[str]]:
    names = {"111001": "name", "111003": "version", "111002": "param"}
    found: dict[str, list[str]] = {"name": [], "version": [], "param": []}
    for item in group[0].ContentSequence:
        key = names.get(str(item.ConceptNameCodeSequence[0].CodeValue))
        if key and item.ValueType == "TEXT":
            found[key].append(str(item.TextValue))
    return (found["name"] or [""])[0], (found["version"] or [""])[0], found["param"]


def read_sr(src: Dataset | bytes | str | os.PathLike[str]) -> SRReading:
    """An SR written by :func:`build_sr`, read back with highdicom."""
    ds = src if isinstance(src, Dataset) else pydicom.dcmread(
        io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src)
    sr = hd.sr.ComprehensiveSR.from_dataset(ds)
    (group,) = sr.content.get_image_measurement_groups()
    finding = group.finding_type
    prob = group.get_measurements(name=codes.DCM.Probability)[0].value
    alpha = [m.value for m in group.get_measurements(name=SET_ALPHA)]
    score = [m.value for m in group.get_measurements(name=OOD_SCORE)]
    members = [e.value.meaning for e in group.get_qualitative_evaluations(name=PREDICTION_SET_MEMBER)]
    ood = [e.value for e in group.get_qualitative_evaluations(name=OUT_OF_DISTRIBUTION)]
    (image,) = group.source_images
    name, version, params = _text_params(group)
    return SRReading(
        class_code=finding.value, class_scheme=finding.scheme_designator, class_meaning=finding.meaning,
        probability=float(prob), prediction_set=members, alpha=float(alpha[0]) if alpha else None,
        out_of_distribution=(ood[0] == codes.SCT.Yes) if ood else None, ood_score=float(score[0]) if score else None,
        source_sop_instance_uid=image.referenced_sop_instance_uid,
        source_sop_class_uid=image.referenced_sop_class_uid, study_instance_uid=str(ds.StudyInstanceUID),
        patient_id=str(ds.get("PatientID", "")), algorithm=name, algorithm_version=version, parameters=params)


__all__ = ["MEDIA_TYPE", "SCHEME", "SNOMED_CLASSES", "SR_SUFFIX", "DicomSRError", "ModelIdentity", "SRAnswer",
           "SRReading", "SeriesUIDs", "build_all", "build_sr", "class_code", "is_dicom_file", "read_sr",
           "source_header", "sr_bytes"]
