"""Patient groups and splits: exact duplicates, near-duplicate merging and the stratified group assignment.

A patient group is a connected set of source patient ids: ids a source joins with "|", ids of exact-duplicate
copies and ids of near-duplicate images end up in one group, so a patient never straddles splits or folds.
"""

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from .images import near_duplicate_pairs
from .options import CorpusOptions
from .report import CorpusRow
from .sources import CorpusError


class PatientGroups:
    """Patient ids that must stay together (shared groups, duplicates, near-duplicates)."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, item: str) -> str:
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, first: str, second: str) -> bool:
        root_a, root_b = self.find(first), self.find(second)
        if root_a == root_b:
            return False
        self.parent[max(root_a, root_b)] = min(root_a, root_b)
        return True


def assign_groups(
    group_counts: Sequence[Counter], weights: Sequence[float], seed: int, source_weight: float = 0.5
) -> list[int]:
    """Greedily put whole groups into bins with target shares `weights`, stratified by label and by label x source.

    `group_counts[g]` counts the images of group g per (label, source). Groups go largest first (ties in a seeded
    random order); each goes to the bin where it most lowers a chi-square-like deviation from the targets, summed
    over its labels, its label x source strata (weight `source_weight`) and the bin size. Like sklearn's
    StratifiedGroupKFold, but for unequal bins (test + k folds in one pass) and with source as a second stratum.
    """
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    label_totals, stratum_totals = Counter(), Counter()
    for counts in group_counts:
        stratum_totals.update(counts)
        for (label, _source), n in counts.items():
            label_totals[label] += n
    total = sum(stratum_totals.values())
    sizes = [sum(counts.values()) for counts in group_counts]
    rng = np.random.default_rng(seed)
    order = sorted(rng.permutation(len(group_counts)).tolist(), key=lambda g: -sizes[g])
    bin_labels = [Counter() for _ in weights]
    bin_strata = [Counter() for _ in weights]
    bin_sizes = np.zeros(len(weights))

    def change(current: float, added: float, target: float) -> float:
        return ((current + added - target) ** 2 - (current - target) ** 2) / max(target, 1e-9)

    assignment = [0] * len(group_counts)
    for group in order:
        counts = group_counts[group]
        labels = Counter()
        for (label, _source), n in counts.items():
            labels[label] += n
        best = None
        for b, weight in enumerate(weights):
            cost = change(bin_sizes[b], sizes[group], weight * total)
            cost += sum(change(bin_labels[b][lab], n, weight * label_totals[lab]) for lab, n in labels.items())
            cost += source_weight * sum(
                change(bin_strata[b][key], n, weight * stratum_totals[key]) for key, n in counts.items()
            )
            key = (cost, bin_sizes[b] / max(weight * total, 1e-9), b)
            best = key if best is None or key < best else best
        chosen = best[2]
        assignment[group] = chosen
        bin_sizes[chosen] += sizes[group]
        bin_labels[chosen].update(labels)
        bin_strata[chosen].update(counts)
    return assignment


def member_ids(row: CorpusRow) -> list[str]:
    """Source patient ids of a row; an image without one is its own patient (keyed by its pixel hash)."""
    ids = [part.strip() for part in row.record.patient_id.split("|") if part.strip()]
    return ids or [f"{row.record.source}:image:{row.image.sha256[:16]}"]


def deduplicate(rows: list[CorpusRow], groups: PatientGroups) -> tuple[list[CorpusRow], dict]:
    """Keep one image per decoded-pixel hash; ids of all copies are linked. Copies with conflicting labels go."""
    by_hash = defaultdict(list)
    for row in rows:
        by_hash[row.image.sha256].append(row)
        ids = member_ids(row)
        for other in ids[1:]:
            groups.union(ids[0], other)
    kept, removed, conflicts = [], [], []
    for copies in by_hash.values():
        for copy in copies[1:]:
            groups.union(member_ids(copies[0])[0], member_ids(copy)[0])
        if len({copy.record.label for copy in copies}) > 1:
            conflicts.append({"files": [str(c.record.path) for c in copies], "labels": [c.label_name for c in copies]})
            continue
        kept.append(copies[0])
        removed += [{"kept": str(copies[0].record.path), "removed": str(c.record.path)} for c in copies[1:]]
    info = {
        "exact_duplicates_removed": len(removed),
        "label_conflicts_removed": sum(len(c["files"]) for c in conflicts),
        "exact_duplicates": removed,
        "label_conflicts": conflicts,
    }
    return kept, info


def group_and_split(rows: list[CorpusRow], options: CorpusOptions, groups: PatientGroups) -> dict:
    """Merge near-duplicates into patient groups, then assign groups (or images, paper protocol) to bins."""
    hashes = np.stack([row.image.phash for row in rows])
    pairs = near_duplicate_pairs(hashes, options.phash_threshold)
    merged = sum(groups.union(member_ids(rows[i])[0], member_ids(rows[j])[0]) for i, j, _ in pairs)
    for row in rows:
        for member in member_ids(row):
            groups.find(member)  # registers ids that were never unioned
    members = defaultdict(set)  # every id seen, including those of removed exact duplicates
    for member in list(groups.parent):
        members[groups.find(member)].add(member)
    for row in rows:
        component = members[groups.find(member_ids(row)[0])]
        row.members = tuple(sorted(component))
        row.patient_id = "|".join(row.members)
    if options.protocol == "paper":
        units = [[index] for index in range(len(rows))]
        unit_counts = [Counter({(row.record.label, ""): 1}) for row in rows]
        source_weight = 0.0
    else:
        by_patient = defaultdict(list)
        for index, row in enumerate(rows):
            by_patient[row.patient_id].append(index)
        units = [by_patient[key] for key in sorted(by_patient)]
        unit_counts = [Counter((rows[i].record.label, rows[i].record.source) for i in unit) for unit in units]
        source_weight = 0.5
    if len(units) < options.num_folds + 1:
        raise CorpusError(
            f"only {len(units)} patient groups for a test split + {options.num_folds} folds; "
            "add images or lower --num_folds"
        )
    weights = [options.test_fraction] + [(1 - options.test_fraction) / options.num_folds] * options.num_folds
    for unit, chosen in zip(units, assign_groups(unit_counts, weights, options.seed, source_weight), strict=True):
        for index in unit:
            rows[index].fold = chosen - 1
            if chosen == 0:
                rows[index].split = "test"
            else:
                rows[index].split = "validation" if chosen - 1 == options.validation_fold else "train"
    largest = max(Counter(row.patient_id for row in rows).values())
    return {
        "near_duplicate_pairs": len(pairs),
        "patient_groups_merged": merged,
        "largest_group_images": largest,
        "pairs": pairs,
    }
