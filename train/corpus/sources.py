"""Layout adapters: each turns one kind of source folder into the same `CorpusRecord` list.

Adapters only read folder listings and CSV rows. Images are opened later, in one place (`corpus_images`), so a
corrupt file is handled the same way whatever layout listed it.
"""

import csv
import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

LABEL_NAMES = ("COVID-19", "Normal", "Pneumonia")
LAYOUTS = ("cxr3", "ieee8023", "covid19-radiography", "chest-xray-pneumonia")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})

CXR3_REQUIRED = ("file", "label", "patient_group")
CXR3_OPTIONAL = ("source", "original_finding", "view", "license", "origin")
IEEE8023_REQUIRED = ("patientid", "finding", "view", "modality", "filename")

# Label strings of the cxr3 layout, of folder names and of the canonical names, lower-cased, "_" read as " ".
_LABEL_ALIASES = {
    "covid19": 0,
    "covid-19": 0,
    "covid 19": 0,
    "covid": 0,
    "normal": 1,
    "no finding": 1,
    "pneumonia": 2,
    "viral pneumonia": 2,
    "bacterial pneumonia": 2,
}
# ieee8023 `finding` values (and parts of its later "Pneumonia/Viral/SARS" spelling) that are a non-COVID pneumonia.
_IEEE8023_PNEUMONIAS = {
    "pneumonia",
    "sars",
    "mers",
    "mers-cov",
    "streptococcus",
    "klebsiella",
    "pneumocystis",
    "legionella",
    "chlamydophila",
    "e.coli",
    "mycoplasma",
    "mycoplasma bacterial pneumonia",
    "lipoid",
    "varicella",
    "influenza",
    "aspergillosis",
    "nocardia",
    "herpes",
    "herpes pneumonia",
    "staphylococcus",
    "staphylococcus aureus",
    "h1n1",
    "moraxella",
    "aspiration",
    "bacterial",
    "viral",
    "fungal",
}
_KAGGLE_PATIENT = re.compile(r"^(person\d+)_|^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)


class CorpusError(Exception):
    """A problem in the input or the options that the user can fix; the CLI prints it as one line."""


@dataclass(frozen=True)
class CorpusRecord:
    """One image as a source lists it, before it is opened."""

    path: Path
    name: str  # path relative to its source folder: shown in messages, kept as the stored file name
    label: int | None  # index into LABEL_NAMES; None when the source's label has no mapping
    raw_label: str  # the label as the layout spells it (label column, folder name, finding)
    patient_id: str  # may join several ids with "|" (cxr3 merged groups); "" when the source gives none
    source: str
    original_finding: str
    view: str
    license: str
    origin: str


@dataclass
class AdapterResult:
    """What one source folder yields: records plus what was left out and why (for the report)."""

    layout: str
    source_dir: Path
    records: list[CorpusRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # {"file", "reason"}: unusable entries
    excluded: Counter = field(default_factory=Counter)  # reason -> rows left out on purpose (CT, lateral view)
    notes: list[str] = field(default_factory=list)


def label_from_name(name: str) -> int | None:
    """Map a cxr3 label, a folder name or a canonical label name to its id; None if unknown."""
    return _LABEL_ALIASES.get(name.strip().lower().replace("_", " "))


def label_from_ieee8023_finding(finding: str) -> int | None:
    """Map an ieee8023 `finding` (old "SARS" or newer "Pneumonia/Viral/SARS" spelling) to a label id."""
    text = finding.strip().lower()
    if "covid-19" in text or "covid19" in text:
        return 0
    if text in ("no finding", "normal"):
        return 1
    parts = [part.strip() for part in re.split(r"[/,]", text) if part.strip()]
    if parts and any(part in _IEEE8023_PNEUMONIAS for part in parts):
        return 2
    return None


def _read_csv(path: Path, required: tuple[str, ...], layout: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Read a metadata CSV (UTF-8, optional BOM); fail naming the missing columns, or when it lists no images."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise CorpusError(f"{path} is not UTF-8 text ({error.reason}); save it as a UTF-8 CSV") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [column.strip() for column in (reader.fieldnames or [])]
    reader.fieldnames = columns
    missing = [column for column in required if column not in columns]
    if missing:
        raise CorpusError(
            f"{path} lacks column(s) {', '.join(missing)} required by the {layout} layout "
            f"(required: {', '.join(required)}; found: {', '.join(columns) or 'none'}); add them to the header"
        )
    rows = []
    for row in reader:
        values = {key: (value or "").strip() for key, value in row.items() if isinstance(key, str)}
        if any(values.values()):
            rows.append((reader.line_num, values))
    if not rows:
        raise CorpusError(f"{path} lists no images; add rows or leave {path.parent} out of --source_dir")
    return columns, rows


def _check_missing(result: AdapterResult, missing: list[str], listing: Path, skip_missing_files: bool) -> None:
    """Files a metadata table lists but the folder lacks: an incomplete copy, so an error unless asked to skip."""
    if not missing:
        return
    if skip_missing_files:
        reason = f"listed in {listing.name} but missing"
        result.skipped.extend({"file": str(listing.parent / name), "reason": reason} for name in missing)
        return
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    raise CorpusError(
        f"{listing} lists {len(missing)} file(s) that do not exist under {listing.parent}: {shown}; "
        "restore them, delete their rows, or pass --skip_missing_files to skip them"
    )


def read_cxr3(source_dir: Path, skip_missing_files: bool = False) -> AdapterResult:
    """`metadata.csv` (file,label,patient_group[,source,original_finding,view,license,origin]) + images/<label>/."""
    listing = source_dir / "metadata.csv"
    columns, rows = _read_csv(listing, CXR3_REQUIRED, "cxr3")
    result = AdapterResult("cxr3", source_dir)
    absent = [column for column in CXR3_OPTIONAL if column not in columns]
    if absent:
        result.notes.append(f"{listing}: no column(s) {', '.join(absent)}; used defaults (source = folder name)")
    missing, mismatched = [], []
    for line, row in rows:
        name = row["file"]
        if not name:
            raise CorpusError(f"{listing} line {line}: empty `file`; fill it in or delete the row")
        path = source_dir / name
        if not path.is_file():
            missing.append(name)
            continue
        raw_label = row["label"]
        parts = Path(name).parts
        if len(parts) == 3 and parts[0] == "images" and label_from_name(parts[1]) != label_from_name(raw_label):
            mismatched.append(f"{name} ({raw_label})")
        result.records.append(
            CorpusRecord(
                path=path,
                name=name,
                label=label_from_name(raw_label),
                raw_label=raw_label,
                patient_id=row["patient_group"],
                source=row.get("source") or source_dir.name,
                original_finding=row.get("original_finding") or raw_label,
                view=row.get("view", ""),
                license=row.get("license", ""),
                origin=row.get("origin") or name,
            )
        )
    _check_missing(result, missing, listing, skip_missing_files)
    if mismatched:
        result.notes.append(
            f"{listing}: {len(mismatched)} row(s) label an image differently from its images/<label>/ folder; "
            f"the label column was used (e.g. {', '.join(mismatched[:3])})"
        )
    listed = {Path(row["file"]).as_posix() for _, row in rows}
    images_dir = source_dir / "images"
    unlisted = [
        path.relative_to(source_dir).as_posix()
        for path in (sorted(images_dir.rglob("*")) if images_dir.is_dir() else [])
        if path.is_file() and not path.name.startswith(".") and path.relative_to(source_dir).as_posix() not in listed
    ]
    if unlisted:
        result.notes.append(
            f"{source_dir}: {len(unlisted)} file(s) under images/ are not listed in metadata.csv and were ignored "
            f"(e.g. {', '.join(unlisted[:3])}); add rows for them to include them"
        )
    return result


def _is_frontal(view: str) -> bool:
    return view.strip().upper().startswith(("PA", "AP"))


def read_ieee8023(source_dir: Path, skip_missing_files: bool = False) -> AdapterResult:
    """ieee8023/covid-chestxray-dataset: `metadata.csv` (patientid,finding,view,modality,filename[,folder])."""
    listing = source_dir / "metadata.csv"
    columns, rows = _read_csv(listing, IEEE8023_REQUIRED, "ieee8023")
    result = AdapterResult("ieee8023", source_dir)
    missing = []
    for _line, row in rows:
        modality = row["modality"]
        if modality.lower().replace("-", "") not in ("xray", "cr", "dx"):
            result.excluded[f"modality {modality or '(blank)'} (X-rays only)"] += 1
            continue
        if not _is_frontal(row["view"]):
            result.excluded[f"view {row['view'] or '(blank)'} (frontal PA/AP only)"] += 1
            continue
        name = f"{row.get('folder') or 'images'}/{row['filename']}"
        path = source_dir / name
        if not row["filename"] or not path.is_file():
            missing.append(name)
            continue
        result.records.append(
            CorpusRecord(
                path=path,
                name=name,
                label=label_from_ieee8023_finding(row["finding"]),
                raw_label=row["finding"],
                patient_id=f"ieee8023:{row['patientid']}" if row["patientid"] else "",
                source="ieee8023-covid-chestxray",
                original_finding=row["finding"],
                view=row["view"],
                license=row.get("license", ""),
                origin=f"ieee8023/covid-chestxray-dataset:{name}",
            )
        )
    _check_missing(result, missing, listing, skip_missing_files)
    return result


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "__MACOSX")))


def _list_images(folder: Path, result: AdapterResult) -> list[Path]:
    """Image files directly in `folder`; other visible files are listed as skipped."""
    images = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        else:
            reason = f"not an image file (suffix {path.suffix or 'none'})"
            result.skipped.append({"file": str(path), "reason": reason})
    return images


def _radiography_root(source_dir: Path) -> Path | None:
    """The folder holding COVID/Normal/Viral Pneumonia class folders: the source itself or one level down."""
    for candidate in [source_dir, *_visible_dirs(source_dir)]:
        labels = [label_from_name(p.name) for p in _visible_dirs(candidate)]
        if 0 in labels and (1 in labels or 2 in labels):
            return candidate
    return None


def read_covid19_radiography(source_dir: Path) -> AdapterResult:
    """Kaggle "COVID-19 Radiography Database": <class>/[images/]*.png; no patient ids in this source."""
    root = _radiography_root(source_dir)
    if root is None:
        raise CorpusError(f"{source_dir}: no COVID and Normal/Viral Pneumonia folders (Kaggle COVID-19 Radiography)")
    result = AdapterResult("covid19-radiography", source_dir)
    result.notes.append(
        f"{source_dir}: the COVID-19 Radiography Database gives no patient ids; each image counts as its own "
        "patient, so only near-duplicate merging keeps a patient's repeated films together"
    )
    for class_dir in _visible_dirs(root):
        image_dir = class_dir / "images" if (class_dir / "images").is_dir() else class_dir
        images = _list_images(image_dir, result)
        label = label_from_name(class_dir.name)
        if not images and label is not None:
            raise CorpusError(f"class folder {image_dir} holds no images; add its images or delete the empty folder")
        for path in images:
            name = path.relative_to(source_dir).as_posix()
            result.records.append(
                CorpusRecord(
                    path=path,
                    name=name,
                    label=label,
                    raw_label=class_dir.name,
                    patient_id=f"covid19-radiography:{class_dir.name}/{path.stem}",
                    source="kaggle-covid19-radiography",
                    original_finding=class_dir.name,
                    view="",
                    license="see the Kaggle COVID-19 Radiography Database and its component sources",
                    origin=f"kaggle covid19-radiography-database:{name}",
                )
            )
    return result


def _pneumonia_class_dirs(source_dir: Path, max_depth: int = 3) -> list[Path]:
    """NORMAL/PNEUMONIA folders up to `max_depth` levels down (train|val|test, an extra chest_xray/ level)."""
    found, frontier = [], [source_dir]
    for _ in range(max_depth):
        next_frontier = []
        for folder in frontier:
            for sub in _visible_dirs(folder):
                (found if sub.name.upper() in ("NORMAL", "PNEUMONIA") else next_frontier).append(sub)
        frontier = next_frontier
    return sorted(found)


def kaggle_patient_id(file_name: str) -> str:
    """`person12_bacteria_45.jpeg` -> `kaggle:person12`; `IM-0115-0001.jpeg` -> `kaggle:IM-0115`."""
    match = _KAGGLE_PATIENT.match(file_name)
    if match is None:
        return f"kaggle:{Path(file_name).stem}"
    return f"kaggle:{match.group(1) or match.group(2)}"


def read_chest_xray_pneumonia(source_dir: Path) -> AdapterResult:
    """Kaggle "chest-xray-pneumonia" (Kermany et al.): train|val|test/NORMAL|PNEUMONIA/*.jpeg, pediatric."""
    class_dirs = _pneumonia_class_dirs(source_dir)
    if not class_dirs:
        raise CorpusError(f"{source_dir}: no NORMAL/PNEUMONIA folders (Kaggle chest-xray-pneumonia layout)")
    result = AdapterResult("chest-xray-pneumonia", source_dir)
    result.notes.append(f"{source_dir}: the layout's own train/val/test folders are ignored; patients are re-split")
    for class_dir in class_dirs:
        images = _list_images(class_dir, result)
        if not images:
            raise CorpusError(f"class folder {class_dir} holds no images; add its images or delete the empty folder")
        for path in images:
            name = path.relative_to(source_dir).as_posix()
            kind = next((k for k in ("bacteria", "virus") if k in path.name.lower()), "")
            result.records.append(
                CorpusRecord(
                    path=path,
                    name=name,
                    label=label_from_name(class_dir.name),
                    raw_label=class_dir.name,
                    patient_id=kaggle_patient_id(path.name),
                    source="kaggle-chest-xray-pneumonia",
                    original_finding=f"{class_dir.name.upper()} ({kind})" if kind else class_dir.name.upper(),
                    view="AP (per dataset description)",
                    license="CC BY 4.0",
                    origin=f"kaggle chest-xray-pneumonia:{name}",
                )
            )
    return result


def detect_layout(source_dir: Path) -> str:
    """Name the layout of `source_dir`, or fail saying which layouts were expected."""
    if not source_dir.is_dir():
        raise CorpusError(f"source folder {source_dir} does not exist or is not a folder; check --source_dir")
    listing = source_dir / "metadata.csv"
    if listing.is_file():
        header = listing.read_text(encoding="utf-8-sig", errors="replace").partition("\n")[0]
        columns = {column.strip() for column in next(csv.reader([header]), [])}
        if "file" not in columns and columns & {"patientid", "finding", "filename"}:
            return "ieee8023"
        if columns & set(CXR3_REQUIRED):
            return "cxr3"
        raise CorpusError(
            f"{listing} has neither the cxr3 columns ({','.join(CXR3_REQUIRED)},...) nor the ieee8023 columns "
            f"({','.join(IEEE8023_REQUIRED)}); found: {','.join(sorted(columns)) or 'none'}; fix the header"
        )
    if _radiography_root(source_dir) is not None:
        return "covid19-radiography"
    if _pneumonia_class_dirs(source_dir):
        return "chest-xray-pneumonia"
    if not any(source_dir.iterdir()):
        raise CorpusError(f"source folder {source_dir} is empty; point --source_dir at a folder with images")
    raise CorpusError(
        f"{source_dir} matches no known layout: expected metadata.csv with cxr3 or ieee8023 columns, "
        "COVID/Normal/Viral Pneumonia folders (Kaggle COVID-19 Radiography Database) or "
        "[train|val|test/]NORMAL|PNEUMONIA folders (Kaggle chest-xray-pneumonia); or pass --layout"
    )


def read_source(source_dir: Path, layout: str = "auto", skip_missing_files: bool = False) -> AdapterResult:
    """Detect (or take) the layout of one source folder and run its adapter."""
    source_dir = Path(source_dir)
    if layout == "auto":
        layout = detect_layout(source_dir)
    elif not source_dir.is_dir():
        raise CorpusError(f"source folder {source_dir} does not exist or is not a folder; check --source_dir")
    if layout == "cxr3":
        result = read_cxr3(source_dir, skip_missing_files)
    elif layout == "ieee8023":
        result = read_ieee8023(source_dir, skip_missing_files)
    elif layout == "covid19-radiography":
        result = read_covid19_radiography(source_dir)
    elif layout == "chest-xray-pneumonia":
        result = read_chest_xray_pneumonia(source_dir)
    else:
        raise CorpusError(f"unknown layout {layout!r}; choose auto or one of {', '.join(LAYOUTS)}")
    if not result.records:
        raise CorpusError(f"{source_dir} ({layout} layout) yields no usable images; check the folder's contents")
    return result
